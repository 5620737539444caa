"""The job spec: one validated object that flows from the YAML file to the worker.

`load_spec(path, overrides)` is the only way in: YAML through `yaml.safe_load`, overrides
applied as `dotted.key=value`, then pydantic models that forbid unknown keys. Every error
names the field and says how to fix it (`SpecError.problems`).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

# Re-exported: the error load_spec and friends raise.
from orchestrator.errors import SpecError as SpecError
from orchestrator.sandbox import shown


class Objective(str, Enum):
    CLM = "clm"  # causal LM (GPT-style): next-token prediction
    MLM = "mlm"  # masked LM (BERT-style): predict masked tokens
    SEQ2SEQ = "seq2seq"  # encoder-decoder (T5, BART, ...): input text -> target text


# Bounds that hold for every spec (the API's, and the stored row's): no field holds more
# than MAX_TEXT characters or a list more than MAX_LIST entries; counts of steps, samples
# and tokens stay far below where they would overflow anything downstream.
MAX_TEXT = 4096
MAX_LIST = 1000
MAX_STEPS = 10_000_000
MAX_TOKENS = 1_048_576
MAX_BATCH = 65_536
MAX_SAMPLES = 10**12
MAX_WORKERS = 4096
INT32 = 2**31 - 1
MAX_SPEC_BYTES = 1024 * 1024


class _Section(BaseModel):
    # allow_inf_nan=False: NaN and +-Infinity are refused in every float field (JSON cannot
    # store them, and no setting means them).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=MAX_TEXT)


class DatasetSpec(_Section):
    """Where the examples come from and which columns hold the text."""

    # A hub dataset name or a local dataset directory, loaded with `datasets.load_dataset`.
    name: str | None = None
    config: str | None = None
    # Or data files: json/jsonl/csv/parquet/txt (format from the extension).
    train_files: list[str] | None = Field(default=None, max_length=MAX_LIST)
    eval_files: list[str] | None = Field(default=None, max_length=MAX_LIST)
    train_split: str = "train"
    eval_split: str | None = None
    # Held-out fraction of the train split, when no eval files or eval split are given.
    eval_fraction: float | None = Field(default=None, gt=0, lt=1)
    text_column: str = "text"
    # seq2seq only: the column with the target text.
    target_column: str | None = None
    # clm instruction data, instead of text_column: a prompt and a response column (the loss
    # is on the response), or a column of chats (lists of {role, content}; the loss is on
    # the assistant's turns) rendered with the tokenizer's chat template or `chat_template`.
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    # A Jinja chat template (a file relative to the spec, or the template text itself), for
    # tokenizers that have none or to replace theirs.
    chat_template: str | None = None
    max_train_samples: StrictInt | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    max_eval_samples: StrictInt | None = Field(default=None, ge=1, le=MAX_SAMPLES)

    @field_validator("train_files", "eval_files", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.name is None) == (self.train_files is None):
            raise ValueError(
                "give either `name` (a hub dataset or a local dataset dir) or `train_files`"
            )
        if self.eval_files and self.name is not None:
            raise ValueError("`eval_files` goes with `train_files`; with `name` use `eval_split`")
        chosen = [k for k in ("eval_files", "eval_split", "eval_fraction") if getattr(self, k)]
        if len(chosen) > 1:
            raise ValueError(f"choose one way to get eval data, not {' and '.join(chosen)}")
        problems = []
        if (self.prompt_column is None) != (self.response_column is None):
            given, missing = (("prompt_column", "response_column") if self.prompt_column
                              else ("response_column", "prompt_column"))
            problems.append(f"dataset.{missing}: required with dataset.{given} (instruction "
                            "data names a prompt and a response column)")
        if self.messages_column and (self.prompt_column or self.response_column):
            problems.append("dataset.messages_column: give either messages_column (chats) or "
                            "prompt_column + response_column, not both")
        if self.chat_template and not self.messages_column:
            problems.append("dataset.chat_template: only renders dataset.messages_column; "
                            "remove it or name the column of chats")
        if problems:
            raise _Problems(problems)
        return self

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_files or self.eval_split or self.eval_fraction)

    @property
    def instruction(self) -> bool:
        """Instruction data (prompt/response or chats) rather than plain text."""
        return bool(self.prompt_column or self.messages_column)

    @property
    def columns(self) -> dict[str, str]:
        """The columns the job reads, by the field that names them."""
        if self.messages_column:
            named = {"dataset.messages_column": self.messages_column}
        elif self.prompt_column and self.response_column:
            named = {"dataset.prompt_column": self.prompt_column,
                     "dataset.response_column": self.response_column}
        else:
            named = {"dataset.text_column": self.text_column}
        if self.target_column:
            named["dataset.target_column"] = self.target_column
        return named


class ResourcesSpec(_Section):
    # GPUs of the whole job; 0 trains on CPU. gpus > 1 trains data-parallel: one Ray Train
    # worker per GPU.
    gpus: StrictInt = Field(default=0, ge=0, le=MAX_WORKERS)
    # CPUs per worker (with one worker, the job's CPUs).
    cpus: StrictInt = Field(default=1, ge=1, le=MAX_WORKERS)
    # Data-parallel workers. Default: gpus (one per GPU), or 1 on CPU. With gpus > 0 it must
    # equal gpus: each worker holds exactly one GPU.
    workers: StrictInt | None = Field(default=None, ge=1, le=MAX_WORKERS)
    # pack: as few nodes as possible; spread: one worker per node where possible.
    placement: Literal["pack", "spread"] = "pack"

    @model_validator(mode="after")
    def _workers(self) -> ResourcesSpec:
        if self.gpus and self.workers is not None and self.workers != self.gpus:
            raise _Problems([
                f"resources.workers: with gpus > 0 each worker holds one GPU, so workers must "
                f"equal gpus ({self.gpus}) or be left out (got {self.workers})"
            ])
        if self.workers is None:
            self.workers = self.gpus or 1
        return self

    @property
    def num_workers(self) -> int:
        return self.workers or self.gpus or 1

    @property
    def total_cpus(self) -> int:
        """CPUs the whole job holds: what admission counts."""
        return self.cpus * self.num_workers

    @property
    def distributed(self) -> bool:
        return self.num_workers > 1


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class TrainingSpec(_Section):
    # Length of training: exactly one of max_steps or epochs (epochs=1 when neither is given).
    max_steps: StrictInt | None = Field(default=None, ge=1, le=MAX_STEPS)
    epochs: float | None = Field(default=None, gt=0, le=100_000)
    learning_rate: float = Field(default=5e-5, gt=0, le=10)
    batch_size: StrictInt = Field(default=8, ge=1, le=MAX_BATCH)
    eval_batch_size: StrictInt | None = Field(default=None, ge=1, le=MAX_BATCH)
    gradient_accumulation_steps: StrictInt = Field(default=1, ge=1, le=MAX_BATCH)
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    warmup_steps: StrictInt = Field(default=0, ge=0, le=MAX_STEPS)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    # Tokens per example (clm/mlm block size; seq2seq source length).
    max_length: StrictInt = Field(default=128, ge=8, le=MAX_TOKENS)
    # Cadence in optimizer steps; None evaluates/saves at the end only.
    eval_steps: StrictInt | None = Field(default=None, ge=1, le=MAX_STEPS)
    save_steps: StrictInt | None = Field(default=None, ge=1, le=MAX_STEPS)
    logging_steps: StrictInt = Field(default=10, ge=1, le=MAX_STEPS)
    # numpy's seed range: anything else fails in the driver, not here.
    seed: StrictInt = Field(default=42, ge=0, le=2**32 - 1)
    precision: Precision = Precision.FP32
    dataloader_workers: StrictInt = Field(default=0, ge=0, le=256)
    # Data parallelism with more than one worker: ddp replicates the model on every worker;
    # fsdp shards parameters, gradients and optimizer state (models that don't fit one GPU).
    strategy: Literal["ddp", "fsdp"] = "ddp"

    # clm only: true concatenates examples and cuts them into max_length blocks (run_clm
    # style; attention crosses examples inside a block); padding_free concatenates each batch
    # into one row whose positions restart at every example (no attention across examples;
    # needs flash attention on a CUDA GPU).
    packing: StrictBool | Literal["padding_free"] | None = None
    # clm instruction data only: also learn the prompt tokens (default: the response only).
    train_on_prompt: StrictBool | None = None
    # mlm only: fraction of tokens to mask, in (0, 1); defaults to 0.15.
    mlm_probability: float | None = None
    # seq2seq only.
    source_prefix: str | None = None
    max_target_length: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    generation_max_length: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    generation_num_beams: StrictInt | None = Field(default=None, ge=1, le=64)

    @model_validator(mode="after")
    def _length_and_cadence(self) -> TrainingSpec:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give max_steps or epochs, not both")
        if self.save_steps and self.eval_steps and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps "
                f"({self.eval_steps}) so every checkpoint has eval metrics to rank it by"
            )
        return self


# fsspec filesystems that exist inside one process: nothing another process wrote is there.
_PROCESS_LOCAL_PROTOCOLS = ("memory", "async_wrapper", "asyncwrapper", "cached", "blockcache",
                            "filecache", "simplecache")


class CheckpointsSpec(_Section):
    # Keep this many most recent checkpoints (plus the best one).
    keep_last: StrictInt = Field(default=2, ge=1, le=MAX_LIST)
    # Eval metric that picks the best checkpoint, e.g. eval_loss or eval_rougeL.
    best_metric: str = "eval_loss"
    # min or max; by default min for losses/perplexity, max for everything else.
    best_mode: Literal["min", "max"] | None = None
    # Where the job's checkpoints and final model go, as <storage>/<job id>/. Null:
    # $ORCH_HOME/jobs on the control plane's node, which only that node can reach. A path
    # puts the logs there too; a multi-node job needs a shared-filesystem path mounted at
    # the same place on every node. Or an fsspec URL (s3://bucket/prefix, gs://...):
    # checkpoints are staged on each node and uploaded; the logs stay on the driver's node.
    storage: str | None = None

    @field_validator("storage")
    @classmethod
    def _storage_location(cls, value: str | None) -> str | None:
        if value is None or "://" not in value:
            return value
        protocol, rest = value.split("://", 1)
        if protocol in ("file", "local"):
            return rest or "/"  # a plain path: written in place, renamed atomically
        if protocol in _PROCESS_LOCAL_PROTOCOLS:
            raise ValueError(
                f"{protocol}:// lives inside one process, so workers and the control plane "
                "cannot share it; use a shared-filesystem path or an object-store URL such "
                "as s3://bucket/prefix"
            )
        import fsspec

        if protocol not in fsspec.available_protocols():
            raise ValueError(
                f"unknown URL scheme {protocol}:// (got {value!r}); use a shared-filesystem "
                "path or a URL of a filesystem fsspec supports, e.g. s3://bucket/prefix, "
                "gs://bucket/prefix"
            )
        if not rest.strip("/"):
            raise ValueError(f"{value!r} names no bucket; e.g. {protocol}://bucket/prefix")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _default_mode(self) -> CheckpointsSpec:
        if not self.best_metric.startswith("eval_"):
            self.best_metric = f"eval_{self.best_metric}"
        if self.best_mode is None:
            lower_is_better = ("loss", "perplexity")
            self.best_mode = "min" if self.best_metric.endswith(lower_is_better) else "max"
        return self


class AdapterSpec(_Section):
    """Train a small adapter instead of every weight (peft). The base model stays frozen."""

    # lora: low-rank matrices beside the chosen layers of a float base model. qlora: the same
    # on a base loaded in 4 bits (bitsandbytes, NF4), which needs CUDA GPUs.
    method: Literal["lora", "qlora"] = "lora"
    # Rank of the low-rank update; the update is scaled by alpha / r.
    r: StrictInt = Field(default=16, gt=0, le=65536)
    alpha: float = Field(default=32, gt=0, le=1e6)
    # Dropout on the adapter's input, in [0, 1).
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # Names (or dotted name suffixes) of the Linear/Conv1D layers to adapt, or "all-linear";
    # null: the architecture's attention projections (checked against the model at validate).
    target_modules: (Annotated[list[str], Field(max_length=MAX_LIST)] | Literal["all-linear"]
                     | None) = None
    # true: `final` is the adapter merged into the base, a plain full model; false: `final`
    # is the adapter (+ tokenizer), which names its base model.
    merge: StrictBool = False

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all-linear":
            value = [value]
        if isinstance(value, list):
            if not value:
                raise ValueError("empty; name at least one module (e.g. [c_attn]) or leave it "
                                 "null for the architecture's default")
            blank = [v for v in value if not isinstance(v, str) or not v.strip()]
            if blank:
                raise ValueError(f"module names must be non-empty strings (got {blank!r})")
        return value


class MlflowSpec(_Section):
    """Log the job to MLflow: the spec as params, every metric, the final model as an
    artifact; one run per job (its attempts and restarts continue it)."""

    # An MLflow tracking server (http(s)://host:port), a SQLite database (sqlite:///path.db)
    # or a directory (orch keeps a SQLite store, mlflow.db, and the artifacts in it). null:
    # the server's default (ORCH_MLFLOW_TRACKING_URI), else the job's own directory
    # (<job dir>/mlflow). Checked like checkpoints.storage (ORCH_STORAGE_ROOTS).
    tracking_uri: str | None = Field(default=None, min_length=1)
    # The experiment the run goes in; null: the job's name.
    experiment: str | None = Field(default=None, min_length=1, max_length=500)
    # Copy the final model into the run's artifacts (`model/`); false for models kept elsewhere.
    log_model: StrictBool = True


class TrackingSpec(_Section):
    """Where else a job's metrics go, beside orch's store (written by rank 0 only)."""

    # TensorBoard event files in <job dir>/tensorboard (`orch tensorboard JOB`).
    tensorboard: StrictBool = False
    # `mlflow: true` for the defaults, or the settings of MlflowSpec.
    mlflow: MlflowSpec | None = None

    @field_validator("mlflow", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


# Metrics each objective's evaluation produces (names as recorded, with the eval_ prefix).
OBJECTIVE_METRICS: dict[Objective, tuple[str, ...]] = {
    Objective.CLM: ("eval_loss", "eval_perplexity"),
    Objective.MLM: ("eval_loss", "eval_perplexity", "eval_accuracy"),
    Objective.SEQ2SEQ: ("eval_loss", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_bleu"),
}

# clm jobs on instruction data also generate each eval prompt's response (greedy) and
# report the share that matches the reference exactly.
INSTRUCTION_METRICS: tuple[str, ...] = (*OBJECTIVE_METRICS[Objective.CLM], "eval_exact_match")


def reported_metrics(spec: JobSpec) -> tuple[str, ...]:
    """The eval metrics a job reports, by objective (and, for clm, the kind of data)."""
    if spec.objective == Objective.CLM and spec.dataset.instruction:
        return INSTRUCTION_METRICS
    return OBJECTIVE_METRICS[spec.objective]


_OBJECTIVE_ONLY: dict[str, Objective] = {
    "packing": Objective.CLM,
    "train_on_prompt": Objective.CLM,
    "mlm_probability": Objective.MLM,
    "source_prefix": Objective.SEQ2SEQ,
    "max_target_length": Objective.SEQ2SEQ,
    "generation_max_length": Objective.SEQ2SEQ,
    "generation_num_beams": Objective.SEQ2SEQ,
}
# Instruction data: clm only.
_INSTRUCTION_FIELDS = ("prompt_column", "response_column", "messages_column", "chat_template")


class JobSpec(_Section):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    objective: Objective
    # A local HF model dir (config + weights) or a hub model id.
    model: str = Field(min_length=1)
    # Defaults to `model`.
    tokenizer: str | None = None
    dataset: DatasetSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoints: CheckpointsSpec = Field(default_factory=CheckpointsSpec)
    # Parameter-efficient fine-tuning (LoRA / QLoRA); null trains every weight.
    adapter: AdapterSpec | None = None
    # Experiment tracking (TensorBoard, MLflow); null: orch's store only.
    tracking: TrackingSpec | None = None
    # Higher runs first. A 32-bit integer (the store's column).
    priority: StrictInt = Field(default=0, ge=-INT32 - 1, le=INT32)
    # Extra attempts after an infrastructure failure (worker process killed, node or cluster
    # lost); each resumes from the latest checkpoint. Errors in the job itself never retry.
    retries: StrictInt = Field(default=0, ge=0, le=100)

    @model_validator(mode="after")
    def _objective_rules(self) -> JobSpec:
        problems: list[str] = []
        instruction = self.objective == Objective.CLM and self.dataset.instruction
        for key, owner in _OBJECTIVE_ONLY.items():
            if getattr(self.training, key) is None or self.objective == owner:
                continue
            if key == "generation_max_length" and instruction:
                continue  # instruction jobs generate responses for eval_exact_match
            problems.append(
                f"training.{key}: only for objective {owner.value}; remove it "
                f"(objective is {self.objective.value})"
            )
        for key in _INSTRUCTION_FIELDS:
            if getattr(self.dataset, key) is not None and self.objective != Objective.CLM:
                problems.append(
                    f"dataset.{key}: instruction data is only for objective clm; remove it "
                    f"(objective is {self.objective.value})"
                )
        if self.training.train_on_prompt is not None and not self.dataset.instruction:
            problems.append("training.train_on_prompt: only for instruction data "
                            "(dataset.prompt_column or messages_column); remove it")
        if self.training.packing == "padding_free":
            if self.resources.gpus == 0:
                problems.append(
                    "training.packing: padding_free needs flash attention, which only CUDA GPUs "
                    "have (resources.gpus is 0); use packing: true (attention crosses examples "
                    "in a block) or false")
            elif self.training.precision == Precision.FP32:
                problems.append("training.packing: padding_free runs flash attention, which "
                                "needs training.precision bf16 or fp16 (got fp32)")
        if self.objective == Objective.SEQ2SEQ and not self.dataset.target_column:
            problems.append(
                "dataset.target_column: required for seq2seq; name the column with the "
                "target text, e.g. target_column: summary"
            )
        if self.objective != Objective.SEQ2SEQ and self.dataset.target_column:
            problems.append(
                f"dataset.target_column: only for seq2seq; {self.objective.value} learns "
                "from text_column alone, remove it"
            )
        if self.training.strategy == "fsdp" and self.resources.gpus < 2:
            # accelerate's FSDP needs GPUs: on CPU workers it silently trains DDP instead.
            problems.append(
                "training.strategy: fsdp shards the model across GPU workers and needs "
                f"resources.gpus of 2 or more (got {self.resources.gpus}); use ddp"
            )
        p = self.training.mlm_probability
        if p is not None and not 0 < p < 1:
            problems.append(f"training.mlm_probability: must be between 0 and 1 (got {p})")
        if problems:
            raise _Problems(problems)
        # Per-objective defaults, filled in so the stored spec says what actually ran.
        t = self.training
        if self.objective == Objective.CLM and t.packing is None:
            t.packing = False
        if instruction:
            if t.train_on_prompt is None:
                t.train_on_prompt = False
            if t.generation_max_length is None:
                t.generation_max_length = 64
        if self.objective == Objective.MLM and t.mlm_probability is None:
            t.mlm_probability = 0.15
        if self.objective == Objective.SEQ2SEQ:
            if t.source_prefix is None:
                t.source_prefix = ""
            if t.max_target_length is None:
                t.max_target_length = 64
            if t.generation_max_length is None:
                t.generation_max_length = t.max_target_length
            if t.generation_num_beams is None:
                t.generation_num_beams = 1
        if self.tokenizer is None:
            self.tokenizer = self.model
        allowed = reported_metrics(self)
        if self.checkpoints.best_metric not in allowed:
            what = "clm on instruction data" if instruction else self.objective.value
            raise _Problems(
                [
                    f"checkpoints.best_metric: {what} reports "
                    f"{', '.join(allowed)}; pick one of them "
                    f"(got {self.checkpoints.best_metric})"
                ]
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        """A NUL character in any string is refused up front: no path function takes one,
        and PostgreSQL cannot store one in JSON."""
        try:
            found = list(_nul_paths(data, ""))
        except RecursionError:
            raise _Problems(["the spec is nested too deeply; a spec is a few levels of "
                             "keys"]) from None
        if found:
            raise _Problems([f"{where}: holds a NUL character (\\0); remove it"
                             for where in found[:10]])
        return data

    @model_validator(mode="after")
    def _adapter_rules(self) -> JobSpec:
        adapter = self.adapter
        if adapter is None or adapter.method != "qlora":
            return self
        problems = []
        if self.resources.gpus < 1:
            problems.append(
                "adapter.method: qlora loads the base model in 4 bits with bitsandbytes, which "
                f"needs a CUDA GPU; set resources.gpus: 1 or more (got {self.resources.gpus}) "
                "or use method: lora"
            )
        if self.training.strategy == "fsdp":
            problems.append("adapter.method: qlora is not supported with training.strategy fsdp; "
                            "use ddp (every worker holds the 4-bit base) or method: lora")
        if problems:
            raise _Problems(problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def _nul_paths(value: Any, where: str) -> Iterable[str]:
    """Dotted locations of the strings (keys included) holding a NUL, in plain data."""
    if isinstance(value, str):
        if "\0" in value:
            yield where or "spec"
    elif isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and "\0" in key:
                yield here
            yield from _nul_paths(item, here)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nul_paths(item, f"{where}.{index}")


class _Problems(ValueError):
    """Cross-field problems already phrased as `field: message` (raised inside validators)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# ---------------------------------------------------------------------------------------
# Loading


def _format_validation_error(error: ValidationError, model: type[BaseModel]) -> list[str]:
    problems: list[str] = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        kind = item["type"]
        ctx = item.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, _Problems):
            problems.extend(cause.problems)
            continue
        given = item.get("input")
        if kind == "extra_forbidden":
            parent = ".".join(str(p) for p in item["loc"][:-1])
            allowed = _allowed_keys(model, item["loc"][:-1])
            where = f" in {parent}" if parent else ""
            close = difflib.get_close_matches(str(item["loc"][-1]), allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"allowed keys: {', '.join(allowed)}"
            problems.append(f"{loc}: unknown key{where}; {hint}")
        elif kind == "missing":
            problems.append(f"{loc}: required; add it to the spec")
        elif kind in ("enum", "literal_error"):
            problems.append(f"{loc}: must be one of {ctx.get('expected')} (got {shown(given)})")
        elif kind in ("int_type", "int_from_float", "int_parsing"):
            problems.append(f"{loc}: must be a whole number (got {shown(given)}); e.g. "
                            f"{loc.split('.')[-1]}: 2")
        elif kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
            bound = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<",
                     "less_than_equal": "<="}[kind]
            limit = next(iter(ctx.values()), "?")
            problems.append(f"{loc}: must be {bound} {limit} (got {shown(given)})")
        elif kind == "finite_number":
            problems.append(f"{loc}: must be a finite number (got {shown(given)})")
        elif kind == "string_too_long":
            problems.append(f"{loc}: at most {ctx.get('max_length')} characters (got "
                            f"{len(given)}); shorten it")
        elif kind == "too_long":
            problems.append(f"{loc}: at most {ctx.get('max_length')} entries (got "
                            f"{ctx.get('actual_length') or 'more'}); use fewer")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            where = f"{loc}: " if loc else ""
            problems.append(f"{where}{msg} (got {shown(given)})" if kind.endswith("_type") else
                            f"{where}{msg}")
    return problems


def _allowed_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
        # An optional section (`AdapterSpec | None`): the model inside the union.
        current = next((a for a in getattr(current, "__args__", ()) if hasattr(a, "model_fields")),
                       current)
    return sorted(getattr(current, "model_fields", {}))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError([f"{dotted}: cannot set a key inside {part}, which is not a section"])
        node = child
    node[parts[-1]] = value


class _PlainLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, without aliases: a spec is a few dozen plain values, and an
    alias (`*name`) is how a few hundred bytes of YAML expand into gigabytes (the "billion
    laughs"). The first alias stops the parse, before anything is expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.start_mark)
        return super().compose_node(parent, index)


class _AliasRefused(yaml.YAMLError):
    def __init__(self, mark: Any) -> None:
        super().__init__("alias")
        self.problem_mark = mark


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """`training.learning_rate=1e-4` -> ("training.learning_rate", 1e-4). Values are YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise SpecError([f"--set {text!r}: write KEY=VALUE, e.g. --set training.learning_rate=1e-4"])
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except _AliasRefused:
        raise SpecError([f"--set {key}: YAML aliases (*name) are not allowed; write the value "
                         "out"]) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError([f"--set {key}: value is not valid YAML ({exc})"]) from None
    # `prefix=summarize: ` is meant as text: only flow syntax ({...} or [...]) makes a
    # mapping or a list on the command line.
    if isinstance(value, dict) and not raw.strip().startswith("{") or (
        isinstance(value, list) and not raw.strip().startswith("[")
    ):
        value = raw
    # PyYAML reads 1e-4 as a string (YAML 1.1 wants 1.0e-4); people mean the number.
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        value = float(value)
    return key, value


def parse_yaml(text: str, source: str = "spec") -> dict[str, Any]:
    """Parse YAML as plain data. Tags that would build Python objects are refused, and so
    are aliases and texts over MAX_SPEC_BYTES (the server takes no larger request)."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError([f"the file is {len(text)} characters; a spec is at most "
                         f"{MAX_SPEC_BYTES} (a few dozen settings)"], source)
    try:
        data = _load_yaml(text)
    except _AliasRefused as exc:
        line = exc.problem_mark.line + 1
        raise SpecError([f"line {line}: YAML aliases (*name) are not allowed in a spec; write "
                         "the value out where it is used"], source) from None
    except RecursionError:
        raise SpecError(["the YAML is nested too deeply; a spec is a few levels of keys"],
                        source) from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = f" line {mark.line + 1}:" if mark else ""
        raise SpecError(
            [f"{line} YAML tag not allowed ({exc.problem}); a spec holds plain data only".strip()],
            source,
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{where}malformed YAML ({problem})"], source) from None
    if data is None:
        raise SpecError(["the file is empty; a spec needs name, objective, model and dataset"], source)
    if not isinstance(data, dict):
        raise SpecError(
            [f"the top level must be a mapping of keys (name, objective, ...), not {type(data).__name__}"],
            source,
        )
    return data


def build_spec(
    data: dict[str, Any],
    overrides: Iterable[str] = (),
    *,
    base_dir: Path | None = None,
    source: str | None = None,
) -> JobSpec:
    """Validate a parsed spec (plus `--set` overrides); resolve local paths against base_dir."""
    data = json.loads(json.dumps(data, default=str))  # deep copy, plain types only
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    spec = spec_from_dict(data, source)
    if base_dir is not None:
        try:
            spec = resolve_paths(spec, base_dir)
        except SpecError as exc:
            raise SpecError(exc.problems, source) from None
    return spec


def spec_from_dict(data: dict[str, Any], source: str | None = None) -> JobSpec:
    """Validate an already-parsed spec; errors become a SpecError naming each field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc, JobSpec), source) from None


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> tuple[JobSpec, str]:
    """Read, parse and validate a spec file. Returns the spec and the YAML text as given."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"cannot read the spec file ({exc.strerror})"], str(path)) from None
    data = parse_yaml(text, str(path))
    spec = build_spec(data, overrides, base_dir=path.resolve().parent, source=str(path))
    return spec, text


def _local_path(value: str, base_dir: Path) -> str:
    """A path that exists relative to the spec (or looks like a path) becomes absolute.

    Anything else (e.g. `google-t5/t5-small`) stays as given: a hub id.
    """
    expanded = Path(value).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = (base_dir / expanded).resolve()
    if candidate.exists() or value.startswith(("./", "../")) or value.count("/") > 1:
        return str(candidate)
    return value


def resolve_paths(spec: JobSpec, base_dir: Path) -> JobSpec:
    data = spec.to_dict()
    data["model"] = _local_path(spec.model, base_dir)
    data["tokenizer"] = _local_path(spec.tokenizer or spec.model, base_dir)
    ds = data["dataset"]
    for key in ("train_files", "eval_files"):
        if ds.get(key):
            ds[key] = [str((base_dir / Path(f).expanduser()).resolve()) for f in ds[key]]
    if ds.get("name"):
        ds["name"] = _local_path(ds["name"], base_dir)
    if ds.get("chat_template"):
        ds["chat_template"] = _template_text(ds["chat_template"], base_dir)
    storage = data["checkpoints"].get("storage")
    if storage and "://" not in storage:  # a URL is absolute already
        data["checkpoints"]["storage"] = str((base_dir / Path(storage).expanduser()).resolve())
    mlflow = (data.get("tracking") or {}).get("mlflow") or {}
    uri = mlflow.get("tracking_uri")
    if uri and "://" not in uri and not uri.startswith("sqlite:"):  # a directory
        mlflow["tracking_uri"] = str((base_dir / Path(uri).expanduser()).resolve())
    return JobSpec.model_validate(data)


def is_template_text(value: str) -> bool:
    """A chat template given inline (Jinja markup), rather than the path of a file."""
    return "{{" in value or "{%" in value


def _template_text(value: str, base_dir: Path) -> str:
    """dataset.chat_template as the template itself: a file's contents are read here, so the
    spec that travels to the workers carries the template, not a path they may not see."""
    if is_template_text(value):
        return value
    path = (base_dir / Path(value).expanduser()).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([f"dataset.chat_template: cannot read {path} ({exc.strerror}); give a "
                         "Jinja file (relative to the spec) or the template text"]) from None
    if not is_template_text(text):
        raise SpecError([f"dataset.chat_template: {path} holds no Jinja template ({{% ... %}} "
                         "or {{ ... }}); give a chat template file"])
    return text
