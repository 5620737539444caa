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


def alive_actor_names(env: dict[str, str]) -> set[str]:
    """Names of the live Ray actors on the test cluster, read in a fresh process (Ray reads
    its token-auth settings once per process, at import)."""
    code = (
        "from ray.util.state import list_actors\n"
        f"for a in list_actors(address='http://127.0.0.1:{env['ORCH_RAY_DASHBOARD_PORT']}',"
        " filters=[('state', '=', 'ALIVE')]):\n"
        "    print(a.name)\n"
    )
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": f"{env['ORCH_HOME']}/ray/auth_token"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, **auth}, capture_output=True,
                          text=True, timeout=60, check=True)
    return {line for line in proc.stdout.splitlines() if line}
