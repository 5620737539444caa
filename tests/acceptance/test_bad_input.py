"""Bad input through the real CLI: a clear one-line error naming the field, a non-zero
exit, no traceback, and nothing written to the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support import FAKE_GPUS, REPO, run_orch

pytestmark = pytest.mark.ray

ASSETS = REPO / "jobs" / "assets"


def base_spec() -> dict:
    return {
        "name": "bad-input",
        "objective": "mlm",
        "model": str(ASSETS / "models" / "bert-tiny"),
        "dataset": {"train_files": [str(ASSETS / "data" / "lm" / "train.jsonl")],
                    "eval_files": [str(ASSETS / "data" / "lm" / "eval.jsonl")]},
        "training": {"max_steps": 2},
    }


def with_changes(**changes: object) -> str:
    spec = base_spec()
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return yaml.safe_dump(spec)


CASES = {
    "malformed_yaml": ("name: [unclosed\nobjective: mlm\n", "malformed YAML"),
    "python_tag": ("!!python/object/apply:os.system ['touch /tmp/orch-pwned']\n",
                   "YAML tag not allowed"),
    "unknown_key": (with_changes(learning_rate=0.1), "learning_rate: unknown key"),
    "unknown_objective": (with_changes(objective="gan"), "objective: must be one of"),
    "negative_gpus": (with_changes(resources__gpus=-1), "resources.gpus: must be >= 0"),
    "fractional_gpus": (with_changes(resources__gpus=0.5), "resources.gpus: must be a whole number"),
    "string_gpus": (with_changes(resources__gpus="one"), "resources.gpus: must be a whole number"),
    "missing_model": (with_changes(model=str(ASSETS / "models" / "no-such-model")), "model: cannot load"),
    "missing_dataset": (with_changes(dataset={"train_files": ["/nonexistent/train.jsonl"],
                                              "eval_fraction": 0.1}),
                        "dataset.train_files: file not found"),
    "missing_column": (with_changes(dataset__text_column="body"),
                       "dataset.text_column: column 'body' not in"),
    "too_many_gpus": (with_changes(resources__gpus=FAKE_GPUS + 1),
                      f"resources.gpus: the job asks for {FAKE_GPUS + 1} GPUs but the whole cluster has"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_spec_is_refused_and_changes_nothing(case: str, tmp_path: Path, orch_env,  # type: ignore[no-untyped-def]
                                                 orch_store) -> None:
    text, expected = CASES[case]
    spec_file = tmp_path / f"{case}.yaml"
    spec_file.write_text(text)
    before = len(orch_store.list_jobs())
    proc = run_orch(orch_env, "submit", str(spec_file))
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert len(orch_store.list_jobs()) == before
    assert not Path("/tmp/orch-pwned").exists()


def test_validate_reports_the_same_problems(tmp_path: Path, orch_env) -> None:  # type: ignore[no-untyped-def]
    spec_file = tmp_path / "cols.yaml"
    spec_file.write_text(with_changes(dataset__text_column="body"))
    proc = run_orch(orch_env, "validate", str(spec_file))
    assert proc.returncode == 1 and "dataset.text_column" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_job_is_a_clear_error(orch_env) -> None:  # type: ignore[no-untyped-def]
    proc = run_orch(orch_env, "status", "999999")
    assert proc.returncode == 1 and "job 999999 not found" in proc.stderr
