"""Masked language modelling (BERT-style): recover randomly masked tokens of the text column.

`training.mlm_probability` of the tokens are picked per batch (80% become the mask token,
10% a random token, 10% stay), labels are -100 everywhere else. Metrics: eval_loss,
eval_perplexity and eval_accuracy (argmax accuracy on the picked positions).

Training batches are masked afresh every time; the eval set is masked once, with
`training.seed`, so one model scores the same at every evaluation and evaluations at
different steps compare models, not mask draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from orchestrator.spec import JobSpec
from workers.objectives import PerplexityTrainer, check_tokenizer, load_pretrained, texts

trainer_class = PerplexityTrainer
args_class = TrainingArguments


def load_model(spec: JobSpec) -> PreTrainedModel:
    return load_pretrained(AutoModelForMaskedLM, spec)


def prepare_tokenizer(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    check_tokenizer(spec, tokenizer)  # a mask token, and a pad token to pad with


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

    train = run(train_ds, "train")
    if eval_ds is None:
        return train, None
    return train, mask_once(spec, tokenizer, run(eval_ds, "eval"))


def mask_once(spec: JobSpec, tokenizer: PreTrainedTokenizerBase, ds: Dataset) -> Dataset:
    """The eval set with its masks drawn once: masked input_ids and their labels.

    The same masking as training (the same collator), from a generator of its own seeded
    with training.seed, one example at a time in order: the draw depends on nothing but
    the data and the seed, and the global RNG that training draws from is left untouched.
    """
    masker = DataCollatorForLanguageModeling(
        tokenizer=tokenizer, mlm=True, mlm_probability=_probability(spec),
        seed=spec.training.seed,
    )

    def mask(example: dict[str, Any]) -> dict[str, Any]:
        batch = masker([{"input_ids": example["input_ids"],
                         "special_tokens_mask": example["special_tokens_mask"]}])
        return {"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()}

    return ds.map(mask, remove_columns=["special_tokens_mask"], desc="masking eval")


def _probability(spec: JobSpec) -> float:
    return spec.training.mlm_probability or 0.15


class MaskedLMCollator:
    """Masks training batches afresh each time; eval batches come masked already (they
    carry labels), so they are only padded: inputs with pad, labels with -100."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, probability: float) -> None:
        self.masking = DataCollatorForLanguageModeling(
            tokenizer=tokenizer, mlm=True, mlm_probability=probability)
        self.padding = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "labels" in features[0]:
            return self.padding(features)
        return self.masking(features)


def collator(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> MaskedLMCollator:
    return MaskedLMCollator(tokenizer, _probability(spec))


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
