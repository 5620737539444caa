"""The step tax: how fast the Trainer trains through orch, against a plain process.

The same fine-tune (same spec, steps and threads) runs three ways, and each reports the
Trainer's own `train_runtime` (its `train()` call: steps, evaluations and saves; not
model loading, not Ray start-up), from which steps/s = max_steps / train_runtime:

- plain: `workers.training.run_training` in a fresh process, no Ray, no store;
- actor: the same call inside a bare Ray actor (num_cpus = the spec's cpus) on a local
         cluster that was left to settle after its start;
- orch:  `orch submit --wait` on the same settled cluster through the control plane (one
         worker: it trains in the Ray Job's entrypoint process, which holds the CPUs);
         train_runtime read back from the store (`orch metrics JOB -o json`).

    python bench/step_tax.py                     # t5_summarize, 1200 steps, 1 round
    python bench/step_tax.py --rounds 2 --set training.max_steps=1500

Rounds interleave the three, each round starting with the next of them (plain, actor,
orch; then actor, orch, plain; ...), so drift on a shared machine hits all alike. A shared
VM's speed drifts by more than the tax over a few minutes, so the tax is taken within each
round (a round's runs follow each other) and the median over rounds is reported; the
ratio of the per-way medians is printed beside it. The last line is `step_tax: X` (orch
steps/s / plain steps/s, median over rounds; 1.0 = no tax).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import bench_env  # noqa: E402

DEFAULT_SETS = ("training.max_steps=1200", "training.epochs=null")


def train_runtime_in_process(spec_file: str, overrides: list[str]) -> dict[str, Any]:
    """Train in this process; the Trainer's train_runtime and the thread settings seen."""
    import torch
    from transformers import TrainerCallback

    from orchestrator.spec import load_spec
    from workers.training import run_training

    class Capture(TrainerCallback):
        runtime = float("nan")

        def on_log(self, args: Any, state: Any, control: Any,
                   logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            if logs and "train_runtime" in logs:
                Capture.runtime = float(logs["train_runtime"])

    spec, _ = load_spec(spec_file, overrides)
    with tempfile.TemporaryDirectory() as out:
        run_training(spec, Path(out), callbacks=[Capture()])
    return {"train_runtime": Capture.runtime, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "affinity": len(os.sched_getaffinity(0)), "pid": os.getpid()}


def run_plain(spec_file: str, overrides: list[str]) -> dict[str, Any]:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench.step_tax import "
            "train_runtime_in_process as t; print('RESULT', json.dumps(t(sys.argv[2], sys.argv[3:])))")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO), spec_file, *overrides], cwd=REPO,
                          capture_output=True, text=True, check=False)
    return _result(proc)


def run_actor(spec_file: str, overrides: list[str]) -> dict[str, Any]:
    """In a fresh driver process: one bare Ray actor holding the spec's CPUs."""
    code = f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
import ray
from orchestrator import cluster
from orchestrator.spec import load_spec
spec, _ = load_spec(sys.argv[1], sys.argv[2:])
ray.init(address=cluster.gcs_address(), logging_level="WARNING")

@ray.remote
class Trainer:
    def run(self, spec_file, overrides):
        sys.path.insert(0, {str(REPO)!r})
        from bench.step_tax import train_runtime_in_process
        return train_runtime_in_process(spec_file, overrides)

actor = Trainer.options(num_cpus=spec.resources.cpus).remote()
print("RESULT", json.dumps(ray.get(actor.run.remote(sys.argv[1], sys.argv[2:]))))
ray.shutdown()
"""
    from orchestrator import cluster

    env = {**os.environ, **cluster.auth_env()}
    proc = subprocess.run([sys.executable, "-c", code, spec_file, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    return _result(proc)


def run_orch(spec_file: str, overrides: list[str]) -> dict[str, Any]:
    sets = [a for o in overrides for a in ("--set", o)]
    orch = [sys.executable, "-m", "orchestrator.cli"]
    submitted = subprocess.run([*orch, "submit", "--wait", "-q", spec_file, *sets], cwd=REPO,
                               capture_output=True, text=True, check=False)
    if submitted.returncode != 0:
        sys.exit(f"orch submit failed ({submitted.returncode}):\n{submitted.stdout}\n{submitted.stderr}")
    job_id = submitted.stdout.split()[0]
    metrics = subprocess.run([*orch, "metrics", job_id, "--name", "train_runtime", "-o", "json"],
                             cwd=REPO, capture_output=True, text=True, check=True)
    values = json.loads(metrics.stdout)["metrics"]
    return {"train_runtime": float(values[-1]["value"]), "job": int(job_id)}


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    sys.exit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="jobs/t5_summarize.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--settle", type=float, default=60,
                        help="seconds the cluster is left alone after `orch up`")
    parser.add_argument("--modes", default="plain,actor,orch")
    args = parser.parse_args()
    overrides = args.overrides if args.overrides is not None else list(DEFAULT_SETS)
    modes = args.modes.split(",")
    os.environ.update(bench_env())
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("ORCH_SERVER_URL", None)
    from orchestrator.spec import load_spec

    spec, _ = load_spec(args.spec, overrides)
    steps = spec.training.max_steps
    assert steps, "step_tax needs training.max_steps (and training.epochs=null)"
    orch = [sys.executable, "-m", "orchestrator.cli"]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    load = [os.getloadavg()[0]]
    try:
        if {"actor", "orch"} & set(modes):
            subprocess.run([*orch, "up"], cwd=REPO, capture_output=True, check=True)
            time.sleep(args.settle)
        for round_ in range(args.rounds):
            # Each round starts with the next way: drift within a round (a shared host
            # slowing down, say) would otherwise always fall on the way that runs last.
            for mode in modes[round_ % len(modes):] + modes[:round_ % len(modes)]:
                run = {"plain": run_plain, "actor": run_actor, "orch": run_orch}[mode]
                result = run(args.spec, overrides)
                runs[mode].append(result)
                load.append(os.getloadavg()[0])
                print(f"{mode}: train_runtime {result['train_runtime']:.1f} s "
                      f"({steps / result['train_runtime']:.2f} steps/s) {result}", flush=True)
    finally:
        subprocess.run([*orch, "down"], cwd=REPO, capture_output=True, check=False)
    rate = {m: steps / statistics.median(r["train_runtime"] for r in runs[m]) for m in modes}
    print(f"\nspec: {args.spec} {' '.join(overrides)}; {args.rounds} round(s); load average "
          f"{min(load):.1f}-{max(load):.1f}")
    print("| run | train_runtime s (each) | steps/s (median) | vs plain |")
    print("|---|---|---|---|")
    for m in modes:
        each = ", ".join(f"{r['train_runtime']:.1f}" for r in runs[m])
        vs = f"{rate[m] / rate['plain']:.3f}" if "plain" in rate else "-"
        print(f"| {m} | {each} | {rate[m]:.2f} | {vs} |")
    if "plain" not in rate:
        return
    for m in modes:
        if m == "plain":
            continue
        each = [p["train_runtime"] / r["train_runtime"] for p, r in zip(runs["plain"], runs[m], strict=True)]
        print(f"{m} / plain within each round: {', '.join(f'{x:.3f}' for x in each)}; "
              f"median {statistics.median(each):.3f} (ratio of medians {rate[m] / rate['plain']:.3f})")
        if m == "orch":
            print(f"step_tax: {statistics.median(each):.3f}")


if __name__ == "__main__":
    main()
