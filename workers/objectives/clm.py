"""Causal language modelling (GPT-style): predict each next token of `dataset.text_column`.

Texts are truncated to `training.max_length`, or with `training.packing` concatenated and cut
into max_length blocks (as transformers' run_clm example does), which wastes no compute on
padding. Metrics: eval_loss and eval_perplexity.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import Any

from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from orchestrator.spec import JobSpec
from workers.objectives import PerplexityTrainer, load_pretrained, texts

log = logging.getLogger(__name__)

trainer_class = PerplexityTrainer
args_class = TrainingArguments
preprocess_logits_for_metrics = None  # loss only: no logits are kept


def load_model(spec: JobSpec) -> PreTrainedModel:
    return load_pretrained(AutoModelForCausalLM, spec)


def prepare_tokenizer(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer: {spec.tokenizer} has neither a pad token nor an eos token, so batches "
            "cannot be padded; use a tokenizer that defines one of them"
        )
    # GPT-style tokenizers ship without a pad token. Padding with eos is the usual fix; the
    # padded positions get label -100 and an attention mask of 0, so they never count.
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
    packing = bool(spec.training.packing)
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        if not packing:
            return tokenizer(texts(batch, column), truncation=True, max_length=block)
        # Whole texts (no truncation: packing cuts them into blocks below). An eos between
        # texts marks where one document ends, unless the tokenizer already appends one.
        # Blank texts (wikitext-style empty lines) are dropped rather than packed as lone eos.
        docs = [text for text in texts(batch, column) if text.strip()]
        if not docs:
            return {"input_ids": []}
        ids = tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]
        if eos is not None:
            ids = [seq if seq and seq[-1] == eos else [*seq, eos] for seq in ids]
        return {"input_ids": ids}

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        # run_clm's group_texts: concatenate a batch of texts, drop the short remainder.
        joined = list(chain.from_iterable(batch["input_ids"]))
        usable = (len(joined) // block) * block
        blocks = [joined[i : i + block] for i in range(0, usable, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks]}

    def run(ds: Dataset, split: str) -> Dataset:
        out = ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                     desc=f"tokenizing {split}")
        if packing:
            out = out.map(group, batched=True, batch_size=1000, desc=f"packing {split}")
        else:
            out = out.filter(lambda ex: len(ex["input_ids"]) > 0)
        if len(out) == 0:
            hint = " (shorter than one block: lower training.max_length)" if packing else ""
            raise ValueError(f"dataset: the {split} data yields no examples{hint}")
        return out

    return run(train_ds, "train"), (run(eval_ds, "eval") if eval_ds is not None else None)


def collator(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> DataCollatorForLanguageModeling:
    # labels = input_ids (the model shifts them); padded positions become -100. Note: when
    # pad == eos, real eos tokens are masked too: the usual trade-off of padding with eos.
    return DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)


def compute_metrics(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    # eval_loss comes from the Trainer, eval_perplexity from PerplexityTrainer.
    return None


def extra_args(spec: JobSpec) -> dict[str, Any]:
    return {}
