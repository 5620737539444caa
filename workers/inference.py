"""Try a trained job's model: what `orch predict` runs, here or as a Ray Job on the cluster.

`Predictor` wraps a model loaded with `workers.adapters.load_for_inference` (full, merged
or adapter) and answers a batch of inputs the way the job trained:

  * clm continues the text greedily. A job trained on instruction data gets its prompt
    rendered as the training rendered it (the prompt as written for prompt/response data,
    the chat template with the generation prompt for chats) and answers with the response
    alone, up to eos;
  * mlm fills every mask token (`[MASK]` for BERT) with its top-k candidates and their
    probabilities; an input without one is refused;
  * seq2seq prepends `training.source_prefix` (truncating to `training.max_length`, as in
    training) and generates with the job's `generation_max_length` and
    `generation_num_beams`.

Decoding is greedy (or the job's beam search): the same input gives the same answer, as the
eval metrics were computed.

Run as `python -m workers.inference REQUEST` (REQUEST: a base64 JSON `RemoteRequest`) it is
the entrypoint of the Ray Job that the control plane starts for `orch predict` when the model
is not on the CLI's machine; it prints its answer as one `RESULT_MARKER` line, which the
control plane reads back from the Ray Job's logs.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.spec import JobSpec, Objective, spec_from_dict
from workers.adapters import LoadedModel, load_for_inference

# Greedy continuation length when neither the command nor the job says (plain-text clm).
DEFAULT_NEW_TOKENS = 32
MAX_NEW_TOKENS = 4096
BATCH = 8
# The Ray Job's answer, one line on stdout: the marker, a space, then JSON.
RESULT_MARKER = "ORCH-PREDICT-RESULT"

# One input: text, or (for a chat-trained clm job) a conversation of {role, content}.
Input = str | list[dict[str, Any]]


class PredictError(ValueError):
    """An input the model cannot answer (e.g. an mlm input without a mask token): the
    person's to fix, reported as one line."""


@dataclass(frozen=True)
class PromptStyle:
    """How a clm job's inputs become prompts: `plain` text, `pair` (instruction data with a
    prompt and a response column: the prompt as written) or `chat` (rendered with
    `template`, ending with the generation prompt)."""

    kind: str = "plain"
    template: str | None = None

    @classmethod
    def of(cls, spec: Any) -> PromptStyle:
        # Read with getattr: the instruction fields are newer than some stored specs.
        data = spec.dataset
        if getattr(data, "messages_column", None):
            return cls("chat", getattr(data, "chat_template", None))
        if getattr(data, "prompt_column", None):
            return cls("pair")
        return cls("plain")

    @property
    def instruction(self) -> bool:
        return self.kind != "plain"


def _as_chat(item: Input) -> list[dict[str, Any]]:
    return [{"role": "user", "content": item}] if isinstance(item, str) else list(item)


class Predictor:
    """A job's model and the settings it trained with, ready to answer inputs."""

    def __init__(self, spec: JobSpec, loaded: LoadedModel) -> None:
        self.spec = spec
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.style = PromptStyle.of(spec) if spec.objective == Objective.CLM else PromptStyle()
        self.device = next(self.model.parameters()).device
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # as the clm training did

    @classmethod
    def load(cls, spec: JobSpec, location: str, device: str | None = None) -> Predictor:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(spec, load_for_inference(location, spec.objective, device=device))

    # -- the public entry ------------------------------------------------------------------
    def predict(self, inputs: Sequence[Input], *, max_new_tokens: int | None = None,
                top_k: int = 5) -> list[dict[str, Any]]:
        """One answer per input, in order: {"input", "output"} (+ "masks" for mlm)."""
        if not inputs:
            raise PredictError("no input to predict from; give a text or --file")
        if self.spec.objective == Objective.MLM:
            self._check_masks(inputs)
        answers: list[dict[str, Any]] = []
        for start in range(0, len(inputs), BATCH):
            batch = list(inputs[start:start + BATCH])
            if self.spec.objective == Objective.MLM:
                answers += self._fill_masks(batch, top_k)
            elif self.spec.objective == Objective.SEQ2SEQ:
                answers += self._seq2seq(batch, max_new_tokens)
            else:
                answers += self._continue(batch, max_new_tokens)
        return answers

    # -- clm -------------------------------------------------------------------------------
    def prompt_ids(self, item: Input) -> list[int]:
        """The token ids a clm prompt is, exactly as training tokenized prompts."""
        tok = self.tokenizer
        if self.style.kind == "chat":
            template = self.style.template or getattr(tok, "chat_template", None)
            if not template:
                raise PredictError("the job renders chats with a chat template and neither the "
                                   "job nor its tokenizer has one")
            text = tok.apply_chat_template(_as_chat(item), tokenize=False,
                                           add_generation_prompt=True, chat_template=template)
            # A chat template writes its own special tokens.
            return list(tok(text, add_special_tokens=False)["input_ids"])
        if not isinstance(item, str):
            raise PredictError("a conversation (a list of messages) is only for jobs trained on "
                               "chats (dataset.messages_column); give text")
        ids = list(tok(item, add_special_tokens=True)["input_ids"])
        if ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]  # continue the text, not a finished document
        return ids

    def _continue(self, batch: list[Input], max_new_tokens: int | None) -> list[dict[str, Any]]:
        tok = self.tokenizer
        prompts = [self.prompt_ids(item) for item in batch]
        if any(not ids for ids in prompts):
            raise PredictError("an input is empty; give some text to continue")
        padded = tok.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        limit = max_new_tokens or self._default_new_tokens()
        with torch.no_grad():
            out = self.model.generate(**padded.to(self.device), max_new_tokens=limit,
                                      do_sample=False, num_beams=1,
                                      pad_token_id=tok.pad_token_id)
        width = padded["input_ids"].shape[1]
        answers = []
        for item, row in zip(batch, out[:, width:].tolist(), strict=True):
            if self.style.instruction and tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]  # the response ends at eos
            text = str(tok.decode(row, skip_special_tokens=True))
            answers.append({"input": item, "output": text.strip() if self.style.instruction
                            else text})
        return answers

    def _default_new_tokens(self) -> int:
        t = self.spec.training
        if self.style.instruction and t.generation_max_length:
            return t.generation_max_length
        configured = getattr(self.model.generation_config, "max_new_tokens", None)
        return configured or DEFAULT_NEW_TOKENS

    # -- mlm -------------------------------------------------------------------------------
    def _check_masks(self, inputs: Sequence[Input]) -> None:
        mask = self.tokenizer.mask_token
        for n, item in enumerate(inputs, 1):
            if not isinstance(item, str) or mask not in item:
                raise PredictError(f"input {n} has no {mask} to fill: a masked-LM model fills "
                                   f"masked words, e.g. \"The river flows to the {mask}.\"")

    def _fill_masks(self, batch: list[Input], top_k: int) -> list[dict[str, Any]]:
        tok = self.tokenizer
        texts = [str(item) for item in batch]
        length = min(self.spec.training.max_length, _model_max(tok))
        encoded = tok(texts, padding=True, truncation=True, max_length=length,
                      return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**encoded).logits
        answers = []
        for row, text in enumerate(texts):
            ids = encoded["input_ids"][row]
            where = (ids == tok.mask_token_id).nonzero().flatten().tolist()
            if not where:
                raise PredictError(f"the {tok.mask_token} in {text[:60]!r} lies past "
                                   f"training.max_length ({length} tokens); put it earlier")
            filled = ids.clone()
            masks = []
            for n, position in enumerate(where):
                probs = torch.softmax(logits[row, position].float(), dim=-1)
                top = torch.topk(probs, k=min(top_k, probs.shape[-1]))
                filled[position] = top.indices[0]
                masks.append({"mask": n, "candidates": [
                    {"token": str(tok.decode([int(i)])).strip(), "token_id": int(i),
                     "probability": float(p)}
                    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]})
            keep = encoded["attention_mask"][row].bool()
            output = tok.decode(filled[keep].tolist(), skip_special_tokens=True)
            answers.append({"input": text, "output": output, "masks": masks})
        return answers

    # -- seq2seq ---------------------------------------------------------------------------
    def _seq2seq(self, batch: list[Input], max_new_tokens: int | None) -> list[dict[str, Any]]:
        tok, t = self.tokenizer, self.spec.training
        texts = [str(item) for item in batch]
        encoded = tok([(t.source_prefix or "") + text for text in texts], padding=True,
                      truncation=True, max_length=t.max_length, return_tensors="pt")
        # As evaluation generated: max_length (decoder tokens) and the beams of the job,
        # unless the command asks for a number of new tokens.
        length = ({"max_new_tokens": max_new_tokens} if max_new_tokens
                  else {"max_length": t.generation_max_length or t.max_target_length or 64})
        with torch.no_grad():
            out = self.model.generate(**encoded.to(self.device), do_sample=False,
                                      num_beams=t.generation_num_beams or 1, **length)
        outputs = tok.batch_decode(out, skip_special_tokens=True)
        return [{"input": text, "output": output.strip()}
                for text, output in zip(texts, outputs, strict=True)]


def _model_max(tokenizer: Any) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a known limit report a huge sentinel (int(1e30)).
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else MAX_NEW_TOKENS * 4


# ---------------------------------------------------------------------------------------
# The Ray Job entrypoint


@dataclass(frozen=True)
class RemoteRequest:
    """What the control plane hands the Ray Job: the job's spec, the model's location and
    the inputs (all from the store and the request; nothing else is read)."""

    spec: dict[str, Any]
    location: str
    inputs: list[Input]
    max_new_tokens: int | None = None
    top_k: int = 5

    def encode(self) -> str:
        return base64.urlsafe_b64encode(json.dumps(self.__dict__).encode()).decode()

    @classmethod
    def decode(cls, text: str) -> RemoteRequest:
        return cls(**json.loads(base64.urlsafe_b64decode(text.encode())))


def run_remote(request: RemoteRequest) -> dict[str, Any]:
    """Answer a request on this node: {"predictions": [...]} or {"error": "one line"}."""
    from orchestrator.sandbox import current_rules

    spec = spec_from_dict(request.spec)
    # The server's rules, applied again where the files are opened (as a worker does).
    if outside := current_rules().problems(spec):
        return {"error": "the job's spec reaches outside what this cluster allows: "
                         + "; ".join(outside)}
    try:
        predictor = Predictor.load(spec, request.location)
        return {"predictions": predictor.predict(request.inputs,
                                                 max_new_tokens=request.max_new_tokens,
                                                 top_k=request.top_k)}
    except (PredictError, FileNotFoundError) as exc:
        return {"error": str(exc)}


def parse_result(logs: str) -> dict[str, Any] | None:
    """The Ray Job's answer from its logs (the last marker line), or None."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER + " "):
            try:
                found = json.loads(line[len(RESULT_MARKER) + 1:])
            except ValueError:
                return None
            return found if isinstance(found, dict) else None
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.inference REQUEST", file=sys.stderr)
        return 2
    result = run_remote(RemoteRequest.decode(args[0]))
    print(f"{RESULT_MARKER} {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
