"""Causal language modelling (GPT-style): predict each next token of `dataset.text_column`,
or of the responses of instruction data (see workers.objectives.instruction).

Every document ends with eos, and that eos is a target: the model learns where a text ends.
Texts are truncated to `training.max_length` (a text cut short keeps no eos: it does not end
there), or with `training.packing` concatenated and cut into max_length blocks whose labels
are the block itself (transformers' run_clm example), which wastes no compute on padding.
Unpacked batches are padded and the padding's labels are -100, by position, never by token
id: GPT-style tokenizers pad with eos, and masking by id would hide every real eos too.

`packing: padding_free` (flash attention on CUDA GPUs only) keeps examples whole and lets
DataCollatorWithFlattening put each batch in one row whose position ids restart at every
example, so no token attends across examples and no compute goes to padding. Packed
instruction data keeps each example's labels; its eval examples are never packed (each is
scored, and generated from, on its own).

Metrics: eval_loss and eval_perplexity; instruction data adds eval_exact_match.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import Any

from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    default_data_collator,
)

from orchestrator.spec import JobSpec
from workers.objectives import check_tokenizer, instruction, load_pretrained, texts
from workers.objectives.instruction import ClmTrainer

log = logging.getLogger(__name__)

trainer_class = ClmTrainer
args_class = TrainingArguments
preprocess_logits_for_metrics = None  # loss only: no logits are kept
PADDING_FREE = "padding_free"


def load_model(spec: JobSpec) -> PreTrainedModel:
    kwargs = {}
    if spec.training.packing == PADDING_FREE:
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ValueError(
                "training.packing: padding_free needs flash attention (the flash-attn package "
                "and a CUDA GPU) on the workers, and this one has none; use packing: true or false")
        # Only flash attention reads the restarting position ids as example boundaries.
        kwargs["attn_implementation"] = "flash_attention_2"
    model = load_pretrained(AutoModelForCausalLM, spec, **kwargs)
    if spec.dataset.instruction:
        # Greedy continuations of generation_max_length tokens, for eval_exact_match and as
        # the final model's default.
        model.generation_config.max_new_tokens = spec.training.generation_max_length
        model.generation_config.do_sample = False
        model.generation_config.num_beams = 1
    return model


def prepare_tokenizer(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    check_tokenizer(spec, tokenizer)  # an eos to end documents with (and pad with)
    if tokenizer.pad_token is None:
        # GPT-style tokenizers ship without a pad token. Padding with eos is the usual fix;
        # the padded positions get label -100 (by position, see collator) and an attention
        # mask of 0, so they never count, while real eos tokens stay targets.
        tokenizer.pad_token = tokenizer.eos_token


def _block_size(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> int:
    size = spec.training.max_length
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a known limit report a huge sentinel (int(1e30)).
    if isinstance(limit, int) and 0 < limit < 1_000_000 and size > limit:
        log.warning("training.max_length %d is above the tokenizer's model_max_length %d; "
                    "using %d", size, limit, limit)
        size = limit
    return size


def preprocess(
    spec: JobSpec,
    tokenizer: PreTrainedTokenizerBase,
    train_ds: Dataset,
    eval_ds: Dataset | None,
) -> tuple[Dataset, Dataset | None]:
    column = spec.dataset.text_column
    block = _block_size(spec, tokenizer)
    packing = spec.training.packing is True  # padding_free keeps examples whole
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        # Blank texts (wikitext-style empty lines) are dropped rather than kept as lone eos.
        docs = [text for text in texts(batch, column) if text.strip()]
        if not docs:
            return {"input_ids": [], "labels": []}
        # Whole texts, each ending with eos (unless the tokenizer appends one itself).
        ids = tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]
        if eos is not None:
            ids = [seq if seq and seq[-1] == eos else [*seq, eos] for seq in ids]
        if not packing:  # packing cuts whole texts into blocks below instead
            ids = [seq[:block] for seq in ids]
        return {"input_ids": ids, "labels": [list(seq) for seq in ids]}

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        # run_clm's group_texts: concatenate a batch of examples, drop the short remainder.
        # Plain text: the labels are the block itself (the model shifts them); instruction
        # data: each example's own labels, prompts masked.
        out: dict[str, list[list[int]]] = {}
        for key in ("input_ids", "labels"):
            joined = list(chain.from_iterable(batch[key]))
            usable = (len(joined) // block) * block
            out[key] = [joined[i : i + block] for i in range(0, usable, block)]
        out["attention_mask"] = [[1] * block for _ in out["input_ids"]]
        return out

    def run(ds: Dataset, split: str) -> Dataset:
        if spec.dataset.instruction:
            out = instruction.preprocess(spec, tokenizer, ds, split, block)
            if not packing or split == "eval":
                return out  # eval examples stay whole: scored and generated from one by one
        else:
            out = ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                         desc=f"tokenizing {split}")
        if packing:
            out = out.map(group, batched=True, batch_size=1000, remove_columns=out.column_names,
                          desc=f"packing {split}")
        if len(out) == 0:
            hint = " (shorter than one block: lower training.max_length)" if packing else ""
            raise ValueError(f"dataset: the {split} data yields no examples{hint}")
        return out

    return run(train_ds, "train"), (run(eval_ds, "eval") if eval_ds is not None else None)


def collator(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> Any:
    if spec.training.packing == PADDING_FREE:
        # One row per batch, position ids restarting at each example; the first token of
        # each example gets label -100 (nothing before it to predict it from).
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    if spec.training.packing and not spec.dataset.instruction:
        return default_data_collator  # full blocks: nothing to pad
    # Pads input_ids with the pad token and labels with -100: padding is masked by where it
    # is, so a pad token that is also eos leaves the real eos targets alone.
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


def compute_metrics(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    # eval_loss comes from the Trainer, eval_perplexity from PerplexityTrainer.
    return None


def extra_args(spec: JobSpec) -> dict[str, Any]:
    return {}
