"""Load a job's train and eval examples with `datasets.load_dataset`.

Sources (exactly one, as JobSpec validates): `dataset.name`, a hub dataset or a local dataset
directory (with `config`, `train_split`, `eval_split`), or `dataset.train_files` /
`dataset.eval_files` (json, jsonl, csv, parquet or txt, text formats optionally compressed;
the builder comes from the extension, see orchestrator.formats).
Eval data comes from eval_files, eval_split or a seeded `eval_fraction` of the train split.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from orchestrator import formats
from orchestrator.errors import SpecError
from orchestrator.sandbox import current_rules
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)


def builder_for(files: list[str]) -> str:
    """The packaged builder for a list of data files (orchestrator.formats' rule)."""
    try:
        return formats.builder_for(files)
    except formats.FormatError as exc:
        raise ValueError(f"dataset files: {exc}") from None


def _from_files(field: str, files: list[str]) -> Dataset:
    # The sandbox rules first: outside them nothing is opened or even looked for.
    rules = current_rules()
    if outside := [p for f in files if (p := rules.check_source(field, f, hub=False))]:
        raise SpecError(outside)
    missing = [f for f in files if "://" not in f and not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"{field}: files not found: {', '.join(missing)}")
    builder = builder_for(files)
    try:
        return load_dataset(builder, data_files=files, split="train")
    except Exception as exc:
        # Not chained: the parser's own message (and so the log's traceback) can quote the
        # file's contents.
        raise ValueError(f"{field}: cannot read {', '.join(files)} as {builder} "
                         f"({type(exc).__name__}); check the files' format") from None


def _from_name(spec: JobSpec, split: str) -> Dataset:
    ds = spec.dataset
    assert ds.name is not None
    if outside := current_rules().check_source("dataset.name", ds.name, urls=False):
        raise SpecError([outside])
    try:
        return _load_named(spec, split)
    except Exception as exc:
        if str(exc).startswith("dataset.name:"):
            raise  # ours, already one line naming the field
        # Not chained, for the same reason as in _from_files.
        raise ValueError(f"dataset.name: cannot load split {split!r} of {ds.name} "
                         f"({type(exc).__name__}); check its splits and files") from None


def _load_named(spec: JobSpec, split: str) -> Dataset:
    ds = spec.dataset
    assert ds.name is not None
    path = Path(ds.name)
    # A directory written by `Dataset.save_to_disk` is not something load_dataset can read.
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        saved = load_from_disk(str(path))
        if isinstance(saved, DatasetDict):
            if split not in saved:
                raise ValueError(
                    f"dataset.name: {ds.name} has splits {', '.join(saved)}; no split {split!r}"
                )
            return saved[split]
        return saved
    return load_dataset(ds.name, ds.config, split=split)


def _check_columns(spec: JobSpec, dataset: Dataset, which: str) -> None:
    for field, column in spec.dataset.columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"{field}: the {which} data has no column {column!r}; its columns are "
                f"{', '.join(dataset.column_names)}. Set {field} to one of them."
            )


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def load_splits(spec: JobSpec) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets for the spec; eval is None when the spec names no eval data."""
    ds = spec.dataset
    if ds.train_files:
        train = _from_files("dataset.train_files", ds.train_files)
        evaluation = _from_files("dataset.eval_files", ds.eval_files) if ds.eval_files else None
    else:
        train = _from_name(spec, ds.train_split)
        evaluation = _from_name(spec, ds.eval_split) if ds.eval_split else None

    if ds.eval_fraction:
        # Split before limiting, so max_train_samples never eats into the held-out part.
        parts = train.train_test_split(test_size=ds.eval_fraction, seed=spec.training.seed)
        train, evaluation = parts["train"], parts["test"]

    _check_columns(spec, train, "train")
    if evaluation is not None:
        _check_columns(spec, evaluation, "eval")
    else:
        log.warning("no eval data (dataset.eval_files, eval_split or eval_fraction): "
                    "training without evaluation")

    train = _limit(train, ds.max_train_samples)
    if evaluation is not None:
        evaluation = _limit(evaluation, ds.max_eval_samples)
    if len(train) == 0:
        raise ValueError("dataset: the train data is empty")
    if evaluation is not None and len(evaluation) == 0:
        raise ValueError("dataset: the eval data is empty")
    return train, evaluation
