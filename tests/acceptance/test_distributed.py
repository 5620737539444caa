"""Data-parallel jobs on CPU through Ray Train: 2 workers (gloo) per job.

- every objective through the CLI, with one voice: one metric row per step, one
  registration per checkpoint, every rank's RNG state inside it;
- a killed worker (rank 1; rank 0 with checkpoints in an s3:// bucket): Ray Train restarts
  the group, which resumes from the latest checkpoint;
- a 2-node cluster (ray.cluster_utils.Cluster, fake GPUs): workers on both nodes, each rank
  trains on distinct samples and together they cover the epoch (seen through a Ray
  worker-process setup hook of the test's own that records what each Trainer trains on).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.support import (
    REPO,
    FakeExecutor,
    assert_each_live_loss_once,
    make_bucket,
    run_orch,
    served,
    wait_until,
)

pytestmark = pytest.mark.ray

SPECS = {"clm": "jobs/gpt2_clm.yaml", "mlm": "jobs/bert_mlm.yaml", "seq2seq": "jobs/t5_summarize.yaml"}
# Tiny: 2 workers x 1 CPU, batches of 2, 4 steps, a checkpoint and an evaluation every 2.
TWO_WORKERS = ["--set", "resources.workers=2", "--set", "resources.cpus=1",
               "--set", "training.batch_size=2", "--set", "training.max_steps=4",
               "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
               "--set", "training.logging_steps=1", "--set", "dataset.max_eval_samples=8"]


def submit(env: dict[str, str], *args: str) -> int:
    return int(run_orch(env, "submit", *args, "-q", check=True).stdout)


def running_event(store, job_id: int) -> str:  # type: ignore[no-untyped-def]
    return next(e.reason for e in store.events(job_id) if e.to_state == "running")


def running_event_details(store, job_id: int) -> dict:  # type: ignore[no-untyped-def]
    return next(e.details for e in store.events(job_id) if e.to_state == "running")


def test_each_objective_trains_on_two_workers(orch_env, orch_store) -> None:  # type: ignore[no-untyped-def]
    jobs = {name: submit(orch_env, path, *TWO_WORKERS) for name, path in SPECS.items()}
    for name, job_id in jobs.items():
        wait_until(lambda job_id=job_id: orch_store.get_job(job_id).state
                   in ("succeeded", "failed"), 600, f"the {name} job")
        job = orch_store.get_job(job_id)
        assert job.state == "succeeded", (name, job.error)
        assert job.cpus == 2 and job.gpus == 0  # the whole job's, what admission counted
        assert "2 workers (ddp, gloo" in running_event(orch_store, job_id)
        # One voice: rank 0 alone reports, once per step.
        per_step = Counter(m.step for m in orch_store.metrics(job_id, name="train_loss"))
        assert sorted(per_step) == [1, 2, 3, 4] and set(per_step.values()) == {1}, per_step
        ckpts = [c for c in orch_store.checkpoints(job_id, include_deleted=True)
                 if c.kind == "checkpoint"]
        assert [c.step for c in ckpts] == [2, 4]
        files = {p.name for p in Path(ckpts[-1].path).iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= files
        assert not (Path(job.artifact_dir) / "checkpoints" / ".partial").exists()
        assert (Path(job.artifact_dir) / "final" / "config.json").is_file()


def kill_rank_until_done(orch_store, job_id: int, rank: int) -> str:  # type: ignore[no-untyped-def]
    """SIGKILL one rank of a 2-worker, 30-step job after its first checkpoint; check Ray Train
    recovered inside the attempt (no new attempt, one restart in the history, every live
    loss once) and return the restart event's words."""
    wait_until(lambda: orch_store.checkpoints(job_id), 300, "the first checkpoint")
    ranks = running_event_details(orch_store, job_id)["ranks"]
    pid = next(r["pid"] for r in ranks if r["rank"] == rank)
    os.kill(pid, signal.SIGKILL)

    wait_until(lambda: orch_store.get_job(job_id).state in ("succeeded", "failed"), 400, "the end")
    job = orch_store.get_job(job_id)
    assert job.state == "succeeded", job.error
    assert [a.outcome for a in orch_store.attempts(job_id)] == ["succeeded"]
    restarts = [e for e in orch_store.events(job_id)
                if "Ray Train restarted the worker group" in e.reason]
    assert len(restarts) == 1, [e.reason for e in orch_store.events(job_id)]
    step = restarts[0].details["resume_step"]
    assert step >= 4 and step % 4 == 0
    # The dead group's losses after step S were superseded when the new group began: one
    # live loss per step, although both groups wrote steps after S in the same attempt.
    assert assert_each_live_loss_once(orch_store, job_id) == list(range(1, 31))
    return restarts[0].reason


RESTARTABLE = [*TWO_WORKERS, "--set", "training.max_steps=30", "--set", "training.save_steps=4",
               "--set", "training.eval_steps=4", "--set", "retries=1"]


def test_killed_worker_restarts_the_group_from_the_latest_checkpoint(orch_env, orch_store) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(orch_env, SPECS["clm"], *RESTARTABLE)
    kill_rank_until_done(orch_store, job_id, rank=1)


def test_killed_rank_0_resumes_from_checkpoints_in_an_object_store(orch_env, orch_store, s3_env,  # type: ignore[no-untyped-def]
                                                                   monkeypatch) -> None:
    """checkpoints.storage is an s3:// URL: every rank uploads its part of each checkpoint;
    rank 0 (the one that reports) is killed and the new group resumes from the bucket."""
    from workers import storage

    for key, value in s3_env.items():  # this process reads the bucket too
        monkeypatch.setenv(key, value)
    bucket = make_bucket(s3_env, "orch-distributed")
    job_id = submit(orch_env, SPECS["clm"], *RESTARTABLE, "--set", f"checkpoints.storage={bucket}/team")
    restart = kill_rank_until_done(orch_store, job_id, rank=0)
    prefix = f"{bucket}/team/{job_id}"
    assert re.search(rf"resuming from step \d+ \({re.escape(prefix)}/checkpoints/checkpoint-\d+\)",
                     restart), restart

    ckpts = orch_store.checkpoints(job_id)  # live ones: the last 2 (keep_last) and the best
    assert ckpts and all(c.path.startswith(prefix) for c in ckpts)
    last = next(c for c in reversed(ckpts) if c.kind == "checkpoint")
    files = set(storage.list_files(last.path))
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "trainer_state.json"} <= files
    final = next(c for c in ckpts if c.kind == "final")
    assert final.path == f"{prefix}/final" and "config.json" in storage.list_files(final.path)
    # The node only staged them; nothing of the checkpoints is left on its disk.
    job = orch_store.get_job(job_id)
    assert not [p for p in (Path(job.artifact_dir) / "checkpoints").rglob("*") if p.is_file()]


def record_samples() -> None:
    """A Ray worker-process setup hook (runtime_env `worker_process_setup_hook`), this test's
    own: every Trainer in the process appends, at each training step, a fingerprint of each
    example it trains on (its token ids without padding, as the dataset holds them) to
    `<ORCH_TEST_SAMPLES>/rank-<rank>.txt`. The workers cannot import the tests: the test
    ships it to them by value (cloudpickle), and patches nothing of orch."""
    import os
    from pathlib import Path

    import torch
    from transformers import Trainer

    train_step = Trainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        rows = [ids[r][mask[r].bool()] if mask is not None else ids[r] for r in range(len(ids))]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out = Path(os.environ["ORCH_TEST_SAMPLES"]) / f"rank-{rank}.txt"
        with out.open("a") as f:
            f.write("".join(",".join(map(str, row.tolist())) + "\n" for row in rows))
        return train_step(self, model, inputs, *args, **kwargs)

    Trainer.training_step = recording_step


def test_two_nodes_spread_workers_and_shard_the_data(tmp_path: Path) -> None:
    """A 2-node local cluster with one fake GPU per node: `gpus: 2, placement: spread`. The
    control plane is served from this process; the driver's part runs here too."""
    import ray
    from fastapi.testclient import TestClient
    from ray import cloudpickle  # Ray's own copy, the one that ships functions to workers
    from ray.cluster_utils import Cluster
    from transformers import AutoTokenizer

    from orchestrator.cluster import Capacity
    from orchestrator.server import ControlPlane, create_app
    from orchestrator.spec import load_spec
    from orchestrator.store import Store
    from workers.control_plane import ControlPlaneClient
    from workers.data import load_splits
    from workers.distributed import run_distributed
    from workers.objectives import get_objective

    record = tmp_path / "samples"
    record.mkdir()
    spec, text = load_spec(REPO / SPECS["clm"], [
        "resources.gpus=2", "resources.cpus=1", "resources.placement=spread",
        f"checkpoints.storage={tmp_path}/shared", "training.max_steps=null", "training.epochs=1",
        "training.packing=false", "dataset.max_train_samples=32", "training.batch_size=4",
        "training.eval_steps=null", "training.save_steps=null", "training.logging_steps=1",
        "dataset.max_eval_samples=8"])
    store = Store(f"sqlite:///{tmp_path}/orch.db")
    fake = FakeExecutor()
    plane = ControlPlane(store, fake, Capacity(gpus=2, cpus=4, nodes=2), interval=3600)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=1)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests
    try:
        with TestClient(create_app(plane)) as local, served(local.app) as url:
            job = store.create_job(name=spec.name, objective="clm", owner="t",
                                   spec=spec.to_dict(), spec_yaml=text, gpus=2, cpus=2,
                                   artifact_root=Path(spec.checkpoints.storage or ""))
            plane.scheduler.tick()
            [launch] = fake.launches
            env = {"ORCH_SERVER_URL": url, "ORCH_ATTEMPT_TOKEN": launch.token,
                   "ORCH_TEST_SAMPLES": str(record), "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1"}
            ray.init(address=cluster.address, runtime_env={
                "env_vars": env, "worker_process_setup_hook": record_samples})
            client = ControlPlaneClient(url, launch.token)
            assert run_distributed(client, gpus=2, cpus=1, workers=2) == 0
        job = store.require_job(job.id)
        assert job.state == "succeeded", job.error
        ranks = running_event_details(store, job.id)["ranks"]
        nodes = {str(r["rank"]): r["node"] for r in ranks}
        print(f"placement: {nodes}")
        assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"]  # one rank per node

        # The epoch's examples, as the job's own preprocessing makes them.
        clm = get_objective("clm")
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
        clm.prepare_tokenizer(spec, tokenizer)
        train, _ = clm.preprocess(spec, tokenizer, *load_splits(spec))
        everything = {",".join(map(str, ids)) for ids in train["input_ids"]}
        seen = [set((record / f"rank-{r}.txt").read_text().splitlines()) for r in (0, 1)]
        assert len(everything) == 32
        assert not seen[0] & seen[1]  # distinct samples on each rank ...
        assert seen[0] | seen[1] == everything  # ... covering the epoch: 32 / (4 x 2) = 4 steps
        assert max(m.step for m in store.metrics(job.id, name="train_loss")) == 4
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()
        cluster.shutdown()
        store.close()
