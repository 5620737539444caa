"""Data-parallel scaling on CPU: tokens/s with 1 and 2 workers, and what Ray Train costs
against a plain `torchrun` of the same training.

The same fine-tune (jobs/gpt2_clm.yaml, packed 128-token blocks, no evaluation, one
checkpoint at the end) runs through the shared training core three ways, each worker with
one torch thread:

- plain:     `run_training` in this process, 1 worker (no process group);
- torchrun:  `torchrun --nproc_per_node N` of the same core (gloo);
- raytrain:  a Ray Train `TorchTrainer` with N workers running the same core (what orch's
             data-parallel path runs), on a private local Ray instance.

Tokens/s is measured inside the training loop on rank 0, from the end of step `--warmup`
to the last step: global batch (per-device batch x workers) x block length per step.
Wall time is the whole run, start-up included (process launch, imports, Ray worker group).

    python bench/scaling.py                     # ~4 minutes on 2 CPUs
    python bench/scaling.py --steps 60 --workers 1 2

The last lines are `scaling_1to2: X` (tokens/s with 2 workers / with 1, through Ray Train)
and `raytrain_vs_torchrun: Y` (Ray Train wall time / torchrun wall time, 2 workers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "jobs" / "gpt2_clm.yaml"


def overrides(steps: int, batch: int) -> list[str]:
    return [f"training.max_steps={steps}", f"training.batch_size={batch}",
            "training.eval_steps=null", "training.save_steps=null", "training.logging_steps=1000",
            "dataset.eval_files=null", "resources.cpus=1"]


def train(steps: int, batch: int, warmup: int, out_dir: str) -> dict[str, Any]:
    """One worker's part (any launcher): run the training core, measure on rank 0."""
    import torch
    from transformers import TrainerCallback

    from orchestrator.spec import load_spec
    from workers.training import rank, run_training

    spec, _ = load_spec(SPEC, overrides(steps, batch))
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per worker, whatever the launcher set
    result: dict[str, Any] = {}

    class Throughput(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup:
                result["t0"] = time.perf_counter()
            if state.global_step == state.max_steps:
                world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
                seconds = time.perf_counter() - result.pop("t0")
                tokens = (steps - warmup) * batch * world * spec.training.max_length
                result.update(workers=world, tokens=tokens, train_s=seconds,
                              tokens_per_s=tokens / seconds)

    run_training(spec, Path(out_dir), callbacks=[Throughput()])
    if rank() == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result))
    return result


def _ray_train(config: dict[str, Any]) -> None:
    import ray.train

    out = config["out"] if ray.train.get_context().get_world_rank() == 0 else tempfile.mkdtemp()
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    train(config["steps"], config["batch"], config["warmup"], out)


def run_raytrain(workers: int, steps: int, batch: int, warmup: int, out: str) -> float:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # A private instance (own temp dir): never touches other clusters on the machine.
    ray.init(num_cpus=max(2, workers), include_dashboard=False, _temp_dir="/tmp/orch-bench-ray",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}})
    try:
        started = time.perf_counter()
        TorchTrainer(
            _ray_train,
            train_loop_config={"steps": steps, "batch": batch, "warmup": warmup, "out": out},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=out, name="bench"),
        ).fit()
        return time.perf_counter() - started
    finally:
        ray.shutdown()


def run_torchrun(workers: int, steps: int, batch: int, warmup: int, out: str) -> float:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={workers}", __file__, "--worker",
           "--steps", str(steps), "--batch", str(batch), "--warmup", str(warmup), "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_plain(steps: int, batch: int, warmup: int, out: str) -> float:
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--batch", str(batch),
           "--warmup", str(warmup), "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.worker:
        train(args.steps, args.batch, args.warmup, args.out)
        return

    rows: dict[tuple[str, int], dict[str, Any]] = {}
    runs = [("plain", 1)] + [(m, n) for n in args.workers for m in ("torchrun", "raytrain")]
    for mode, n in runs:
        with tempfile.TemporaryDirectory() as out:
            if mode == "plain":
                wall = run_plain(args.steps, args.batch, args.warmup, out)
            elif mode == "torchrun":
                wall = run_torchrun(n, args.steps, args.batch, args.warmup, out)
            else:
                wall = run_raytrain(n, args.steps, args.batch, args.warmup, out)
            row = json.loads(Path(out, "result.json").read_text())
        row["wall_s"] = wall
        rows[(mode, n)] = row
        print(f"{mode:9s} workers={n}  tokens/s={row['tokens_per_s']:8.0f}  "
              f"train_s={row['train_s']:6.1f}  wall_s={wall:6.1f}", flush=True)
    if ("raytrain", 1) in rows and ("raytrain", 2) in rows:
        scaling = rows[("raytrain", 2)]["tokens_per_s"] / rows[("raytrain", 1)]["tokens_per_s"]
        print(f"scaling_1to2: {scaling:.2f}")
    if ("raytrain", 2) in rows and ("torchrun", 2) in rows:
        ray_row, tr_row = rows[("raytrain", 2)], rows[("torchrun", 2)]
        print(f"raytrain_vs_torchrun_tokens_per_s: "
              f"{ray_row['tokens_per_s'] / tr_row['tokens_per_s']:.2f}")
        print(f"raytrain_vs_torchrun: {ray_row['wall_s'] / tr_row['wall_s']:.2f}")


if __name__ == "__main__":
    main()
