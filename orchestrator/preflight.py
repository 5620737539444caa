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
import os
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator import formats, objective_rules
from orchestrator.sandbox import Rules, current_rules
from orchestrator.spec import JobSpec

# How many records of each data file the instruction checks read (shape of the chats, the
# chat template rendering them): enough to catch a wrong format, cheap on any file.
_SAMPLE_RECORDS = 20


class _Unreadable(ValueError):
    """A data file that is not what its extension says; the message never quotes it."""


def _columns_of_file(name: str, builder: str) -> set[str]:
    """formats.columns_of, with any parser's complaint turned into words that say what kind
    of file it failed to be: parsers' own messages can quote the data."""
    try:
        columns = formats.columns_of(name)
    except formats.FormatError:
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
        raise _Unreadable(f"not a valid {builder} file ({type(exc).__name__})") from None
    if not all(isinstance(c, str) for c in columns):
        raise _Unreadable(f"not a {builder} file of records (objects with named columns)")
    return columns


def _column_list(columns: set[str]) -> str:
    """A file's column names for a message: the first 20, each cut short."""
    names = sorted(columns)
    listed = ", ".join(n if len(n) <= 40 else n[:37] + "..." for n in names[:20])
    return (listed + (f", ... ({len(names)} in all)" if len(names) > 20 else "")) or "none"


def _check_files(field: str, files: list[str], spec: JobSpec) -> list[str]:
    problems = []
    for name in files:
        if "://" in name:
            continue  # an object-store URL (allowed by the rules): the worker reads it
        if not Path(name).is_file():
            problems.append(f"{field}: file not found: {name}")
            continue
        try:
            builder, _ = formats.file_format(name)
            columns = _columns_of_file(name, builder)
        except (formats.FormatError, _Unreadable) as exc:
            problems.append(f"{field}: cannot read {name}: {exc}")
            continue
        missing = False
        for column_field, column in spec.dataset.columns.items():
            if column not in columns:
                missing = True
                have = _column_list(columns)
                problems.append(
                    f"{column_field}: column {column!r} not in {Path(name).name} (columns: {have}); "
                    "set it to one of them"
                )
        if spec.dataset.messages_column and not missing:
            problems += _check_messages(name, builder, spec)
    return problems


def _check_messages(name: str, builder: str, spec: JobSpec) -> list[str]:
    """The first records' chats have the shape the chat template expects."""
    column = spec.dataset.messages_column
    if builder not in formats.NESTED_BUILDERS:
        return [f"dataset.messages_column: {Path(name).name} is {builder}, which cannot hold "
                "lists of messages; use json/jsonl or parquet data"]
    try:
        records = formats.read_records(name, _SAMPLE_RECORDS)
    except Exception:  # a parser's message can quote the data: say what failed, not what it read
        return [f"dataset.messages_column: cannot read {name} as {builder} records"]
    assert column is not None  # only called for a spec with a messages column
    for row, record in enumerate(records):
        if why := objective_rules.messages_problem(record.get(column)):
            return [f"dataset.messages_column: row {row} of {Path(name).name}: {why}"]
    return []


# ---------------------------------------------------------------------------------------
# The hub: a name that is not a local directory is a hub id. Without network (a cluster that
# reaches no hub), from_pretrained spends half a minute retrying before it gives up, even
# for an id it has cached; so the local cache is looked at first, and the hub is asked once,
# with a short timeout, only for what is not there.

HUB_TIMEOUT_S = 3.0
_reachable: dict[str, tuple[float, bool]] = {}  # endpoint -> (checked at, answer)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub's endpoint answers at all (any HTTP status), remembered a minute."""
    import httpx
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    checked = _reachable.get(endpoint)
    if checked and time.monotonic() - checked[0] < 60:
        return checked[1]
    try:
        httpx.head(endpoint, timeout=timeout)
        answer = True
    except httpx.HTTPError:
        answer = False
    _reachable[endpoint] = (time.monotonic(), answer)
    return answer


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached(repo_id: str, files: tuple[str, ...], repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, f, repo_type=repo_type), str)
                   for f in files)
    except ValueError:  # not a valid repo id: nothing cached under it
        return False


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~"))


def locate(field: str, name: str, files: tuple[str, ...], repo_type: str = "model",
           offline_var: str = "HF_HUB_OFFLINE") -> tuple[str | None, bool]:
    """Where `name` (a local directory or a hub id) loads from: (problem, local_only).
    local_only: a local directory or a cached hub id, to load without asking the hub."""
    if Path(name).expanduser().is_dir():
        return None, True
    if _looks_like_path(name):
        return f"{field}: cannot load {name!r}: no such directory; give a local HF directory", False
    if _cached(name, files, repo_type):
        return None, True
    fetch = f"pre-fetch it (`hf download {name}` into a cache this machine and the workers share) " \
            "or give a local directory"
    if _hub_offline():
        return (f"{field}: cannot load {name!r}: not in the local HF cache and {offline_var} is "
                f"set, so the hub is not asked; {fetch}"), False
    if not hub_reachable():
        return (f"{field}: cannot load {name!r}: not in the local HF cache and the hub cannot be "
                f"reached from here; set {offline_var}=1 on machines without network and "
                f"{fetch}"), False
    return None, False


def check_dataset(spec: JobSpec) -> list[str]:
    ds = spec.dataset
    if ds.train_files:
        return _check_files("dataset.train_files", ds.train_files, spec) + _check_files(
            "dataset.eval_files", ds.eval_files or [], spec
        )
    assert ds.name is not None
    local = Path(ds.name)
    if local.is_absolute() and not local.exists():
        return [f"dataset.name: directory not found: {ds.name}"]
    if not local.exists():
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes") \
            or _hub_offline()
        if not offline and not hub_reachable():
            return [f"dataset.name: cannot load {ds.name!r}: the hub cannot be reached from "
                    "here; set HF_DATASETS_OFFLINE=1 to use the local datasets cache, or give "
                    "a local dataset dir or data files (train_files)"]
    try:
        from datasets import load_dataset_builder

        builder = load_dataset_builder(ds.name, ds.config)
    except Exception as exc:  # datasets raises many kinds; all mean "cannot find it"
        return [
            # Its message is left out: it can quote the files it tried to read.
            f"dataset.name: cannot load {ds.name!r} ({type(exc).__name__}); give a "
            "local dataset dir, data files (train_files), or a hub dataset reachable from here"
        ]
    features = builder.info.features
    if features is None:
        return []  # column names only known after reading data; the worker checks them
    return [
        f"{field}: column {column!r} not in dataset {ds.name!r} "
        f"(columns: {_column_list(set(features))})"
        for field, column in ds.columns.items()
        if column not in features
    ]


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

    problem, local_only = locate("model", spec.model, ("config.json",))
    if problem:
        return [problem]
    try:
        config = AutoConfig.from_pretrained(spec.model, local_files_only=local_only)
    except Exception as exc:
        return [
            f"model: cannot load {spec.model!r}: no model config there ({type(exc).__name__}); "
            "give a local HF model dir or a hub id reachable from this machine"
        ]
    problems: list[str] = []
    if kind := objective_rules.model_problem(spec, config):
        problems.append(kind)
    name = spec.tokenizer or spec.model
    problem, local_only = locate("tokenizer", name, ("tokenizer_config.json", "tokenizer.json"))
    if problem:
        return [*problems, problem]
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except Exception as exc:  # its message can quote a malformed tokenizer file: left out
        problems.append(
            f"tokenizer: cannot load {name!r} ({type(exc).__name__}); "
            "save the tokenizer with the model or set `tokenizer:`"
        )
        return problems
    problems += objective_rules.tokenizer_problems(spec, tokenizer)
    if not problems and spec.dataset.messages_column:
        problems += _check_template_renders(spec, tokenizer)
    return problems


def _check_template_renders(spec: JobSpec, tokenizer: Any) -> list[str]:
    """The chat template renders the first chat of the train data (a template that fails on
    the data would otherwise fail the job after it started)."""
    files = spec.dataset.train_files or []
    try:
        records = formats.read_records(files[0], 1) if files else []
    except (ValueError, OSError):
        return []  # the data checks report it
    column = spec.dataset.messages_column or ""
    chat = records[0].get(column) if records else None
    if chat is None or objective_rules.messages_problem(chat):
        return []
    try:
        tokenizer.apply_chat_template(chat, tokenize=False,
                                      chat_template=objective_rules.chat_template(spec, tokenizer))
    except Exception as exc:  # jinja2 raises many kinds; all mean "this template fails here"
        return [f"dataset.chat_template: the chat template fails on the first chat of "
                f"{Path(files[0]).name} ({type(exc).__name__}: {exc}); fix the template"]
    return []


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
