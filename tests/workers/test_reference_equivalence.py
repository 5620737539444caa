"""Exactness: orch's training equals a plain Hugging Face Trainer script, bit for bit on CPU.

For each objective, a few steps through `workers.training.run_training` and through a
script written here the textbook way, using nothing of orch: load_dataset, the tokenizer,
the library's collator, Trainer and TrainingArguments with the same settings. Every logged
train loss and gradient norm, and the eval metrics, must agree within 1e-6.

To add a case: a `Case` with the spec's overrides and a `reference` function that returns
the textbook (model, tokenizer, train set, eval set, collator, trainer class, extra
TrainingArguments, compute_metrics) for the same settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from orchestrator.spec import load_spec  # noqa: E402
from workers.training import run_training  # noqa: E402

JOBS = Path(__file__).resolve().parents[2] / "jobs"
ASSETS = JOBS / "assets"
DATA = ASSETS / "data"
MODELS = ASSETS / "models"

# The settings both runs use; orch gets them as --set overrides, the script as they are.
STEPS, BATCH, EVAL_BATCH, SEED, LR = 5, 4, 8, 42, 2e-3
TRAIN_SAMPLES, EVAL_SAMPLES, LENGTH = 40, 8, 32
INSTRUCTION_LENGTH = 64  # the longest instruction example fits whole
COMMON = [f"training.max_steps={STEPS}", f"training.batch_size={BATCH}",
          f"training.eval_batch_size={EVAL_BATCH}", f"training.seed={SEED}",
          f"training.learning_rate={LR}", "training.warmup_steps=1",
          "training.lr_scheduler=linear", "training.weight_decay=0.0",
          "training.gradient_accumulation_steps=1", f"training.max_length={LENGTH}",
          f"training.eval_steps={STEPS}", "training.save_steps=null", "training.logging_steps=1",
          f"dataset.max_train_samples={TRAIN_SAMPLES}", f"dataset.max_eval_samples={EVAL_SAMPLES}",
          "resources.cpus=2", "training.precision=fp32"]


class Logs(TrainerCallback):
    """Every train loss and grad norm by step, and every evaluation."""

    def __init__(self) -> None:
        self.train: dict[int, dict[str, float]] = {}
        self.evals: dict[int, dict[str, float]] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.train[state.global_step] = {k: logs[k] for k in ("loss", "grad_norm")}
        if "eval_loss" in logs:
            self.evals.setdefault(state.global_step, {}).update(
                {k: v for k, v in logs.items()
                 if k.startswith("eval_") and "runtime" not in k and "per_second" not in k})


@dataclass
class Textbook:
    model: Any
    tokenizer: Any
    train: Any
    evaluation: Any
    collator: Any
    trainer_class: type[Trainer] = Trainer
    args_class: type[TrainingArguments] = TrainingArguments
    extra_args: dict[str, Any] = field(default_factory=dict)
    compute_metrics: Callable[[Any], dict[str, float]] | None = None
    preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None
    # Metrics computed after the run from the model (e.g. by generating): step -> metrics.
    after_eval: Callable[[Any], dict[str, float]] | None = None


def jsonl(path: Path, limit: int) -> Any:
    return load_dataset("json", data_files=[str(path)], split="train").select(range(limit))


# ---------------------------------------------------------------------------------------
# The textbook scripts


def clm_reference(packing: bool) -> Textbook:
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "gpt2-tiny")
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(MODELS / "gpt2-tiny")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        # Each document ends with eos; unpacked ones are cut to the block size.
        texts = [t + tokenizer.eos_token for t in batch["text"] if t.strip()]
        if packing:
            return tokenizer(texts)
        out = tokenizer(texts, truncation=True, max_length=LENGTH)
        out["labels"] = [list(ids) for ids in out["input_ids"]]
        return out

    def group_texts(batch: dict[str, list[list[int]]]) -> dict[str, Any]:
        # run_clm's group_texts, labels = the block itself.
        joined = {k: list(chain(*batch[k])) for k in batch}
        total = (len(joined["input_ids"]) // LENGTH) * LENGTH
        result = {k: [t[i:i + LENGTH] for i in range(0, total, LENGTH)] for k, t in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    def prepare(path: Path, limit: int) -> Any:
        ds = jsonl(path, limit)
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
        return ds.map(group_texts, batched=True, batch_size=1000) if packing else ds

    return Textbook(model, tokenizer, prepare(DATA / "lm" / "train.jsonl", TRAIN_SAMPLES),
                    prepare(DATA / "lm" / "eval.jsonl", EVAL_SAMPLES),
                    default_data_collator if packing
                    else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))


def mlm_reference() -> Textbook:
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "bert-tiny")
    model = AutoModelForMaskedLM.from_pretrained(MODELS / "bert-tiny")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        return tokenizer(batch["text"], truncation=True, max_length=LENGTH,
                         return_special_tokens_mask=True)

    train = jsonl(DATA / "lm" / "train.jsonl", TRAIN_SAMPLES)
    train = train.map(tokenize, batched=True, remove_columns=train.column_names)
    evaluation = jsonl(DATA / "lm" / "eval.jsonl", EVAL_SAMPLES)
    evaluation = evaluation.map(tokenize, batched=True, remove_columns=evaluation.column_names)
    # The eval set masked once with a seeded collator, so every evaluation sees the same masks.
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=SEED)

    def mask(example: dict[str, Any]) -> dict[str, Any]:
        batch = masker([{"input_ids": example["input_ids"],
                         "special_tokens_mask": example["special_tokens_mask"]}])
        return {"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()}

    evaluation = evaluation.map(mask, remove_columns=["special_tokens_mask"])
    masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    padding = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        return (padding if "labels" in features[0] else masking)(features)

    def accuracy(pred: Any) -> dict[str, float]:
        picked = pred.label_ids != -100
        return {"accuracy": float((pred.predictions[picked] == pred.label_ids[picked]).mean())}

    return Textbook(model, tokenizer, train, evaluation, collate, compute_metrics=accuracy,
                    preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))


def seq2seq_reference() -> Textbook:
    from rouge_score import rouge_scorer

    tokenizer = AutoTokenizer.from_pretrained(MODELS / "t5-tiny")
    model = AutoModelForSeq2SeqLM.from_pretrained(MODELS / "t5-tiny")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        out = tokenizer(["summarize: " + d for d in batch["document"]], max_length=LENGTH,
                        truncation=True)
        out["labels"] = tokenizer(text_target=batch["summary"], max_length=12,
                                  truncation=True)["input_ids"]
        return out

    def prepare(path: Path, limit: int) -> Any:
        ds = jsonl(path, limit)
        return ds.map(tokenize, batched=True, remove_columns=ds.column_names)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def rouge(pred: Any) -> dict[str, float]:
        def decode(ids: np.ndarray) -> list[str]:
            ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
            return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]

        outs, refs = decode(pred.predictions), decode(pred.label_ids)
        scores = [scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(refs, outs, strict=True)]
        return {"rougeL": 100 * sum(scores) / len(scores)}

    return Textbook(model, tokenizer, prepare(DATA / "summarize" / "train.jsonl", TRAIN_SAMPLES),
                    prepare(DATA / "summarize" / "eval.jsonl", EVAL_SAMPLES),
                    DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
                    trainer_class=Seq2SeqTrainer, args_class=Seq2SeqTrainingArguments,
                    extra_args={"predict_with_generate": True, "generation_max_length": 8,
                                "generation_num_beams": 1},
                    compute_metrics=rouge)


def instruction_reference() -> Textbook:
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "gpt2-tiny")
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(MODELS / "gpt2-tiny")
    eos = tokenizer.eos_token_id

    def tokenize(example: dict[str, str]) -> dict[str, Any]:
        # Prompt and response tokenized apart; the loss on the response and eos only.
        prompt = tokenizer(example["prompt"])["input_ids"]
        response = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [eos]
        return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}

    def prepare(path: Path, limit: int) -> Any:
        ds = jsonl(path, limit)
        ds = ds.map(tokenize, remove_columns=ds.column_names)
        # Nothing to truncate at INSTRUCTION_LENGTH (orch's own truncation rule aside).
        assert max(map(len, ds["input_ids"])) <= INSTRUCTION_LENGTH
        return ds

    questions = jsonl(DATA / "instruct" / "eval.jsonl", EVAL_SAMPLES)

    def exact_match(trained: Any) -> dict[str, float]:
        right = 0
        for q in questions:
            prompt = tokenizer(q["prompt"], return_tensors="pt")
            out = trained.generate(**prompt, max_new_tokens=4, do_sample=False,
                                   pad_token_id=eos)[0, prompt["input_ids"].shape[1]:].tolist()
            out = out[:out.index(eos)] if eos in out else out
            right += tokenizer.decode(out, skip_special_tokens=True).strip() == q["response"].strip()
        return {"eval_exact_match": right / len(questions)}

    return Textbook(model, tokenizer, prepare(DATA / "instruct" / "train.jsonl", TRAIN_SAMPLES),
                    prepare(DATA / "instruct" / "eval.jsonl", EVAL_SAMPLES),
                    DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
                    after_eval=exact_match)


def run_textbook(book: Textbook, out: Path) -> Logs:
    logs = Logs()
    args = book.args_class(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=EVAL_BATCH,
        gradient_accumulation_steps=1, learning_rate=LR, weight_decay=0.0, warmup_steps=1,
        lr_scheduler_type="linear", max_steps=STEPS, logging_strategy="steps", logging_steps=1,
        eval_strategy="steps", eval_steps=STEPS, eval_on_start=True, save_strategy="no",
        report_to=[], seed=SEED, use_cpu=True, disable_tqdm=True, **book.extra_args)
    trainer = book.trainer_class(
        model=book.model, args=args, train_dataset=book.train, eval_dataset=book.evaluation,
        processing_class=book.tokenizer, data_collator=book.collator,
        compute_metrics=book.compute_metrics,
        preprocess_logits_for_metrics=book.preprocess_logits_for_metrics, callbacks=[logs])
    if book.after_eval:  # scored at the same steps as orch's evaluations: 0 and the end
        logs.evals.setdefault(0, {}).update(book.after_eval(book.model))
    trainer.train()
    if book.after_eval:
        logs.evals[STEPS].update(book.after_eval(book.model))
    return logs


# ---------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    name: str
    spec: str
    overrides: list[str]
    reference: Callable[[], Textbook]
    # Eval metrics to compare (eval_loss always).
    metrics: tuple[str, ...] = ()


CASES = [
    Case("clm packed", "gpt2_clm.yaml", ["training.packing=true"], lambda: clm_reference(True)),
    Case("clm unpacked", "gpt2_clm.yaml", ["training.packing=false"], lambda: clm_reference(False)),
    Case("mlm", "bert_mlm.yaml", ["training.mlm_probability=0.15"], mlm_reference,
         ("eval_accuracy",)),
    Case("seq2seq", "t5_summarize.yaml",
         ["training.max_target_length=12", "training.generation_max_length=8",
          "training.generation_num_beams=1", "training.source_prefix=summarize: "],
         seq2seq_reference, ("eval_rougeL",)),
    Case("instruction clm", "gpt2_instruct.yaml",
         ["dataset.messages_column=null", "dataset.chat_template=null",
          "dataset.prompt_column=prompt", "dataset.response_column=response",
          "training.packing=false", "training.train_on_prompt=false",
          "training.generation_max_length=4", f"training.max_length={INSTRUCTION_LENGTH}"],
         instruction_reference, ("eval_exact_match",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_orch_equals_a_plain_trainer_script(case: Case, tmp_path: Path) -> None:
    spec, _ = load_spec(JOBS / case.spec, [*COMMON, *case.overrides])
    ours = Logs()
    run_training(spec, tmp_path / "orch", callbacks=[ours])

    set_seed(SEED)
    theirs = run_textbook(case.reference(), tmp_path / "textbook")

    assert sorted(ours.train) == sorted(theirs.train) == list(range(1, STEPS + 1))
    for step, logged in theirs.train.items():
        for key, value in logged.items():
            assert ours.train[step][key] == pytest.approx(value, abs=1e-6), (step, key)
    assert sorted(ours.evals) == sorted(theirs.evals) == [0, STEPS]
    for step, metrics in theirs.evals.items():
        for key in ("eval_loss", *case.metrics):
            assert ours.evals[step][key] == pytest.approx(metrics[key], abs=1e-6), (step, key)
    print(f"{case.name}: losses {json.dumps([round(ours.train[s]['loss'], 4) for s in ours.train])}")
