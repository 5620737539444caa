"""Data file formats: the one rule for which files a job can read, and how.

Shared by the preflight checks (`orch validate`, submit) and the workers' data loading, so
what one accepts the other can load. Torch-free and cheap to import.

A data file's format comes from its extension: json, jsonl, csv, parquet or txt, each read
by the `datasets` packaged builder of that name (txt by `text`, one example per line, in a
column named `text`). The text formats may be compressed as a stream, `.gz`, `.bz2` or
`.xz` after the format's extension (`train.jsonl.gz`); parquet compresses itself.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from itertools import chain
from pathlib import PurePosixPath
from typing import IO, Any

# Extension -> `datasets` packaged builder.
BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
# Stream compressions both `datasets` (its extraction step) and fsspec (reading the header
# here) decompress with the standard library alone.
COMPRESSIONS: dict[str, str] = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
# The builders whose records can hold lists of mappings (chat messages).
NESTED_BUILDERS = ("json", "parquet")
# The column datasets' text builder yields.
TEXT_COLUMN = "text"


class FormatError(ValueError):
    """A data file orch cannot read; the message says what would work."""


def _supported() -> str:
    names = ", ".join(ext.lstrip(".") for ext in BUILDERS)
    packed = "/".join(ext.lstrip(".") for ext in COMPRESSIONS)
    return f"{names} (text formats may end in .{packed}: train.jsonl.gz)"


def file_format(name: str) -> tuple[str, str | None]:
    """(builder, compression or None) for a data file name or URL."""
    suffixes = [s.lower() for s in PurePosixPath(name.split("?", 1)[0]).suffixes]
    wrapper = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    compression = COMPRESSIONS[wrapper] if wrapper else None
    if wrapper:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    builder = BUILDERS.get(ext)
    if builder is None:
        raise FormatError(f"cannot tell the format of {name!r}; use one of {_supported()}")
    if compression and builder == "parquet":
        raise FormatError(f"{name!r}: parquet files are compressed inside; give the .parquet "
                          f"file itself, without {wrapper}")
    return builder, compression


def builder_for(files: Iterable[str]) -> str:
    """The packaged builder for a list of data files; all must share one format."""
    kinds = {file_format(f)[0] for f in files}
    if len(kinds) > 1:
        raise FormatError(f"mixed formats ({', '.join(sorted(kinds))}); use one format")
    if not kinds:
        raise FormatError("no data files given")
    return kinds.pop()


def _open_text(name: str, compression: str | None) -> IO[str]:
    import fsspec

    return fsspec.open(name, "rt", compression=compression, encoding="utf-8").open()


def _json_records(fh: IO[str], limit: int) -> list[dict[str, Any]]:
    first = fh.read(1)
    while first.isspace():
        first = fh.read(1)
    if first == "[":  # a JSON array of records: the whole file is one document
        records = json.loads(first + fh.read())
        if any(not isinstance(r, dict) for r in records[:limit]):
            raise FormatError("a JSON array whose entries are not objects (records)")
        return list(records[:limit])
    out: list[dict[str, Any]] = []
    for number, line in enumerate(chain([first + fh.readline()], fh), 1):  # JSON lines
        if len(out) >= limit:
            break
        if line.strip():
            record = json.loads(line)
            if not isinstance(record, dict):
                # Named by its line only: the value itself may be anything, secrets included.
                raise FormatError(f"line {number} is not a JSON object")
            out.append(record)
    return out


def read_records(name: str, limit: int = 20) -> list[dict[str, Any]]:
    """The first `limit` records of a data file, as the builder would yield them."""
    builder, compression = file_format(name)
    if builder == "parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(name).iter_batches(batch_size=limit)
        first = next(batches, None)
        return first.to_pylist() if first is not None else []
    with _open_text(name, compression) as fh:
        if builder == "text":
            return [{TEXT_COLUMN: line.rstrip("\n")} for _, line in zip(range(limit), fh, strict=False)]
        if builder == "csv":
            return [dict(row) for _, row in zip(range(limit), csv.DictReader(fh), strict=False)]
        return _json_records(fh, limit)


def columns_of(name: str) -> set[str]:
    """The column names a data file yields, read from its header or first record."""
    builder, compression = file_format(name)
    if builder == "text":
        return {TEXT_COLUMN}
    if builder == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(name).names)
    if builder == "csv":
        with _open_text(name, compression) as fh:
            return set(next(csv.reader(fh), []))
    records = read_records(name, limit=1)
    return set(records[0]) if records else set()
