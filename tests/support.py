"""Helpers shared by the tests: run the real CLI in its own process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAKE_GPUS = 2
FAKE_CPUS = 4


def run_orch(env: dict[str, str], *args: str, timeout: float = 300,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real `orch` CLI in a separate process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"orch {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc
