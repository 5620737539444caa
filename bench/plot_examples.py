"""Run the three example jobs on a local cluster of its own and plot them with `orch plot`:
docs/plot-examples.png (the README shows it).

    python bench/plot_examples.py [--max-steps N] [-o docs/plot-examples.png]

Each job runs with its example's settings (`--max-steps` shortens them all, for a quick
look), one after the other through `orch submit --wait`, whose plain progress lines (its
output is not a terminal here) show where each is. The cluster and the control plane are
the script's own (ports shifted by ORCH_TEST_PORT_OFFSET) and are stopped at the end.
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
    sets = ["--set", f"training.max_steps={args.max_steps}"] if args.max_steps else []
    orch(env, "up", "--num-gpus", "1", timeout=300)
    try:
        ids = []
        for spec in EXAMPLES:
            started = time.monotonic()
            ids.append(orch(env, "submit", spec, *sets, "--wait", "-q").split()[0])
            print(f"{spec}: job {ids[-1]} in {time.monotonic() - started:.0f}s", flush=True)
        print(orch(env, "list"), flush=True)
        print(orch(env, "plot", *ids, "-o", args.output), end="")
    finally:
        orch(env, "down", timeout=300)


if __name__ == "__main__":
    main()
