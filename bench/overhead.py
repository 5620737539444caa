"""What orch costs on top of a plain Hugging Face Trainer run.

Runs the same fine-tune (same spec, same steps, same threads) two ways, each in a fresh
process, and prints both wall times:

- direct: `workers.training.run_training` in-process, without Ray or the store;
- orch:   `orch submit --wait` against an already running local cluster and control
          plane (`orch up` happens first and is timed separately as the cold start).

    python bench/overhead.py                      # t5_summarize, ~1 minute of training
    python bench/overhead.py --spec jobs/gpt2_clm.yaml --set training.max_steps=400

The last lines are `ratio: X` (orch / direct) and `overhead_s: Y` (orch - direct).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SETS = ("training.max_steps=600", "training.epochs=null")


def direct(spec_file: str, overrides: list[str]) -> None:
    """The baseline: the training core alone, no Ray, no store, no control plane."""
    from orchestrator.spec import load_spec
    from workers.training import run_training

    spec, _ = load_spec(spec_file, overrides)
    with tempfile.TemporaryDirectory() as out:
        metrics = run_training(spec, Path(out))
    print({k: round(v, 4) for k, v in metrics.items() if k in ("eval_loss", "eval_rougeL")})


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def print_breakdown(home: str) -> None:
    """Where orch's time went, per job, from the transitions the store recorded."""
    from orchestrator.store import Store

    store = Store(f"sqlite:///{home}/orch.db")
    for job in reversed(store.list_jobs()):
        at = {e.to_state: e.at for e in store.events(job.id)}
        steps = [("queued", "pending", "admitted"), ("pending", "running", "Ray Job + driver + actor start"),
                 ("running", "succeeded", "training incl. model load, evals, saves")]
        parts = ", ".join(f"{label} {(at[b] - at[a]).total_seconds():.1f}s" for a, b, label in steps
                          if a in at and b in at)
        print(f"job {job.id}: {parts}")
    store.close()


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

    home = tempfile.mkdtemp(prefix="orch-bench-")
    env = {**os.environ, "ORCH_HOME": home, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "ORCH_SERVER_PORT": "8772", "ORCH_RAY_PORT": "6392", "ORCH_RAY_DASHBOARD_PORT": "8267",
           "ORCH_RAY_CLIENT_PORT": "9021", "ORCH_RAY_AGENT_PORT": "52385"}
    env.pop("RAY_ADDRESS", None)
    env.pop("ORCH_SERVER_URL", None)
    orch = [sys.executable, "-m", "orchestrator.cli"]
    sets = [a for o in overrides for a in ("--set", o)]
    try:
        cold = timed([*orch, "up"], env)
        direct_s, orch_s = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            direct_s.append(timed([sys.executable, __file__, "--direct", "--spec", args.spec,
                                   *sets], env))
            orch_s.append(timed([*orch, "submit", "--wait", args.spec, *sets], env))
    finally:
        subprocess.run([*orch, "down"], env=env, capture_output=True, check=False)
    print_breakdown(home)
    d, o = statistics.median(direct_s), statistics.median(orch_s)
    print(f"spec: {args.spec} {' '.join(overrides)}")
    print(f"cold start (orch up: local Ray + control plane): {cold:.1f} s")
    print(f"direct runs: {', '.join(f'{x:.1f}' for x in direct_s)} s")
    print(f"orch runs:   {', '.join(f'{x:.1f}' for x in orch_s)} s")
    print(f"direct_s: {d:.1f}")
    print(f"orch_s: {o:.1f}")
    print(f"ratio: {o / d:.3f}")
    print(f"overhead_s: {o - d:.1f}")


if __name__ == "__main__":
    main()
