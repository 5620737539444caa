"""Training objectives: one module per objective behind a small shared interface.

Each module (clm, mlm, seq2seq) provides what `workers.training.run_training` needs:

  trainer_class / args_class      the Trainer and TrainingArguments classes to use
  load_model(spec)                the pretrained model, in float32
  prepare_tokenizer(spec, tok)    fix up / check the tokenizer (pad token, mask token)
  preprocess(spec, tok, train, eval) -> (train, eval)   tokenized datasets
  collator(spec, tok, model)      the batch collator
  compute_metrics(spec, tok)      metrics from predictions (or None: loss only)
  preprocess_logits_for_metrics   shrinks logits before they are accumulated (or None)
  extra_args(spec)                objective-specific TrainingArguments fields

`get_objective(name)` returns the module.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import EvalLoopOutput

from orchestrator import objective_rules
from orchestrator.spec import JobSpec, Objective


class ObjectiveModule(Protocol):
    trainer_class: type[Trainer]
    args_class: type[TrainingArguments]
    preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None

    def load_model(self, spec: JobSpec) -> PreTrainedModel: ...

    def prepare_tokenizer(self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None: ...

    def preprocess(
        self,
        spec: JobSpec,
        tokenizer: PreTrainedTokenizerBase,
        train_ds: Dataset,
        eval_ds: Dataset | None,
    ) -> tuple[Dataset, Dataset | None]: ...

    def collator(
        self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
    ) -> Callable[[list[dict[str, Any]]], dict[str, Any]]: ...

    def compute_metrics(
        self, spec: JobSpec, tokenizer: PreTrainedTokenizerBase
    ) -> Callable[[Any], dict[str, float]] | None: ...

    def extra_args(self, spec: JobSpec) -> dict[str, Any]: ...


def get_objective(name: str | Objective) -> ObjectiveModule:
    """The module implementing objective `name` (clm, mlm or seq2seq)."""
    value = name.value if isinstance(name, Objective) else str(name)
    if value not in {o.value for o in Objective}:
        raise ValueError(
            f"objective: unknown {value!r}; one of {', '.join(o.value for o in Objective)}"
        )
    # Imported lazily: each module pulls in only what its objective needs (rouge, sacrebleu).
    module: ObjectiveModule = importlib.import_module(f"{__name__}.{value}")
    return module


# ---------------------------------------------------------------------------------------
# Helpers shared by the objective modules.


def load_pretrained(auto_class: Any, spec: JobSpec, **kwargs: Any) -> PreTrainedModel:
    # The same rule as the preflight checks: refuse an architecture without a head for the
    # objective before loading (and training) anything.
    if problem := objective_rules.model_problem(spec, AutoConfig.from_pretrained(spec.model)):
        raise ValueError(problem)
    # float32 master weights whatever the checkpoint's dtype (transformers 5 loads "auto"):
    # bf16/fp16 training runs under autocast, and fp32 training needs fp32 weights.
    # adapter.method qlora adds a 4-bit quantization of the (frozen) base.
    from workers.adapters import quantization_kwargs

    return auto_class.from_pretrained(spec.model, dtype=torch.float32,
                                      **{**quantization_kwargs(spec), **kwargs})


def check_tokenizer(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    """What the objective needs from the tokenizer (orchestrator.objective_rules' rule)."""
    if problems := objective_rules.tokenizer_problems(spec, tokenizer):
        raise ValueError("; ".join(problems))


def texts(batch: dict[str, list[Any]], column: str) -> list[str]:
    """The column's values as strings; missing values become empty strings."""
    return ["" if v is None else str(v) for v in batch[column]]


def max_positions(model: PreTrainedModel) -> int | None:
    """How many positions the model can attend to, if its config says (None: unbounded)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def perplexity(loss: float) -> float:
    # exp overflows a float past ~709; a loss that large means "untrained", not infinity.
    return math.exp(min(loss, 100.0))


class PerplexityTrainer(Trainer):
    """A Trainer whose evaluations also report `<prefix>_perplexity` = exp(loss).

    compute_metrics never sees the loss, so it is added here, inside the evaluation loop:
    that way the number is in the logs and in what callbacks get from on_log/on_evaluate.
    """

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        loss = (output.metrics or {}).get(f"{metric_key_prefix}_loss")
        if loss is not None and output.metrics is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(float(loss))
        return output
