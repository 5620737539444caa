"""Loading a job's data on a worker: the sandbox rules come before any file is looked at,
and a file that cannot be parsed is named, never quoted."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec import build_spec
from workers.data import load_splits

SECRET = "hunter2-do-not-print"


def spec_for(*files: str):  # type: ignore[no-untyped-def]
    return build_spec({"name": "d", "objective": "clm", "model": "gpt2",
                       "dataset": {"train_files": list(files)}})


def test_files_outside_the_roots_are_refused_before_they_are_looked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = tmp_path / "data"
    allowed.mkdir()
    (tmp_path / "secret.jsonl").write_text(f'{{"text": "{SECRET}"}}\n')
    monkeypatch.setenv("ORCH_DATA_ROOTS", str(allowed))
    messages = []
    for name in ("secret.jsonl", "missing.jsonl"):  # present and missing: the same answer
        with pytest.raises(SpecError) as caught:
            load_splits(spec_for(str(tmp_path / name)))
        messages.append(str(caught.value).replace(name, "X"))
    assert messages[0] == messages[1] and "dataset.train_files: " in messages[0]
    assert SECRET not in messages[0]


def test_a_file_that_cannot_be_parsed_is_named_not_quoted(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(f"text\n{SECRET},\"unclosed\n,,,,{SECRET}\n")
    with pytest.raises(ValueError) as caught:
        load_splits(spec_for(str(bad)))
    assert str(caught.value).startswith(f"dataset.train_files: cannot read {bad} as csv (")
    assert SECRET not in str(caught.value)
    # Not chained either: a logged traceback would print the parser's own message.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
