"""The local server's token, `$ORCH_HOME/api_token`.

With `--auth local` (one person on one machine: the default, and what the CLI starts on
demand) the server answers only requests that carry this token, and the CLI of the same OS
user reads it from the file. Another OS user on the machine can reach the port but cannot
read the file, so cannot drive the server.

The file is made with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600 in one call: it never exists,
even for a moment, with wider permissions, and a file or link planted in its place is never
written through. An existing file is reused only when it is a regular file owned by this
user, with mode 0600, holding a token of the right form; anything else stops the server with
one line saying why, rather than trusting a file someone else may have made or read.

Torch- and FastAPI-free: the CLI reads the token through it.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import ClassVar

from orchestrator.errors import OrchError

TOKEN_FILE = "api_token"


def _token_form() -> re.Pattern[str]:
    # orchestrator.tokens (hashlib, secrets) is imported by the server only: the CLI, which
    # imports this module for read_local_token, never makes or checks a token.
    from orchestrator.tokens import LOCAL_PREFIX

    return re.compile(re.escape(LOCAL_PREFIX) + r"[A-Za-z0-9_-]{43}")


class LocalTokenRefused(OrchError):
    """The token file exists but cannot be trusted; the server does not start."""

    status_code: ClassVar[int] = 500


def token_file(home: Path) -> Path:
    return Path(home) / TOKEN_FILE


def ensure_local_token(home: Path) -> str:
    """The local server's token: made now, or the existing file's if it is safe to reuse."""
    from orchestrator.tokens import LOCAL_PREFIX, new_token

    path = token_file(home)
    token = new_token(LOCAL_PREFIX)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _reuse(path)
    try:
        os.fchmod(fd, 0o600)  # the umask can only have narrowed it; make it exactly 0600
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    return token


def _reuse(path: Path) -> str:
    fix = f"remove {path} and start the server again (it makes a new one)"
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise LocalTokenRefused(f"{path} is not a regular file (a link?); {fix}")
    if info.st_uid != os.getuid():
        raise LocalTokenRefused(f"{path} belongs to uid {info.st_uid}, not to you "
                                f"(uid {os.getuid()}); {fix}")
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o600:
        raise LocalTokenRefused(f"{path} has mode {mode:04o}, not 0600 (others may have read "
                                f"it); {fix}")
    token = _read(path)
    if token is None or not _token_form().fullmatch(token):
        raise LocalTokenRefused(f"{path} does not hold a token orch made; {fix}")
    return token


def read_local_token(home: Path) -> str | None:
    """The token the local server made, for the CLI to send; None when there is none."""
    try:
        return _read(token_file(home))
    except OSError:
        return None


def _read(path: Path) -> str | None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        text = os.read(fd, 4096).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    return text or None
