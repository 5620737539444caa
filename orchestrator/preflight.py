"""Cheap checks that run before any GPU time is spent (`orch validate`, and at submit).

They use the real loading code (`AutoConfig`/`AutoTokenizer.from_pretrained`, the data
files' own headers) so a spec that passes here fails later only for reasons that need a
full run to find. Each problem names the field and says what to do.

The sandbox rules (orchestrator.sandbox) come first: nothing outside what the operator
allows is opened, or even looked for. And no message quotes what a file holds: a file that
cannot be parsed is named with what kind of file it failed to be, never with its text (a
column list is the one exception: the header of a file the rules allow).
"""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path
from typing import Any

from orchestrator.sandbox import Rules, current_rules
from orchestrator.spec import JobSpec, Objective

_EXTENSIONS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
}


class _Unreadable(ValueError):
    """A data file that is not what its extension says; the message never quotes it."""


def _columns_of_file(path: Path) -> set[str]:
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise _Unreadable(
            f"unsupported file type {path.suffix[:20]!r}; use one of "
            f"{', '.join(sorted(_EXTENSIONS))}"
        )
    if kind == "text":
        return {"text"}  # datasets' text builder yields one column, "text"
    try:
        return _header_columns(path, kind)
    except _Unreadable:
        raise
    except UnicodeDecodeError:
        raise _Unreadable("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _Unreadable(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except csv.Error:
        raise _Unreadable("not a valid CSV file") from None
    except OSError as exc:
        raise _Unreadable(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # pyarrow and friends: their messages may quote the data
        raise _Unreadable(f"not a valid {kind} file ({type(exc).__name__})") from None


def _header_columns(path: Path, kind: str) -> set[str]:
    if kind == "csv":
        with path.open(newline="") as fh:
            return set(next(csv.reader(fh), []))
    if kind == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    with path.open() as fh:
        head = fh.read(1)
        fh.seek(0)
        if head == "[":  # a JSON array of records
            records = json.load(fh)
            if records and not isinstance(records[0], dict):
                raise _Unreadable("a JSON array whose entries are not objects")
            return set(records[0]) if records else set()
        for number, line in enumerate(fh, 1):  # JSON lines: the first non-empty record
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise _Unreadable(f"line {number} is not a JSON object")
                return set(record)
    return set()


def _column_list(columns: set[str]) -> str:
    """A file's column names for a message: the first 20, each cut short."""
    names = sorted(columns)
    listed = ", ".join(n if len(n) <= 40 else n[:37] + "..." for n in names[:20])
    return (listed + (f", ... ({len(names)} in all)" if len(names) > 20 else "")) or "none"


def _check_files(field: str, files: list[str], needed: list[tuple[str, str]]) -> list[str]:
    problems = []
    for name in files:
        if "://" in name:
            continue  # an object-store URL (allowed by the rules): the worker reads it
        path = Path(name)
        if not path.is_file():
            problems.append(f"{field}: file not found: {name}")
            continue
        try:
            columns = _columns_of_file(path)
        except _Unreadable as exc:
            problems.append(f"{field}: cannot read {name}: {exc}")
            continue
        for column_field, column in needed:
            if column not in columns:
                have = _column_list(columns)
                problems.append(
                    f"{column_field}: column {column!r} not in {path.name} (columns: {have}); "
                    "set it to one of them"
                )
    return problems


def check_dataset(spec: JobSpec) -> list[str]:
    ds = spec.dataset
    needed = [("dataset.text_column", ds.text_column)]
    if ds.target_column:
        needed.append(("dataset.target_column", ds.target_column))
    if ds.train_files:
        return _check_files("dataset.train_files", ds.train_files, needed) + _check_files(
            "dataset.eval_files", ds.eval_files or [], needed
        )
    assert ds.name is not None
    local = Path(ds.name)
    if local.is_absolute() and not local.exists():
        return [f"dataset.name: directory not found: {ds.name}"]
    try:
        from datasets import load_dataset_builder

        builder = load_dataset_builder(ds.name, ds.config)
    except Exception as exc:  # datasets raises many kinds; all mean "cannot find it"
        # Its message is left out: it can quote the files it tried to read.
        return [
            f"dataset.name: cannot load {ds.name!r} ({type(exc).__name__}); give a "
            "local dataset dir, data files (train_files), or a hub dataset reachable from here"
        ]
    features = builder.info.features
    if features is None:
        return []  # column names only known after reading data; the worker checks them
    return [
        f"{field}: column {column!r} not in dataset {ds.name!r} "
        f"(columns: {_column_list(set(features))})"
        for field, column in needed
        if column not in features
    ]


def _model_kind_problem(spec: JobSpec, config: Any) -> str | None:
    from transformers.models.auto import modeling_auto as auto

    mapping = {
        Objective.CLM: auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        Objective.MLM: auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        Objective.SEQ2SEQ: auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    }[spec.objective]
    if config.model_type not in mapping:
        return (
            f"model: a {config.model_type!r} model has no {spec.objective.value} head; use a "
            f"model made for {spec.objective.value} or change objective"
        )
    return None


# transformers' lazy module is not thread-safe on first use: concurrent first imports from
# the server's request threads fail with ImportError. The checks are CPU-bound under the
# GIL anyway, so serialising them costs nothing.
_TRANSFORMERS_LOCK = threading.Lock()


def warm_up() -> None:
    """Import what the checks need once, up front (the server calls this at start)."""
    with _TRANSFORMERS_LOCK:
        from transformers import AutoConfig, AutoTokenizer  # noqa: F401


def check_model_and_tokenizer(spec: JobSpec) -> list[str]:
    with _TRANSFORMERS_LOCK:
        return _check_model_and_tokenizer(spec)


def _check_model_and_tokenizer(spec: JobSpec) -> list[str]:
    from transformers import AutoConfig, AutoTokenizer

    problems: list[str] = []
    try:
        config = AutoConfig.from_pretrained(spec.model)
    except Exception as exc:
        return [
            f"model: cannot load {spec.model!r}: not a model directory here and not in the "
            f"hub cache ({type(exc).__name__}); give a local HF model dir or a hub id "
            "reachable from this machine"
        ]
    if kind := _model_kind_problem(spec, config):
        problems.append(kind)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.model)
    except Exception as exc:  # its message can quote a malformed tokenizer file: left out
        problems.append(
            f"tokenizer: cannot load {spec.tokenizer!r} ({type(exc).__name__}); "
            "save the tokenizer with the model or set `tokenizer:`"
        )
        return problems
    if spec.objective == Objective.MLM and tokenizer.mask_token is None:
        problems.append("tokenizer: mlm needs a mask token and this tokenizer has none")
    if spec.objective == Objective.CLM and tokenizer.pad_token is None and (
        tokenizer.eos_token is None
    ):
        problems.append("tokenizer: clm needs a pad token or an eos token to pad with; it has neither")
    if spec.objective == Objective.SEQ2SEQ and tokenizer.pad_token is None:
        problems.append("tokenizer: seq2seq needs a pad token and this tokenizer has none")
    return problems


def check_storage(spec: JobSpec) -> list[str]:
    """An object-store URL in checkpoints.storage: its filesystem package is installed and
    its bucket is visible from here, so a typo fails now, not at the first checkpoint."""
    url = spec.checkpoints.storage
    if not url or "://" not in url:
        return []
    from workers.storage import check_reachable

    if why := check_reachable(url):
        return [f"checkpoints.storage: {why}; install the filesystem's package (e.g. s3fs for "
                "s3://, gcsfs for gs://) and check the bucket name and credentials"]
    return []


def check_adapter(spec: JobSpec, this_machine_trains: bool = True) -> list[str]:
    """An `adapter:` section fits the model (its target modules exist, from the model built
    on the meta device) and, where this machine is the one that trains, this machine (qlora
    needs CUDA and bitsandbytes)."""
    if spec.adapter is None:
        return []
    with _TRANSFORMERS_LOCK:
        from workers.adapters import check_adapter

        return check_adapter(spec, this_machine_trains)


def preflight(spec: JobSpec, rules: Rules | None = None,
              this_machine_trains: bool = True) -> list[str]:
    """All cheap checks; an empty list means the spec is ready to run. The sandbox rules
    (this process's, unless given) come first: while any field reaches outside them, those
    are the only problems reported and nothing is opened. `this_machine_trains`: false on a
    control plane whose cluster is elsewhere, which skips the checks of this machine's GPUs."""
    if outside := (rules or current_rules()).problems(spec):
        return outside
    return (check_dataset(spec) + check_model_and_tokenizer(spec) + check_storage(spec)
            + check_adapter(spec, this_machine_trains))
