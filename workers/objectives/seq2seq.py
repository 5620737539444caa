"""Sequence-to-sequence (T5, BART, ...): generate `dataset.target_column` from the text column.

Inputs are `training.source_prefix` + text, truncated to max_length; targets are truncated to
max_target_length. Evaluation generates (greedy or beam search, generation_max_length) and
scores the output: eval_rouge1/rouge2/rougeL (F-measure x100, stemmed), eval_bleu (sacrebleu
corpus BLEU) and eval_gen_len, next to eval_loss (teacher-forced).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from orchestrator.spec import JobSpec
from workers.objectives import check_tokenizer, load_pretrained, texts

trainer_class = Seq2SeqTrainer
args_class = Seq2SeqTrainingArguments
preprocess_logits_for_metrics = None  # predictions are generated ids already


def load_model(spec: JobSpec) -> PreTrainedModel:
    return load_pretrained(AutoModelForSeq2SeqLM, spec)


def prepare_tokenizer(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    check_tokenizer(spec, tokenizer)  # a pad token to pad with


def preprocess(
    spec: JobSpec,
    tokenizer: PreTrainedTokenizerBase,
    train_ds: Dataset,
    eval_ds: Dataset | None,
) -> tuple[Dataset, Dataset | None]:
    t = spec.training
    source, target = spec.dataset.text_column, spec.dataset.target_column
    assert target is not None  # JobSpec requires it for seq2seq
    prefix = t.source_prefix or ""

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        inputs = [prefix + text for text in texts(batch, source)]
        features = tokenizer(inputs, max_length=t.max_length, truncation=True)
        labels = tokenizer(text_target=texts(batch, target), max_length=t.max_target_length,
                           truncation=True)
        features["labels"] = labels["input_ids"]
        return features

    def run(ds: Dataset, split: str) -> Dataset:
        return ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                      desc=f"tokenizing {split}")

    return run(train_ds, "train"), (run(eval_ds, "eval") if eval_ds is not None else None)


def collator(
    spec: JobSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> DataCollatorForSeq2Seq:
    # Labels padded with -100 so padding never counts in the loss; passing the model lets
    # the collator build decoder_input_ids (labels shifted right) for it.
    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)


def _decode(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> list[str]:
    # Generated and label batches are padded with -100 when gathered; map it to pad first.
    ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
    decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [text.strip() for text in decoded]


def compute_metrics(spec: JobSpec, tokenizer: PreTrainedTokenizerBase):
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

    def metrics(pred: EvalPrediction) -> dict[str, float]:
        predictions = pred.predictions[0] if isinstance(pred.predictions, tuple) else (
            pred.predictions
        )
        predictions = np.asarray(predictions)
        outputs = _decode(tokenizer, predictions)
        references = _decode(tokenizer, np.asarray(pred.label_ids))
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for reference, output in zip(references, outputs, strict=True):
            scores = scorer.score(reference, output)
            for key in totals:
                totals[key] += scores[key].fmeasure
        n = max(len(outputs), 1)
        result = {key: 100.0 * value / n for key, value in totals.items()}
        result["bleu"] = sacrebleu.corpus_bleu(outputs, [references]).score
        not_pad = (predictions != tokenizer.pad_token_id) & (predictions >= 0)
        result["gen_len"] = float(not_pad.sum(axis=-1).mean()) if len(outputs) else 0.0
        return result

    return metrics


def extra_args(spec: JobSpec) -> dict[str, Any]:
    t = spec.training
    return {
        "predict_with_generate": True,
        "generation_max_length": t.generation_max_length,
        "generation_num_beams": t.generation_num_beams,
    }
