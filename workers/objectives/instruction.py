"""Instruction data for clm: prompt/response pairs or chats, learned on the responses only.

An example is cut into segments of text, each a prompt part or a response part:

  * `dataset.prompt_column` + `response_column`: the prompt, then the response, as they are
    (the data carries its own separators, e.g. "...\\nAnswer:" and " 42");
  * `dataset.messages_column`: a chat rendered with the chat template (the spec's
    `chat_template`, else the tokenizer's); each assistant turn is a response part, the text
    the template puts around and between them a prompt part. The parts are found by
    rendering the chat up to each assistant turn with the generation prompt and with the
    turn, so any template whose renderings extend each other works.

Each part is tokenized on its own (a prompt then tokenizes exactly as it will when the model
is asked to continue it), the parts are concatenated and the example ends with eos. Labels
are the response tokens (and eos); prompt tokens get -100 unless `training.train_on_prompt`.

Too long for `training.max_length`: the prompt before the first response loses its oldest
tokens first, keeping at least half the length, so the response stays where it can; what is
still too long is cut at the end. An example with no response token is dropped, and counted.

`ClmTrainer` adds `eval_exact_match` to the evaluations of instruction data: each eval
example's prompt (everything before its last response) is continued greedily, up to
`training.generation_max_length` new tokens, and the decoded text must equal the reference
response exactly (both stripped of special tokens and surrounding whitespace).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from orchestrator import objective_rules
from orchestrator.spec import JobSpec
from workers.objectives import PerplexityTrainer, texts

log = logging.getLogger(__name__)

# Eval column: where the example's last response starts (what generation continues from).
RESPONSE_START = "response_start"

Segments = list[tuple[str, bool]]  # (text, is_response)


def chat_segments(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                  template: str) -> Segments:
    """A chat as prompt and response parts, up to its last assistant turn (turns after it
    have nothing to learn)."""

    def render(upto: int, generation_prompt: bool) -> str:
        if upto == 0:
            return ""
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=generation_prompt,
                                             chat_template=template)
        assert isinstance(text, str)  # tokenize=False renders text
        return text

    segments: Segments = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != objective_rules.ASSISTANT:
            continue
        before, after = render(i, True), render(i + 1, False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError(
                "dataset.chat_template: the template's rendering of a chat up to an assistant "
                "turn is not the start of its rendering with that turn, so the turn cannot be "
                "told apart from the prompt; use a template that renders turns in order")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return segments


def pair_segments(prompt: str, response: str) -> Segments:
    return [(prompt, False), (response, True)]


def encode(segments: Segments, tokenizer: PreTrainedTokenizerBase, *, chat: bool,
           train_on_prompt: bool, max_length: int) -> dict[str, Any] | None:
    """input_ids, labels and response_start of one example; None when no response token
    is left (an empty chat, or a chat without an assistant turn)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    response: list[bool] = []
    last_start = -1
    for n, (text, is_response) in enumerate(segments):
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's
        # (a bos, say) as any text would, but not an eos the tokenizer appends to a text.
        specials = not chat and n == 0
        piece = tokenizer(text, add_special_tokens=specials)["input_ids"] if text else []
        if specials and piece and piece[-1] == eos:
            piece = piece[:-1]
        if is_response:
            last_start = len(ids)
        ids += piece
        response += [is_response] * len(piece)
    if last_start < 0:
        return None  # nothing the model should answer
    if not ids or ids[-1] != eos:
        ids.append(eos)  # the end of the response: the model learns to stop
        response.append(True)
    ids, response, last_start = _truncate(ids, response, last_start, max_length)
    if not any(response):
        return None
    labels = list(ids) if train_on_prompt else [t if r else -100 for t, r in zip(ids, response,
                                                                              strict=True)]
    return {"input_ids": ids, "labels": labels, RESPONSE_START: last_start}


def _truncate(ids: list[int], response: list[bool], last_start: int,
              max_length: int) -> tuple[list[int], list[bool], int]:
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, response, last_start
    prompt = response.index(True) if True in response else len(ids)
    # The prompt before the first response gives up its oldest tokens, down to half the
    # length: the response is what is learned, the prompt's end is what it answers.
    cut = min(excess, max(0, prompt - min(prompt, max_length // 2)))
    ids, response, last_start = ids[cut:], response[cut:], last_start - cut
    return ids[:max_length], response[:max_length], last_start


def preprocess(spec: JobSpec, tokenizer: PreTrainedTokenizerBase, ds: Dataset, split: str,
               max_length: int) -> Dataset:
    """Tokenized instruction examples (input_ids, labels, and for eval response_start)."""
    data = spec.dataset
    chat = bool(data.messages_column)
    template = objective_rules.chat_template(spec, tokenizer) if chat else None
    train_on_prompt = bool(spec.training.train_on_prompt)

    def tokenize(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows: list[dict[str, Any] | None] = []
        if chat:
            assert data.messages_column is not None
            for index, messages in zip(indices, batch[data.messages_column], strict=True):
                if why := objective_rules.messages_problem(messages):
                    raise ValueError(f"dataset.messages_column: row {index} of the {split} "
                                     f"data: {why}")
                assert template is not None
                rows.append(encode(chat_segments(messages, tokenizer, template), tokenizer,
                                   chat=True, train_on_prompt=train_on_prompt,
                                   max_length=max_length))
        else:
            assert data.prompt_column and data.response_column
            for prompt, response in zip(texts(batch, data.prompt_column),
                                        texts(batch, data.response_column), strict=True):
                rows.append(encode(pair_segments(prompt, response), tokenizer, chat=False,
                                   train_on_prompt=train_on_prompt, max_length=max_length))
        kept = [row for row in rows if row is not None]
        return {key: [row[key] for row in kept] for key in ("input_ids", "labels", RESPONSE_START)}

    out = ds.map(tokenize, batched=True, with_indices=True, remove_columns=ds.column_names,
                 desc=f"tokenizing {split}")
    if dropped := len(ds) - len(out):
        log.warning("dataset: dropped %d of %d %s examples with no response token (a chat "
                    "without an assistant turn)", dropped, len(ds), split)
    if len(out) == 0:
        raise ValueError(f"dataset: none of the {split} examples has a response to learn")
    return out if split == "eval" else out.remove_columns(RESPONSE_START)


class ClmTrainer(PerplexityTrainer):
    """PerplexityTrainer that also scores instruction eval data by greedy generation:
    `<prefix>_exact_match`, the share of eval prompts whose continuation is the reference
    response. Plain text eval data (no response_start column) gets no such metric."""

    def evaluation_loop(self, dataloader: Any, description: str,
                        prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None,
                        metric_key_prefix: str = "eval") -> Any:
        output = super().evaluation_loop(dataloader, description, prediction_loss_only,
                                         ignore_keys, metric_key_prefix)
        data = self.eval_dataset
        if (isinstance(data, Dataset) and RESPONSE_START in data.column_names
                and output.metrics is not None):
            output.metrics[f"{metric_key_prefix}_exact_match"] = self.exact_match(data)
        return output

    def exact_match(self, data: Dataset) -> float:
        tokenizer = self.processing_class
        assert isinstance(tokenizer, PreTrainedTokenizerBase)
        # Every rank generates for its own share, in batches of the same count on every
        # rank (FSDP needs each rank in every forward); the counts are summed.
        rank, world = self.args.process_index, self.args.world_size
        mine = list(range(rank, len(data), world))
        size = self.args.per_device_eval_batch_size
        batches = -(-len(range(0, len(data), world)) // size)
        correct = total = 0
        model: Any = self.model  # the FSDP module under FSDP (generate syncs the ranks)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for b in range(batches):
                chunk = mine[b * size:(b + 1) * size]
                rows = [data[i] for i in chunk] or [data[0]]  # a rank with none still steps
                prompts = [row["input_ids"][:row[RESPONSE_START]] for row in rows]
                refs = [row["input_ids"][row[RESPONSE_START]:] for row in rows]
                batch = tokenizer.pad({"input_ids": prompts}, padding_side="left",
                                      return_tensors="pt").to(self.args.device)
                with self.autocast_smart_context_manager():
                    out = model.generate(**batch, do_sample=False, num_beams=1,
                                         pad_token_id=tokenizer.pad_token_id)
                width = batch["input_ids"].shape[1]
                for n, row in enumerate(out[:, width:].tolist()):
                    if not chunk or not refs[n]:
                        continue
                    total += 1
                    correct += _same(tokenizer, row, refs[n])
        model.train(was_training)
        counts = torch.tensor([correct, total], dtype=torch.float64, device=self.args.device)
        if world > 1:
            torch.distributed.all_reduce(counts)
        return float(counts[0] / counts[1]) if counts[1] else 0.0


def _same(tokenizer: PreTrainedTokenizerBase, generated: list[int], reference: list[int]) -> bool:
    eos = tokenizer.eos_token_id
    if eos in generated:
        generated = generated[:generated.index(eos)]
    if eos in reference:
        reference = reference[:reference.index(eos)]
    def text(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()

    return text(generated) == text(reference)
