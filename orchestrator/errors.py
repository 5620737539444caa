"""One root for every error orch raises on purpose, and the HTTP status each one means.

An `OrchError` is something a person can act on: its message is one line (or, for a spec,
a list of `field: what is wrong; how to fix it` problems). The server turns it into its
`status_code` (a 4xx, or 503 when the cluster is unreachable) in one place
(`orchestrator.server`), and the CLI prints it as one line and exits non-zero. Anything
else that escapes is a bug: a 500 and a logged traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar


class OrchError(Exception):
    """An error for a person: a one-line message, and the HTTP status it maps to."""

    status_code: ClassVar[int] = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ProblemsError(OrchError):
    """Several problems at once, each `where: what is wrong; how to fix it`."""

    status_code: ClassVar[int] = 422

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(self.problems))


class SpecError(ProblemsError):
    """A job spec that cannot be run."""


class SettingsError(ProblemsError):
    """An `ORCH_*` setting with a bad value."""


class InvalidRequest(OrchError):
    """A request (query parameter, body field, stored value) that cannot be accepted."""

    status_code: ClassVar[int] = 422


class Unauthorized(OrchError):
    """No credential, or one the server does not accept."""

    status_code: ClassVar[int] = 401


class Forbidden(OrchError):
    """A valid credential that may not do this."""

    status_code: ClassVar[int] = 403


class NotFound(OrchError):
    status_code: ClassVar[int] = 404


class Conflict(OrchError):
    """The request is valid but the thing is in the wrong state for it (e.g. resuming a
    job that is still running)."""

    status_code: ClassVar[int] = 409


class ClusterError(OrchError):
    """The Ray cluster cannot be reached or started."""

    status_code: ClassVar[int] = 503


class ServerUnreachable(OrchError):
    """The CLI cannot reach (or start) the control plane."""

    status_code: ClassVar[int] = 503


class InvalidTransition(OrchError):
    """The state machine forbids a move the code asked for: a bug in orch, never the
    user's doing, so it is a 500."""

    status_code: ClassVar[int] = 500
