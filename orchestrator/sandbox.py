"""What a job spec may touch: the operator's directories, URL schemes and the hub.

A spec names files and places (`model`, `tokenizer`, `dataset.name`, `dataset.train_files`,
`dataset.eval_files`, `checkpoints.storage`) that the control plane and the workers open
with their own credentials. On a team server that must not reach anything the operator did
not allow, so every such value is checked here, by one set of rules (`Rules`) that the
server applies at submit, `orch validate` applies on the user's machine, and the worker
applies again before it opens anything (the files may have changed since: a path swapped
for a symbolic link).

- A local path is resolved first (`~`, `..` and symbolic links: `os.path.realpath`), then
  must lie under one of the allowed roots (`ORCH_DATA_ROOTS` for what is read,
  `ORCH_STORAGE_ROOTS` for `checkpoints.storage`). The answer for a path outside the roots
  never depends on whether it exists: no existence check runs before this one, so a missing
  and a present file get the same refusal (no oracle).
- A URL must use an allowed scheme (`ORCH_ALLOWED_URL_SCHEMES`) and lie under a URL root:
  a spec must not make the server or the workers connect wherever it says.
- A hub id (`org/model`) is allowed unless `ORCH_ALLOW_HUB=false`.
- An MLflow tracking URI (`tracking.mlflow.tracking_uri`) is written to, like checkpoint
  storage: a directory or `sqlite:///` database under `ORCH_STORAGE_ROOTS`, a server URL
  only of an allowed scheme under a URL root there, or the operator's own
  `ORCH_MLFLOW_TRACKING_URI`.

Nothing here opens a file or imports torch: the server, the CLI and the workers share it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import Conflict, SettingsError, SpecError

if TYPE_CHECKING:
    from orchestrator.settings import Settings
    from orchestrator.spec import JobSpec

# A hub repository id as the hub spells them: `name` or `org/name`.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
# Schemes that name this machine's own files: governed by the directory roots, never URLs.
LOCAL_SCHEMES = ("file", "local")
_SHOWN = 120  # characters of a value an error message quotes at most


def shown(value: object) -> str:
    """A value as an error message quotes it: repr, cut short (a spec can hold 4 KiB)."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 5] + "...'"


def is_url(value: str) -> bool:
    return "://" in value


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower()


def under(path: str, root: str) -> bool:
    """`path` is `root` or inside it (both already resolved)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def url_under(url: str, root: str) -> bool:
    """`url` lies under the URL root: `s3://` (anything of that scheme) or a prefix."""
    scheme, rest = url.split("://", 1)
    root_scheme, root_rest = root.split("://", 1)
    if scheme.lower() != root_scheme.lower():
        return False
    root_rest = root_rest.strip("/")
    return not root_rest or under(rest.strip("/"), root_rest)


@dataclass(frozen=True)
class Rules:
    """The effective rules of one process: explicit roots (the settings, or the defaults of
    the auth mode already filled in)."""

    data_roots: tuple[str, ...]
    storage_roots: tuple[str, ...]
    url_schemes: tuple[str, ...]
    allow_hub: bool
    # The operator's MLflow tracking server (ORCH_MLFLOW_TRACKING_URI): always allowed.
    mlflow_uri: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        schemes = tuple(settings.allowed_url_schemes)
        if settings.auth == "local":
            # One person on their own machine: anything their OS user can read, as before.
            anywhere = ("/", *(f"{s}://" for s in schemes))
            data_default, storage_default = anywhere, anywhere
        else:
            # A team server is closed by default: the server's own data and jobs dirs.
            home = settings.home.expanduser().absolute()
            data_default = (str(home / "data"), str(home / "jobs"))
            storage_default = (str(home / "jobs"),)
        data = settings.data_roots
        storage = settings.storage_roots
        return cls(data_roots=tuple(data) if data is not None else data_default,
                   storage_roots=tuple(storage) if storage is not None else storage_default,
                   url_schemes=schemes, allow_hub=settings.allow_hub,
                   mlflow_uri=settings.mlflow_tracking_uri)

    def worker_env(self) -> dict[str, str]:
        """The rules as the `ORCH_*` variables a worker's settings read: the control plane
        puts them in every Ray Job, so the worker enforces exactly the server's rules."""
        env = {"ORCH_DATA_ROOTS": ",".join(self.data_roots),
               "ORCH_STORAGE_ROOTS": ",".join(self.storage_roots),
               "ORCH_ALLOWED_URL_SCHEMES": ",".join(self.url_schemes),
               "ORCH_ALLOW_HUB": "true" if self.allow_hub else "false"}
        if self.mlflow_uri:  # also the default the worker logs to
            env["ORCH_MLFLOW_TRACKING_URI"] = self.mlflow_uri
        return env

    # -- the checks -----------------------------------------------------------------------
    def check_path(self, field: str, value: str, *, storage: bool = False) -> str | None:
        """Why a local path may not be used for `field` (None: it may)."""
        setting = "ORCH_STORAGE_ROOTS" if storage else "ORCH_DATA_ROOTS"
        roots = [r for r in (self.storage_roots if storage else self.data_roots)
                 if not is_url(r)]
        expanded = os.path.expanduser(value)
        if not os.path.isabs(expanded):
            return (f"{field}: {shown(value)} is a relative path; give an absolute path (the "
                    "CLI makes a spec's paths absolute, relative to the spec file)")
        real = os.path.realpath(expanded)
        if any(under(real, os.path.realpath(root)) for root in roots):
            return None
        allowed = ", ".join(roots) or "none"
        return (f"{field}: {shown(value)} is outside the directories this server allows "
                f"({setting}: {allowed}); use a location under one of them")

    def check_url(self, field: str, value: str, *, storage: bool = False) -> str | None:
        """Why a URL may not be used for `field` (None: it may)."""
        setting = "ORCH_STORAGE_ROOTS" if storage else "ORCH_DATA_ROOTS"
        scheme = scheme_of(value)
        if scheme not in self.url_schemes:
            allowed = ", ".join(f"{s}://" for s in self.url_schemes) or "none"
            return (f"{field}: {scheme}:// URLs are not allowed here (ORCH_ALLOWED_URL_SCHEMES:"
                    f" {allowed}); use a path or a URL of an allowed scheme")
        rest = value.split("://", 1)[1]
        authority = rest.split("/", 1)[0]
        segments = rest.split("/")[1:]
        if "::" in value or "@" in authority or any(c in value for c in "?#\\") or any(
                s in (".", "..") for s in segments) or not authority:
            return (f"{field}: {shown(value)} is not a plain location; write "
                    f"{scheme}://bucket/prefix (no credentials, no ?, #, ::, . or ..)")
        roots = [r for r in (self.storage_roots if storage else self.data_roots) if is_url(r)]
        if any(url_under(value, root) for root in roots):
            return None
        allowed = ", ".join(roots) or "none"
        return (f"{field}: {shown(value)} is outside the URL prefixes this server allows "
                f"({setting}: {allowed}); use a location under one of them")

    def check_hub(self, field: str, value: str) -> str | None:
        if self.allow_hub:
            return None
        return (f"{field}: {shown(value)} is a hub id and this server does not reach the hub "
                "(ORCH_ALLOW_HUB=false); give a local directory under ORCH_DATA_ROOTS")

    def check_source(self, field: str, value: str, *, hub: bool = True,
                     urls: bool = True) -> str | None:
        """Something read: a local path, a URL (when `urls`) or a hub id (when `hub`)."""
        if bad := _control_characters(field, value):
            return bad
        if is_url(value):
            if scheme_of(value) in LOCAL_SCHEMES:
                return self.check_path(field, value.split("://", 1)[1] or "/")
            if not urls:
                return (f"{field}: {shown(value)} is a URL; give a local directory or a hub "
                        "id")
            return self.check_url(field, value)
        expanded = os.path.expanduser(value)
        if not os.path.isabs(expanded) and hub and is_hub_id(value):
            return self.check_hub(field, value)
        return self.check_path(field, value)

    def check_storage(self, value: str) -> str | None:
        field = "checkpoints.storage"
        if bad := _control_characters(field, value):
            return bad
        return self._check_written_location(field, value)

    def _check_written_location(self, field: str, value: str, hint: str = "") -> str | None:
        """A location a job writes to (a path, file://, or a remote URL): the storage roots
        govern it. `hint` is added to a refused URL's line."""
        if is_url(value) and scheme_of(value) not in LOCAL_SCHEMES:
            problem = self.check_url(field, value, storage=True)
            return problem and f"{problem}{hint}"
        path = value.split("://", 1)[1] if is_url(value) else value
        return self.check_path(field, path or "/", storage=True)

    def check_tracking(self, value: str) -> str | None:
        """An MLflow tracking URI: the job writes there, so the storage roots govern it."""
        field = "tracking.mlflow.tracking_uri"
        if bad := _control_characters(field, value):
            return bad
        if self.mlflow_uri and value.rstrip("/") == self.mlflow_uri.rstrip("/"):
            return None  # the operator's own
        if value.startswith("sqlite:"):  # sqlite:///relative.db or sqlite:////absolute.db
            path = value.split(":///", 1)[1] if ":///" in value else ""
            return self.check_path(field, path or "(none)", storage=True)
        default = ("the server's (ORCH_MLFLOW_TRACKING_URI)" if self.mlflow_uri else
                   "the job's own directory")
        return self._check_written_location(
            field, value, f"; or leave tracking_uri out to log to {default}")

    def problems(self, spec: JobSpec) -> list[str]:
        """Every field of `spec` that reaches outside these rules, one line each."""
        found = [self.check_source("model", spec.model, urls=False)]
        if spec.tokenizer and spec.tokenizer != spec.model:
            found.append(self.check_source("tokenizer", spec.tokenizer, urls=False))
        ds = spec.dataset
        if ds.name is not None:
            found.append(self.check_source("dataset.name", ds.name, urls=False))
        for key in ("train_files", "eval_files"):
            for value in getattr(ds, key) or []:
                found.append(self.check_source(f"dataset.{key}", value, hub=False))
        if spec.checkpoints.storage:
            found.append(self.check_storage(spec.checkpoints.storage))
        mlflow = spec.tracking.mlflow if spec.tracking else None
        if mlflow is not None and mlflow.tracking_uri:
            found.append(self.check_tracking(mlflow.tracking_uri))
        return [p for p in found if p]

    def require(self, spec: JobSpec, source: str | None = None) -> None:
        """SpecError (a 422 through the API) unless every field of `spec` is allowed."""
        if problems := self.problems(spec):
            raise SpecError(problems, source)


def _control_characters(field: str, value: str) -> str | None:
    # A NUL byte would make the path functions raise rather than answer.
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"{field}: {shown(value)} holds control characters; give a plain path or URL"
    return None


def current_rules() -> Rules:
    """The rules of this process, from its settings."""
    from orchestrator.settings import get_settings

    return Rules.from_settings(get_settings())


# -- the settings' own checks ---------------------------------------------------------------
def parse_roots(variable: str, value: object, schemes: Iterable[str]) -> list[str] | None:
    """`ORCH_DATA_ROOTS`/`ORCH_STORAGE_ROOTS` as a list: absolute directories (`~` allowed)
    and URL prefixes of allowed schemes. A relative path or a URL of another scheme is a
    ValueError (the settings turn it into one line naming the variable)."""
    if value is None:
        return None
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    roots = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if is_url(item):
            scheme = scheme_of(item)
            if scheme not in schemes:
                raise ValueError(f"{item}: the scheme {scheme}:// is not in "
                                 "ORCH_ALLOWED_URL_SCHEMES; add it there or remove this root")
            roots.append(item.rstrip("/") if item.split("://", 1)[1].strip("/") else
                         f"{scheme}://")
            continue
        path = os.path.expanduser(item)
        if not os.path.isabs(path):
            raise ValueError(f"{item} is a relative path; give absolute directories, "
                             "comma-separated")
        roots.append(os.path.normpath(path))
    return roots


def parse_schemes(value: object) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    schemes = []
    for item in (str(i).strip().lower() for i in items):
        if not item:
            continue
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*", item):
            raise ValueError(f"{item!r} is not a URL scheme; e.g. s3,gs,az")
        if item in LOCAL_SCHEMES:
            raise ValueError(f"{item}:// names local files, which ORCH_DATA_ROOTS and "
                             "ORCH_STORAGE_ROOTS govern; remove it")
        schemes.append(item)
    return schemes


def check_roots_exist(settings: Settings) -> None:
    """At server start: every directory root exists (a typo would refuse every job)."""
    problems = []
    for variable, roots in (("ORCH_DATA_ROOTS", settings.data_roots),
                            ("ORCH_STORAGE_ROOTS", settings.storage_roots)):
        for root in roots or []:
            if not is_url(root) and not os.path.isdir(root):
                problems.append(f"{variable}: {root} is not an existing directory; create it "
                                "or remove it from the list")
    if problems:
        raise SettingsError(problems)


# -- the server process ---------------------------------------------------------------------
def prepare_server(settings: Settings) -> None:
    """What `orch server` does before it opens anything: files it creates are its own
    (umask 077: the database, logs and tokens 0600, directories 0700), `$ORCH_HOME` is 0700,
    the roots exist, and the working directory is an empty one of its own, so that a hub id
    (`org/model`), which the Hugging Face loaders first try as a path relative to the
    working directory, never names a directory the server happens to start in."""
    os.umask(0o077)
    for fd in (1, 2):  # a log file the server writes to (the CLI opens it for a local one)
        with contextlib.suppress(OSError):
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~0o077)
    check_roots_exist(settings)
    home = settings.home_dir()
    rules = Rules.from_settings(settings)
    if settings.auth == "users" and settings.data_roots is None:
        for default in rules.data_roots:
            os.makedirs(default, mode=0o700, exist_ok=True)
    workdir = home / "cwd"
    workdir.mkdir(mode=0o700, exist_ok=True)
    os.chdir(workdir)


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) 0700; an existing directory of ours loses group and
    other access. A shared directory (sticky, like /tmp) or another user's is left alone."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if (info.st_uid == os.geteuid() and info.st_mode & 0o077
            and not info.st_mode & stat.S_ISVTX):
        path.chmod(stat.S_IMODE(info.st_mode) & ~0o077)
    return path


# -- job directories ------------------------------------------------------------------------
@contextmanager
def new_job_dirs() -> Iterator[list[Path]]:
    """Collects the directories `make_job_dir` creates for a job being created; if the
    job's creation fails after that, they are removed again (nothing half-written)."""
    made: list[Path] = []
    try:
        yield made
    except BaseException:
        for path in reversed(made):
            with contextlib.suppress(OSError):  # empty: no one writes into a job not created
                path.rmdir()
        raise


def make_job_dir(path: Path, made: list[Path]) -> None:
    """Create a job's directory, 0700, exclusively: one that already exists (left by an
    earlier database, or planted) is an error, never reused."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise Conflict(f"the job directory {path} already exists (left by an earlier "
                       "database?); orch never reuses one: move it away and submit again"
                       ) from None
    except OSError as exc:
        raise SpecError([f"checkpoints.storage: cannot create the job directory {path} "
                         f"({exc.strerror}); choose a location the server can write"]) from None
    made.append(path)
