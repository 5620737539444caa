"""Run the three example jobs on a local cluster of its own and plot them with `orch plot`:
docs/plot-examples.png (the README shows it).

    python bench/plot_examples.py [--max-steps N] [-o docs/plot-examples.png]

Each job runs with its example's settings, all three submitted at once through
`orch submit --wait`, whose plain progress lines (its output is not a terminal here) show
where each is. `--max-steps N` shortens them all and logs and evaluates proportionally more
often (every N/20 and N/4 steps), so a short run still draws curves. The cluster and the
control plane are the script's own (ports shifted by ORCH_TEST_PORT_OFFSET, CPUs enough for
the three at once) and are stopped at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_env  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ("jobs/gpt2_clm.yaml", "jobs/bert_mlm.yaml", "jobs/t5_summarize.yaml")


def orch(env: dict[str, str], *args: str, timeout: float = 3600) -> str:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"orch {' '.join(args)} exited {proc.returncode}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, help="shorten every job to this many steps")
    parser.add_argument("-o", "--output", default="docs/plot-examples.png")
    args = parser.parse_args()
    import os

    env = {**os.environ, **bench_env()}
    sets: list[str] = []
    if args.max_steps:
        n = args.max_steps
        for key, value in (("max_steps", n), ("logging_steps", max(1, n // 20)),
                           ("eval_steps", max(1, n // 4)), ("save_steps", max(1, n // 2)),
                           ("warmup_steps", max(0, n // 10))):
            sets += ["--set", f"training.{key}={value}"]
    orch(env, "up", "--num-gpus", "1", "--num-cpus", "6", timeout=300)
    try:
        started = time.monotonic()
        runs = [subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "submit", spec, *sets,
                                  "--wait", "-q"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 text=True) for spec in EXAMPLES]
        ids = []
        for spec, run in zip(EXAMPLES, runs, strict=True):
            output, _ = run.communicate(timeout=7200)
            if run.returncode != 0:
                raise SystemExit(f"{spec} did not succeed")
            ids.append(output.split()[0])
            print(f"{spec}: job {ids[-1]} done {time.monotonic() - started:.0f}s after submit",
                  flush=True)
        print(orch(env, "list"), flush=True)
        print(orch(env, "plot", *ids, "-o", args.output), end="")
    finally:
        orch(env, "down", timeout=300)


if __name__ == "__main__":
    main()
