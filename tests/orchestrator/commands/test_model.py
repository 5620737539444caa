"""`orch predict` and `orch export` through the real CLI and a real HTTP control plane, on a
job that really trained (a tiny GPT-2, 6 steps) and whose first checkpoint retention deleted.

The control plane runs in this process (the real app and store; Ray replaced by the test
executor). `--on cluster` is answered by the real inference entrypoint, which the test
executor runs in process instead of as a Ray Job (tests/acceptance/test_predict.py runs it
on a real Ray cluster)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner, Result  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from orchestrator import cli  # noqa: E402
from orchestrator.cluster import Capacity  # noqa: E402
from orchestrator.executor import RayJobInfo, RayStatus  # noqa: E402
from orchestrator.spec import build_spec, load_spec  # noqa: E402
from orchestrator.states import CheckpointKind, JobState  # noqa: E402
from tests.support import AttemptSession, attempt_session, served  # noqa: E402
from workers import attempt, inference  # noqa: E402
from workers.adapters import load_for_inference  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
ASSETS = REPO / "jobs" / "assets"
SMALL = ["training.max_steps=6", "training.save_steps=2", "training.eval_steps=2",
         "training.batch_size=4", "training.max_length=32", "training.warmup_steps=0",
         "training.logging_steps=1", "dataset.max_train_samples=48",
         "dataset.max_eval_samples=8", "checkpoints.keep_last=1"]


@dataclass
class Trained:
    session: AttemptSession
    job_id: int  # trained: a final model, live checkpoints, a deleted one
    failed_id: int  # failed before its first checkpoint
    mlm_id: int  # an mlm job whose final model is the tiny BERT

    def rows(self) -> list[Any]:
        return self.session.store.checkpoints(self.job_id, include_deleted=True)


def _extra_jobs(session: AttemptSession) -> tuple[int, int]:
    store = session.store
    failed = store.create_job(name="broken", objective="clm", owner="tester",
                              spec=session.store.require_job(session.job_id).spec, spec_yaml="",
                              gpus=0, cpus=1, artifact_root=session.root)
    store.transition(failed.id, JobState.FAILED, "bad data", expected=[JobState.QUEUED])
    spec = build_spec({"name": "fill", "objective": "mlm", "model": str(ASSETS / "models" / "bert-tiny"),
                       "dataset": {"train_files": [str(ASSETS / "data" / "lm" / "train.jsonl")]}})
    mlm = store.create_job(name="fill", objective="mlm", owner="tester", spec=spec.to_dict(),
                           spec_yaml="", gpus=0, cpus=1, artifact_root=session.root)
    store.add_checkpoint(mlm.id, attempt=1, step=3, path=str(ASSETS / "models" / "bert-tiny"),
                         size_bytes=1, metrics={}, kind="final")
    return int(failed.id), int(mlm.id)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    tmp = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as env:
        for name in ("ORCH_SERVER_URL", "ORCH_API_TOKEN", "ORCH_AUTH"):
            env.delenv(name, raising=False)
        env.setenv("ORCH_HOME", str(tmp / "home"))
        spec, _ = load_spec(REPO / "jobs" / "gpt2_clm.yaml", SMALL)
        with attempt_session(tmp, spec) as session:
            client = session.client()
            decision = attempt.begin(client, where="here", details={})
            attempt.train(decision, client)
            assert session.store.require_job(session.job_id).state == JobState.SUCCEEDED
            failed, mlm = _extra_jobs(session)
            with served(session.http.app) as url:
                env.setenv("ORCH_SERVER_URL", url)
                env.setenv("ORCH_API_TOKEN", session.http.app.state.local_token)
                yield Trained(session, session.job_id, failed, mlm)


def orch(*args: str) -> Result:
    return CliRunner().invoke(cli.cli, list(args))


def one_line_error(result: Result, *expected: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def greedy(path: str, text: str, new_tokens: int) -> str:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_predict_runs_here_with_the_final_model(trained: Trained) -> None:
    result = orch("predict", str(trained.job_id), "the river", "--max-new-tokens", "5",
                  "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"job_id", "objective", "checkpoint", "where", "predictions"}
    final = next(c for c in trained.rows() if c.kind == CheckpointKind.FINAL)
    assert data["checkpoint"] == {"which": "final", "kind": "final", "step": 6,
                                  "path": final.path}
    assert data["where"] == "local" and data["job_id"] == trained.job_id
    assert data["predictions"] == [{"input": "the river",
                                    "output": greedy(final.path, "the river", 5)}]
    table = orch("predict", str(trained.job_id), "the river", "--max-new-tokens", "5")
    assert table.exit_code == 0 and "final model (step 6), on this machine" in table.stderr
    assert "> the river" in table.stdout


def test_each_checkpoint_choice_names_the_stores_row(trained: Trained) -> None:
    live = [c for c in trained.rows() if not c.deleted and c.kind == CheckpointKind.CHECKPOINT]
    best = next(c for c in live if c.is_best)
    latest = next(c for c in live if c.is_latest)
    for which, row in (("best", best), ("latest", latest), (str(live[0].step), live[0])):
        result = orch("predict", str(trained.job_id), "a", "-c", which, "--max-new-tokens", "2",
                      "-o", "json")
        assert result.exit_code == 0, result.output
        chosen = json.loads(result.stdout)["checkpoint"]
        assert (chosen["kind"], chosen["step"], chosen["path"]) == ("checkpoint", row.step,
                                                                   row.path)


def test_a_model_that_is_not_there_is_one_line(trained: Trained, tmp_path: Path) -> None:
    deleted = next(c for c in trained.rows() if c.deleted)
    assert not Path(deleted.path).exists()
    one_line_error(orch("predict", str(trained.job_id), "x", "-c", str(deleted.step)),
                   f"checkpoint-{deleted.step} of job {trained.job_id} was deleted by retention",
                   "keep_last: 1", "use one of: final (step 6)")
    one_line_error(orch("predict", str(trained.job_id), "x", "-c", "3"),
                   "has no checkpoint at step 3")
    one_line_error(orch("predict", str(trained.job_id), "x", "-c", "newest"),
                   "'newest' is not one of final, best, latest or a step")
    one_line_error(orch("predict", "999999", "x"), "job 999999 not found")
    one_line_error(orch("predict", str(trained.failed_id), "x"),
                   f"job {trained.failed_id} failed before it saved a checkpoint")
    one_line_error(orch("export", str(trained.failed_id), str(tmp_path / "never-made")),
                   "failed before it saved a checkpoint")
    assert not (tmp_path / "never-made").exists()
    one_line_error(orch("predict", str(trained.mlm_id), "no mask in this"),
                   "input 1 has no [MASK] to fill")


def test_inputs_from_a_file_and_bad_files(trained: Trained, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('"the river"\n\n{"text": "a hill"}\n{"input": "the mill", "id": 3}\n')
    result = orch("predict", str(trained.job_id), "--file", str(inputs), "--max-new-tokens", "2",
                  "-o", "json")
    assert result.exit_code == 0, result.output
    assert [p["input"] for p in json.loads(result.stdout)["predictions"]] == [
        "the river", "a hill", "the mill"]
    one_line_error(orch("predict", str(trained.job_id), "--file", str(tmp_path / "none.jsonl")),
                   "none.jsonl: no such file")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    one_line_error(orch("predict", str(trained.job_id), "--file", str(binary)),
                   "cannot read it (not UTF-8 text)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\nnot json\n')
    one_line_error(orch("predict", str(trained.job_id), "--file", str(bad)),
                   "bad.jsonl line 2: not JSON")
    one_line_error(orch("predict", str(trained.job_id)), "give a TEXT to predict from")


def test_predict_on_the_cluster_answers_as_here(trained: Trained, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = trained.session.fake
    one_line_error(orch("predict", str(trained.job_id), "x", "--on", "cluster"),
                   "runs jobs on no Ray cluster")
    launched: list[dict[str, Any]] = []

    def submit_task(submission_id: str, module: str, args: list[str], **kw: Any) -> None:
        """The Ray Job, in process: the real entrypoint with the request it was given."""
        launched.append({"id": submission_id, "module": module, **kw})
        sent = inference.RemoteRequest.decode(args[0])
        assert len(sent.spec["dataset"]["train_files"]) == 1  # no data lists travel
        printed = io.StringIO()
        with redirect_stdout(printed):
            assert inference.main(args) == 0
        fake.statuses[submission_id] = RayJobInfo(RayStatus.SUCCEEDED)
        fake.log_text = "loading...\n" + printed.getvalue()

    monkeypatch.setattr(fake, "submit_task", submit_task, raising=False)
    here = orch("predict", str(trained.job_id), "the river", "--max-new-tokens", "4", "-o", "json")
    there = orch("predict", str(trained.job_id), "the river", "--max-new-tokens", "4",
                 "--on", "cluster", "-o", "json")
    assert there.exit_code == 0, there.output
    assert json.loads(there.stdout) == {**json.loads(here.stdout), "where": "cluster"}
    assert launched[-1]["module"] == "workers.inference" and launched[-1]["gpus"] == 0
    assert launched[-1]["cpus"] == 2 and launched[-1]["id"].startswith(
        f"orch-predict-{trained.job_id}-")
    # A person's mistake on the cluster is one line too.
    one_line_error(orch("predict", str(trained.mlm_id), "no mask", "--on", "cluster"),
                   "input 1 has no [MASK] to fill")
    # What one Ray Job's command line cannot carry is refused before anything starts.
    chat = tmp_path / "chat.jsonl"
    long_chat = [{"role": "user", "content": "word " * 800}] * 40
    chat.write_text(json.dumps({"messages": long_chat}) + "\n")
    started = len(launched)
    one_line_error(orch("predict", str(trained.job_id), "--file", str(chat), "--on", "cluster"),
                   "kB encoded, more than the 120 kB one prediction on the cluster takes")
    # Cluster capacity the jobs hold is not taken from under them.
    plane = trained.session.plane
    capacity = plane.scheduler.capacity
    monkeypatch.setattr(plane.scheduler, "capacity", Capacity(gpus=0, cpus=1, nodes=1))
    one_line_error(orch("predict", str(trained.job_id), "x", "--on", "cluster"),
                   "needs 2 CPUs that no job holds")
    monkeypatch.setattr(plane.scheduler, "capacity", capacity)
    assert len(launched) == started


def test_inputs_go_to_the_cluster_in_requests_it_can_carry() -> None:
    from orchestrator.commands.model import REQUEST_CHARACTERS, request_chunks

    assert [len(c) for c in request_chunks(["a"] * 130)] == [64, 64, 2]
    big = "x" * (REQUEST_CHARACTERS // 3)
    assert [len(c) for c in request_chunks([big] * 7)] == [2, 2, 2, 1]
    assert request_chunks(["y" * REQUEST_CHARACTERS * 2]) == [["y" * REQUEST_CHARACTERS * 2]]


def test_export_loads_with_from_pretrained_and_equals_the_checkpoint(trained: Trained,
                                                                     tmp_path: Path) -> None:
    best = next(c for c in trained.rows() if c.is_best)
    target = tmp_path / "exported"
    result = orch("export", str(trained.job_id), str(target), "--checkpoint", "best")
    assert result.exit_code == 0, result.output
    assert f"checkpoint-{best.step} (best)" in result.stdout
    reference = load_for_inference(best.path, "clm")
    exported = AutoModelForCausalLM.from_pretrained(target).eval()
    ids = AutoTokenizer.from_pretrained(target)("the river flows", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(exported(**ids).logits, reference.model(**ids).logits)
    card = (target / "README.md").read_text()
    store_loss = best.metrics["eval_loss"]
    assert f"| eval_loss | {store_loss:.6g} |" in card and f"job {trained.job_id}" in card
    one_line_error(orch("export", str(trained.job_id), str(target)), "exists and is not empty")
    one_line_error(orch("export", "999999", str(tmp_path / "other")), "job 999999 not found")
    assert not (tmp_path / "other").exists()
