"""Masked language modelling (BERT-style): recover randomly masked tokens of the text column.

`training.mlm_probability` of the tokens are picked per batch (80% become the mask token,
10% a random token, 10% stay), labels are -100 everywhere else. Metrics: eval_loss,
eval_perplexity and eval_accuracy (argmax accuracy on the picked positions).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from orchestrator.spec import JobSpec
from workers.objectives import PerplexityTrainer, load_pretrained, texts

trainer_class = PerplexityTrainer
args_class = TrainingArguments


def load_model(spec: JobSpec) -> PreTrainedModel:
    return load_pretrained(AutoModelForMaskedLM, spec)


def prepare_tokenizer(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.mask_token is None:
        raise ValueError(
            f"tokenizer: {spec.tokenizer} has no mask token, which masked language modelling "
            "needs; use a BERT-style tokenizer (or objective clm for GPT-style models)"
        )
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer: {spec.tokenizer} has no pad token to pad batches with")


def preprocess(
    spec: JobSpec,
    tokenizer: PreTrainedTokenizerBase,
    train_ds: Dataset,
    eval_ds: Dataset | None,
) -> tuple[Dataset, Dataset | None]:
    column = spec.dataset.text_column
    length = spec.training.max_length
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < length:
        length = limit

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        # The special-tokens mask keeps [CLS]/[SEP]/[PAD] from ever being masked, and is
        # cheaper to compute here once than per batch in the collator.
        return tokenizer(texts(batch, column), truncation=True, max_length=length,
                         return_special_tokens_mask=True)

    def run(ds: Dataset, split: str) -> Dataset:
        out = ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                     desc=f"tokenizing {split}")
        # A text of only special tokens has nothing to mask.
        out = out.filter(lambda ex: sum(ex["special_tokens_mask"]) < len(ex["input_ids"]))
        if len(out) == 0:
            raise ValueError(f"dataset: the {split} data has no non-empty texts")
        return out

    return run(train_ds, "train"), (run(eval_ds, "eval") if eval_ds is not None else None)


def collator(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> DataCollatorForLanguageModeling:
    return DataCollatorForLanguageModeling(
        tokenizer=tokenizer,
        mlm=True,
        mlm_probability=spec.training.mlm_probability or 0.15,
    )


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Keep only the predicted ids: full logits (batch x length x vocab) would be accumulated
    # over the whole eval set.
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(spec: JobSpec, tokenizer: PreTrainedTokenizerBase):
    def metrics(pred: EvalPrediction) -> dict[str, float]:
        predictions = np.asarray(pred.predictions)
        labels = np.asarray(pred.label_ids)
        picked = labels != -100
        total = int(picked.sum())
        correct = int((predictions[picked] == labels[picked]).sum())
        return {"accuracy": correct / total if total else 0.0}

    return metrics


def extra_args(spec: JobSpec) -> dict[str, Any]:
    return {}
