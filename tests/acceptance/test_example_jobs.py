"""Acceptance: the example jobs run through the real CLI on the session's local Ray cluster.

Each check reads the store's rows and the files on disk, not just the exit code.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from tests.support import REPO, run_orch

pytestmark = pytest.mark.ray

EXAMPLES = {
    "t5_summarize": ("seq2seq", "eval_rougeL"),
    "gpt2_clm": ("clm", "eval_perplexity"),
    "bert_mlm": ("mlm", "eval_accuracy"),
}
# Each example as given, but only as long as it takes to halve its eval loss (measured on
# the tiny models: t5 7.6 -> 2.4 by step 50, gpt2 6.9 -> 2.4 by step 50, bert 7.0 -> 4.1
# at step 150 of a 200-step run); the full runs and their numbers are in docs/benchmarks.md
# (tests/workers/test_training.py runs them with ORCH_EXAMPLE_JOBS=1).
SHORTER = {
    "t5_summarize": ["training.max_steps=60", "training.eval_steps=30", "training.save_steps=30"],
    "gpt2_clm": ["training.max_steps=60", "training.eval_steps=30", "training.save_steps=30"],
    "bert_mlm": ["training.max_steps=360", "training.eval_steps=120",
                 "training.save_steps=120"],
}


def metric_series(store, job_id: int, name: str) -> dict[int, float]:  # type: ignore[no-untyped-def]
    return {m.step: m.value for m in store.metrics(job_id, name=name)}


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_job_runs_to_success_and_learns(example: str, orch_env, orch_store) -> None:  # type: ignore[no-untyped-def]
    objective, headline = EXAMPLES[example]
    sets = [arg for option in SHORTER[example] for arg in ("--set", option)]
    proc = run_orch(orch_env, "submit", f"jobs/{example}.yaml", *sets, "--wait", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = int(proc.stdout.split()[2])
    assert "Traceback" not in proc.stderr

    job = orch_store.get_job(job_id)
    assert job.state == "succeeded" and job.objective == objective
    assert job.owner == getpass.getuser()  # the local server's token is the OS user's
    assert [e.to_state for e in orch_store.events(job_id)] == [
        "queued", "pending", "running", "succeeded"]
    assert job.started_at and job.finished_at and job.finished_at >= job.started_at

    # It learned: final eval loss at most half the untrained model's (step 0).
    losses = metric_series(orch_store, job_id, "eval_loss")
    first, last = losses[0], losses[max(losses)]
    assert max(losses) > 0 and last <= 0.5 * first, losses
    assert metric_series(orch_store, job_id, headline), f"{headline} was not recorded"
    assert metric_series(orch_store, job_id, "train_loss")
    assert metric_series(orch_store, job_id, "learning_rate")
    if objective == "seq2seq":
        rouge = metric_series(orch_store, job_id, "eval_rougeL")
        assert rouge[max(rouge)] >= 2 * rouge[0] and rouge[max(rouge)] > 0, rouge

    # Checkpoints: the registered ones are complete on disk, retention removed the rest.
    spec = json.loads(json.dumps(job.spec))
    keep_last = spec["checkpoints"]["keep_last"]
    ckpts = orch_store.checkpoints(job_id, include_deleted=True)
    live = [c for c in ckpts if c.kind == "checkpoint" and not c.deleted]
    assert 1 <= len(live) <= keep_last + 1
    assert sum(c.is_latest for c in live) == 1 and sum(c.is_best for c in live) == 1
    for c in live:
        assert any(Path(c.path).glob("*.safetensors")) and c.size_bytes > 0
    for c in ckpts:
        if c.deleted:
            assert not Path(c.path).exists()
    final = [c for c in ckpts if c.kind == "final"]
    assert len(final) == 1
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(final[0].path)
    assert AutoTokenizer.from_pretrained(final[0].path)

    # The CLI's views agree with the store.
    status = json.loads(run_orch(orch_env, "status", str(job_id), "-o", "json", check=True).stdout)
    assert status["id"] == job_id and status["state"] == "succeeded"
    assert status["metrics"]["eval_loss"]["value"] == pytest.approx(last)
    metrics = json.loads(run_orch(orch_env, "metrics", str(job_id), "-o", "json", check=True).stdout)
    assert len(metrics["metrics"]) == len(orch_store.metrics(job_id))
    listed = json.loads(run_orch(orch_env, "checkpoints", str(job_id), "-o", "json",
                                 check=True).stdout)
    assert {c["path"] for c in listed["checkpoints"]} == {c.path for c in ckpts if not c.deleted}
    jobs = json.loads(run_orch(orch_env, "list", "-o", "json", check=True).stdout)
    assert job_id in {j["id"] for j in jobs}
    logs = run_orch(orch_env, "logs", str(job_id), check=True).stdout
    assert f"orch job {job_id} attempt 1" in logs


def test_examples_exist_and_validate(orch_env) -> None:  # type: ignore[no-untyped-def]
    for example in EXAMPLES:
        proc = run_orch(orch_env, "validate", f"jobs/{example}.yaml")
        assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stderr
    assert (REPO / "jobs" / "assets" / "make_assets.py").exists()
