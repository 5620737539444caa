"""Where orch keeps its state: a home directory and the database URL."""

from __future__ import annotations

import os
from pathlib import Path


def orch_home() -> Path:
    """`$ORCH_HOME` (default `~/.orch`), created on first use."""
    home = Path(os.environ.get("ORCH_HOME") or "~/.orch").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def database_url() -> str:
    """`$ORCH_DATABASE_URL`, else a SQLite file in `orch_home()`."""
    return os.environ.get("ORCH_DATABASE_URL") or f"sqlite:///{orch_home()}/orch.db"


def executor_kind() -> str:
    """`ORCH_EXECUTOR`: `ray` (default), or `noop` to measure the control plane alone."""
    kind = os.environ.get("ORCH_EXECUTOR", "ray")
    if kind not in ("ray", "noop"):
        raise ValueError(f"ORCH_EXECUTOR={kind!r}: use ray or noop")
    return kind
