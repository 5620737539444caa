"""A job's logs, kept by the control plane: `$ORCH_HOME/jobs/<id>/logs/attempt-<n>.log`.

Each attempt's driver streams everything it and its workers print to the server
(`POST /worker/logs`, authenticated by the attempt's token); the server appends it here, so
`orch logs` works after the job ended and after the Ray cluster is gone, and nothing but
the server writes under its home.

Files are opened with O_NOFOLLOW and the directory may contain no symbolic link: a link
planted in a job's log directory is refused, never followed (neither read from nor appended
to). Directories are 0700 and files 0600.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from orchestrator.errors import Conflict

_CHUNK_LOST = b"\n[orch: %d bytes of this log were lost in transit]\n"


def log_dir(home: Path, job_id: int) -> Path:
    return home / "jobs" / str(job_id) / "logs"


def attempt_log(home: Path, job_id: int, attempt: int) -> Path:
    return log_dir(home, job_id) / f"attempt-{attempt}.log"


def _no_links(path: Path, root: Path) -> None:
    """Refuse a path with a symbolic link anywhere between `root` and itself."""
    current = path
    while current != root and root in current.parents:
        if current.is_symlink():
            raise Conflict(f"refusing {current}: it is a symbolic link")
        current = current.parent


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Conflict(f"refusing {path}: it is a symbolic link") from None
        raise


def append_chunk(home: Path, job_id: int, attempt: int, offset: int, data: bytes) -> int:
    """Write `data`, which starts at byte `offset` of the attempt's log; returns the log's
    size after it. A chunk sent twice (its answer was lost) is written once: what the file
    already holds is skipped. A gap (a chunk lost for good) is marked in the log."""
    path = attempt_log(home, job_id, attempt)
    _no_links(path, home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        if offset > size:
            os.write(fd, _CHUNK_LOST % (offset - size))
        elif offset < size:
            data = data[size - offset:]
        if data:
            os.write(fd, data)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_logs(home: Path, job_id: int) -> str | None:
    """All attempts' logs of a job, oldest attempt first; None when none were written."""
    directory = log_dir(home, job_id)
    _no_links(directory, home)
    if not directory.is_dir():
        return None
    files = sorted((p for p in directory.glob("attempt-*.log") if p.stem[8:].isdigit()),
                   key=lambda p: int(p.stem[8:]))
    if not files:
        return None
    parts = []
    for path in files:
        fd = _open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as fh:
            parts.append(f"===== {path.stem} =====\n")
            parts.append(fh.read().decode(errors="replace"))
    return "".join(parts)
