"""What orch costs on top of a plain Hugging Face Trainer run, and where its fixed seconds go.

Runs the same fine-tune (same spec, same steps, same threads) two ways, each in a fresh
process, interleaved, and prints both wall times and a breakdown of each into phases:

- direct: `workers.training.run_training` in-process, without Ray or the store;
- orch:   `orch submit --wait` against an already running local cluster and control
          plane (`orch up` happens first and is timed separately as the cold start).

    python bench/overhead.py                      # t5_summarize, ~1 minute of training
    python bench/overhead.py --spec jobs/gpt2_clm.yaml --set training.max_steps=400

The orch phases come from clocks that exist anyway, all on this machine: the store's
transitions (queued, pending, running, succeeded) and the `at` of the `total_steps` metric
(written and flushed in the Trainer's on_train_begin); the Ray Job's start time (Jobs
API); the training process's own start time (in its `running` event); the Trainer's own
`train_runtime`. The direct phases are timed by the direct process itself.

The last lines are `ratio: X` (orch / direct, medians) and `overhead_s: Y` (orch - direct).
"""

from __future__ import annotations

import argparse
import itertools
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

DEFAULT_SETS = ("training.max_steps=600", "training.epochs=null")
# Phases, in order, of each way; their sum is the wall time.
DIRECT_PHASES = ("interpreter + imports (torch, transformers)", "load model + data, tokenize, Trainer",
                 "train() (the Trainer's train_runtime)", "after train(): final eval, save",
                 "interpreter exit")
# Shown under the phases, not part of their sum: the step-0 evaluation inside train().
EVAL0 = "(of train(): the step-0 evaluation, eval_runtime)"
ORCH_PHASES = ("CLI start, validate, POST, preflight", "admission (queued -> pending)",
               "Ray Job submission accepted", "JobSupervisor start (holding the job's resources), "
               "entrypoint process start", "imports (torch, transformers), spec read -> running",
               "load model + data, tokenize, Trainer",
               "train() (the Trainer's train_runtime)", "after train(): final eval, save, record",
               "CLI notices the end (poll) and exits")


def direct(spec_file: str, overrides: list[str]) -> None:
    """The baseline: the training core alone, no Ray, no store, no control plane. Prints
    its phase times as JSON."""
    import psutil

    born = psutil.Process().create_time()
    from transformers import TrainerCallback

    from orchestrator.spec import load_spec
    from workers.training import run_training

    imported = time.time()
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            marks["train_begin"] = time.time()

        def on_log(self, args: Any, state: Any, control: Any,
                   logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            if logs and "train_runtime" in logs:
                marks["train_runtime"] = float(logs["train_runtime"])
            if logs and "eval_runtime" in logs and state.global_step == 0:
                marks["eval0"] = float(logs["eval_runtime"])

    spec, _ = load_spec(spec_file, overrides)
    with tempfile.TemporaryDirectory() as out:
        metrics = run_training(spec, Path(out), callbacks=[Clock()])
    done = time.time()
    train_end = marks["train_begin"] + marks["train_runtime"]
    print("PHASES", json.dumps({"born": born, "phases": [
        imported - born, marks["train_begin"] - imported, marks["train_runtime"], done - train_end],
        "done": done, "eval0": marks.get("eval0", 0.0),
        "eval": {k: round(v, 4) for k, v in metrics.items()
                               if k in ("eval_loss", "eval_rougeL")}}))


def run_direct(spec: str, sets: list[str], env: dict[str, str]) -> tuple[float, list[float]]:
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--direct", "--spec", spec, *sets], env=env,
                          cwd=REPO, capture_output=True, text=True, check=False)
    end = time.time()
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PHASES ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"direct run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    data = json.loads(line.removeprefix("PHASES "))
    phases = data["phases"]
    phases[0] += data["born"] - start  # the fork and exec before the process existed
    return end - start, [*phases, end - data["done"], data["eval0"]]


def run_orch(spec: str, sets: list[str], env: dict[str, str]) -> tuple[float, list[float]]:
    orch = [sys.executable, "-m", "orchestrator.cli"]
    start = time.time()
    proc = subprocess.run([*orch, "submit", "--wait", "-q", spec, *sets], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    end = time.time()
    if proc.returncode != 0:
        sys.exit(f"orch submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return end - start, orch_phases(int(proc.stdout.split()[0]), start, end)


def orch_phases(job_id: int, start: float, end: float) -> list[float]:
    """The marks of one finished job (the cluster still up), as phase durations."""
    from ray.job_submission import JobSubmissionClient

    from orchestrator import cluster
    from orchestrator.store import Store

    store = Store()
    try:
        at = {e.to_state: e.at.timestamp() for e in store.events(job_id)}
        # The training process (the Ray Job's entrypoint) says when it started.
        process_started = next(e.details["process_started"] for e in store.events(job_id)
                               if e.to_state == "running")
        sid = store.attempts(job_id)[-1].ray_submission_id
        begin = next(m.at.timestamp() for m in store.metrics(job_id, name="total_steps"))
        runtime = store.metrics(job_id, name="train_runtime")[-1].value
        eval0 = next((m.value for m in store.metrics(job_id, name="eval_runtime") if m.step == 0), 0.0)
    finally:
        store.close()
    info = JobSubmissionClient(cluster.target().jobs_url).get_job_info(sid)
    marks = [start, at["queued"], at["pending"], info.start_time / 1000, process_started,
             at["running"], begin, begin + runtime, at["succeeded"], end]
    return [*(b - a for a, b in itertools.pairwise(marks)), eval0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="jobs/t5_summarize.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; medians are reported")
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = args.overrides if args.overrides is not None else list(DEFAULT_SETS)
    if args.direct:
        return direct(args.spec, overrides)

    os.environ.update(bench_env())
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("ORCH_SERVER_URL", None)
    from orchestrator import cluster

    cluster.apply_auth_env()  # before Ray is imported: it reads these once
    env = dict(os.environ)
    orch = [sys.executable, "-m", "orchestrator.cli"]
    sets = [a for o in overrides for a in ("--set", o)]
    load = [os.getloadavg()[0]]
    try:
        started = time.perf_counter()
        subprocess.run([*orch, "up"], env=env, cwd=REPO, capture_output=True, check=True)
        cold = time.perf_counter() - started
        direct_runs, orch_runs = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            direct_runs.append(run_direct(args.spec, sets, env))
            orch_runs.append(run_orch(args.spec, sets, env))
            load.append(os.getloadavg()[0])
    finally:
        subprocess.run([*orch, "down"], env=env, cwd=REPO, capture_output=True, check=False)
    d = statistics.median(w for w, _ in direct_runs)
    o = statistics.median(w for w, _ in orch_runs)
    print(f"spec: {args.spec} {' '.join(overrides)}; load average {min(load):.1f}-{max(load):.1f}")
    print(f"cold start (orch up: local Ray + control plane): {cold:.1f} s")
    for title, names, runs in (("direct", DIRECT_PHASES, direct_runs), ("orch", ORCH_PHASES, orch_runs)):
        print(f"\n| {title}: phase | " + " | ".join(f"run {i + 1} s" for i in range(len(runs)))
              + " | median s |")
        print("|---" * (len(runs) + 2) + "|")
        for i, name in enumerate(names):
            values = [phases[i] for _, phases in runs]
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values)
                  + f" | {statistics.median(values):.1f} |")
        values = [phases[-1] for _, phases in runs]
        print(f"| {EVAL0} | " + " | ".join(f"{v:.1f}" for v in values)
              + f" | {statistics.median(values):.1f} |")
        walls = [w for w, _ in runs]
        print("| **wall** | " + " | ".join(f"{w:.1f}" for w in walls)
              + f" | {statistics.median(walls):.1f} |")
    train = [statistics.median(p[2] for _, p in direct_runs), statistics.median(p[6] for _, p in orch_runs)]
    print(f"\ntrain_runtime: direct {train[0]:.1f} s, orch {train[1]:.1f} s "
          f"(orch steps/s / direct steps/s: {train[0] / train[1]:.3f})")
    print(f"fixed_s (orch wall - orch train_runtime - (direct wall - direct train_runtime)): "
          f"{(o - train[1]) - (d - train[0]):.1f}")
    print(f"direct_s: {d:.1f}")
    print(f"orch_s: {o:.1f}")
    print(f"ratio: {o / d:.3f}")
    print(f"overhead_s: {o - d:.1f}")


if __name__ == "__main__":
    main()
