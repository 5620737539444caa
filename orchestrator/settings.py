"""Every `ORCH_*` setting in one object, read once per process.

`get_settings()` parses the `ORCH_*` variables the first time it is called and returns the
same frozen `Settings` from then on; nothing else in orch reads them. (The cache is keyed by
the variables' values, so a process that changes them on purpose, such as a test, gets
settings that match.) A bad value stops the process with one line naming the variable
(`SettingsError`), before anything is started or written.

The README's configuration table is generated from the field descriptions here
(`python -m orchestrator.settings`), and a test checks that the two agree.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from orchestrator.errors import SettingsError
from orchestrator.sandbox import parse_roots, parse_schemes, private_dir

# Ray's default worker port range: a Ray client server port inside it collides with a worker.
RAY_WORKER_PORTS = range(10002, 20000)


def _used_by(who: str) -> dict[str, Any]:
    return {"used_by": who}


def _environment() -> dict[str, str]:
    """The `ORCH_*` variables as field values, read as pydantic-settings reads them (names
    case-insensitive, values as written: every field is a scalar or a comma-separated list).

    Read by hand rather than through pydantic-settings: importing that package costs every
    CLI process more CPU than everything else it needs to submit a job."""
    variables = {key.lower(): value for key, value in os.environ.items()}
    fields = Settings.model_fields
    return {name: variables[f"orch_{name}"] for name in fields if f"orch_{name}" in variables}


class Settings(BaseModel):
    """orch's configuration. Field `x` is read from the environment variable `ORCH_X`;
    a value passed to the constructor wins over the variable."""

    # validate_default: defaults go through the validators too (`home` is expanded).
    model_config = ConfigDict(extra="ignore", frozen=True, validate_default=True)

    def __init__(self, **values: Any) -> None:
        super().__init__(**{**_environment(), **values})

    # -- where state lives ----------------------------------------------------------------
    home: Path = Field(
        Path("~/.orch"), json_schema_extra=_used_by("both"),
        description="database, job artifacts (`jobs/<id>/`), server log, local Ray token")
    database_url: str | None = Field(
        None, json_schema_extra=_used_by("server"),
        description="any SQLAlchemy URL, e.g. `postgresql+psycopg://user@db:5432/orch`; "
                    "default `sqlite:///$ORCH_HOME/orch.db`")

    # -- the CLI's way to the control plane -------------------------------------------------
    server_url: str | None = Field(
        None, json_schema_extra=_used_by("CLI"),
        description="a team's orch server; unset: the local server (`orch up` starts it, and so "
                    "do submit, resume, predict and dashboard; the verbs that only read never do)")
    api_token: str | None = Field(
        None, json_schema_extra=_used_by("CLI"),
        description="the token the CLI sends (`Authorization: Bearer`): a user's token for a "
                    "team server; unset: the local server's, read from `$ORCH_HOME/api_token`")

    progress_interval: float = Field(
        30.0, gt=0, json_schema_extra=_used_by("CLI"),
        description="seconds between the plain progress lines `--wait` and `logs --follow` "
                    "print when their output is not a terminal (a file, a pipe, CI)")

    # -- the local cluster and server -------------------------------------------------------
    server_port: int = Field(8770, ge=1, le=65535, json_schema_extra=_used_by("both"),
                             description="port of the local control plane")
    ray_port: int = Field(6390, ge=1, le=65535, json_schema_extra=_used_by("both"),
                          description="GCS port of the local Ray cluster (not 6379: Redis's)")
    ray_dashboard_port: int = Field(8265, ge=1, le=65535, json_schema_extra=_used_by("both"),
                                    description="Jobs API / dashboard port of the local Ray "
                                                "cluster")
    ray_client_port: int = Field(10001, ge=1, le=65535, json_schema_extra=_used_by("both"),
                                 description="Ray client server port of the local cluster; "
                                             "must be outside Ray's worker ports 10002-19999")
    ray_agent_port: int = Field(52365, ge=1, le=65535, json_schema_extra=_used_by("both"),
                                description="dashboard agent port of the local Ray cluster")
    ray_num_gpus: int | None = Field(None, ge=0, json_schema_extra=_used_by("both"),
                                     description="GPUs the local cluster declares (fake GPUs "
                                                 "on a CPU machine exercise GPU scheduling); "
                                                 "default detected")
    ray_num_cpus: int | None = Field(None, ge=1, json_schema_extra=_used_by("both"),
                                     description="CPUs the local cluster declares; default "
                                                 "detected")
    worker_python: str | None = Field(
        None, json_schema_extra=_used_by("server"),
        description="the interpreter Ray Jobs run on the cluster; default the server's own")

    # -- the control plane's policy ---------------------------------------------------------
    auth: Literal["local", "users"] = Field(
        "local", json_schema_extra=_used_by("server"),
        description="`local`: one person (the OS user, as admin); every request needs the "
                    "token the server keeps in `$ORCH_HOME/api_token` (0600), and it listens "
                    "on loopback only; `users`: a team server, every request needs a user's "
                    "token (`orch users`); `orch server --auth` sets it")
    executor: Literal["ray", "noop"] = Field(
        "ray", json_schema_extra=_used_by("server"),
        description="`ray`, or `noop` to measure the control plane alone (jobs succeed at "
                    "once)")
    scheduler_interval: float = Field(2.0, gt=0, le=60, json_schema_extra=_used_by("server"),
                                      description="seconds between scheduler ticks when "
                                                  "nothing wakes it (a submit and every "
                                                  "move of a job's state wake it at once)")
    reconcile_interval: float = Field(2.0, ge=0, le=300, json_schema_extra=_used_by("server"),
                                      description="seconds between asking Ray about each "
                                                  "running job (a lost worker is noticed "
                                                  "within this; workers report their own "
                                                  "outcomes at once)")
    cluster_loss_grace: float = Field(30.0, ge=0, json_schema_extra=_used_by("server"),
                                      description="seconds Ray may be unreachable before "
                                                  "running jobs are retried or failed")
    user_gpu_cap: int | None = Field(None, ge=0, json_schema_extra=_used_by("server"),
                                     description="most GPUs one user's jobs may hold at once "
                                                 "(more waits; a bigger job is refused); a "
                                                 "user's own cap (`orch users add --gpu-cap`) "
                                                 "overrides it; unset: no cap")
    max_priority: int = Field(100, ge=-(2**31), le=2**31 - 1,
                              json_schema_extra=_used_by("server"),
                              description="highest `priority` a job may ask for (a higher one "
                                          "is refused at submit); a user's own limit (`orch "
                                          "users add --max-priority`) overrides it")
    noop_gpus: int = Field(100_000, ge=0, json_schema_extra=_used_by("server"),
                           description="GPUs the `noop` executor pretends to have")
    noop_cpus: int = Field(100_000, ge=0, json_schema_extra=_used_by("server"),
                           description="CPUs the `noop` executor pretends to have")
    # -- what a job spec may touch (orchestrator.sandbox) ----------------------------------
    # Comma-separated lists, split by their validators below (never read as JSON).
    allowed_url_schemes: list[str] = Field(
        ["s3", "gs", "az"], json_schema_extra=_used_by("server"),
        description="URL schemes a spec may use, for checkpoint storage and dataset files "
                    "alike (`webhdfs://`, `ftp://`, `http://` ... are refused: a spec must not "
                    "make the server connect wherever it says)")
    data_roots: list[str] | None = Field(
        None, json_schema_extra=_used_by("server"),
        description="directories (and URL prefixes, e.g. `s3://team-bucket/data`) that a "
                    "spec's dataset files, dataset dirs and model/tokenizer dirs must lie "
                    "under, after resolving `..`, `~` and links; unset: anywhere with `--auth "
                    "local`, only `$ORCH_HOME/data` and `$ORCH_HOME/jobs` with `--auth users`")
    storage_roots: list[str] | None = Field(
        None, json_schema_extra=_used_by("server"),
        description="directories and URL prefixes that `checkpoints.storage` must lie under, "
                    "e.g. `/shared/orch,s3://team-bucket/orch`; unset: anywhere with `--auth "
                    "local`, only `$ORCH_HOME/jobs` with `--auth users`")
    allow_hub: bool = Field(
        True, json_schema_extra=_used_by("server"),
        description="`false` refuses hub ids (`org/model`, hub dataset names): for a server "
                    "with no way to the hub")
    noop_finish: bool = Field(True, json_schema_extra=_used_by("server"),
                              description="`false`: `noop` jobs keep running (holding their "
                                          "GPUs) until cancelled, to exercise caps and "
                                          "cancellation")
    advertised_url: str | None = Field(
        None, json_schema_extra=_used_by("server"),
        description="the URL Ray workers reach this server at, to report on their attempt; "
                    "default `http://127.0.0.1:<port>` (right for a local cluster; a team "
                    "server behind a Service sets its in-cluster address)")

    predict_timeout: float = Field(
        600.0, gt=0, le=86_400, json_schema_extra=_used_by("server"),
        description="seconds `orch predict` may take on the cluster (a Ray Job that loads "
                    "the model and answers) before it is stopped")
    # -- experiment tracking (the spec's `tracking:` section) ------------------------------
    mlflow_tracking_uri: str | None = Field(
        None, json_schema_extra=_used_by("server"),
        description="the MLflow tracking server (or store) for jobs whose `tracking.mlflow` "
                    "names none, e.g. `http://mlflow.internal:5000`; a spec may always use it. "
                    "Unset: such a job logs to a SQLite store in its own directory "
                    "(`<job dir>/mlflow`)")

    # -- set by orch in every Ray Job's environment (not for people to set) -----------------
    attempt_token: str | None = Field(
        None, json_schema_extra=_used_by("worker"),
        description="set by orch for a Ray Job: the attempt's reporting token, good for that "
                    "attempt of that job only")
    ray_gcs_address: str | None = Field(
        None, json_schema_extra=_used_by("worker"),
        description="set by orch for a Ray Job on a local cluster: which cluster to join "
                    "(several may share a machine)")
    report_timeout: float = Field(
        600.0, gt=0, json_schema_extra=_used_by("worker"),
        description="seconds a worker keeps retrying a report while the control plane is "
                    "unreachable before it gives the attempt up")

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        # Absolute: the server changes its working directory at start (sandbox).
        return value.expanduser().absolute()

    @field_validator("database_url")
    @classmethod
    def _absolute_sqlite(cls, value: str | None) -> str | None:
        """A relative SQLite path is relative to where the command started, not to the
        server's working directory (which the server changes at start)."""
        prefix = "sqlite:///"
        if value and value.startswith(prefix) and value[len(prefix):] not in ("", ":memory:"):
            path = value[len(prefix):]
            if not path.startswith("/"):
                return prefix + str(Path(path).absolute())
        return value

    @field_validator("allowed_url_schemes", mode="before")
    @classmethod
    def _schemes(cls, value: Any) -> list[str]:
        return parse_schemes(value)

    @field_validator("data_roots", "storage_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any, info: ValidationInfo) -> list[str] | None:
        schemes = info.data.get("allowed_url_schemes") or []
        return parse_roots(env_name(str(info.field_name)), value, schemes)

    @field_validator("ray_client_port")
    @classmethod
    def _outside_worker_ports(cls, value: int) -> int:
        if value in RAY_WORKER_PORTS:
            raise ValueError(
                f"{value} is inside Ray's worker port range {RAY_WORKER_PORTS.start}-"
                f"{RAY_WORKER_PORTS.stop - 1}, where a worker would take it; pick a port "
                "outside it, e.g. 10001")
        return value

    # -- derived values ---------------------------------------------------------------------
    def home_dir(self) -> Path:
        """`home`, created 0700 on first use (an existing one of ours made private): it
        holds the database, tokens and every job's logs."""
        if self.home not in _PRIVATE or not self.home.is_dir():
            private_dir(self.home)
            _PRIVATE.add(self.home)
        return self.home

    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir()}/orch.db"

    def local_server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


# Homes already made private by this process (home_dir is called on every log write).
_PRIVATE: set[Path] = set()


def env_name(field: str) -> str:
    return f"ORCH_{field.upper()}"


def _one_line(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        name = env_name(str(item["loc"][0])) if item["loc"] else "ORCH_*"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{name}={item.get('input')!r}: {message}")
    return problems


def get_settings() -> Settings:
    """The process's settings, parsed from the environment on first use."""
    return _parse(frozenset((k, v) for k, v in os.environ.items() if k.startswith("ORCH_")))


@functools.lru_cache(maxsize=4)
def _parse(variables: frozenset[tuple[str, str]]) -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


def settings_table() -> str:
    """The README's configuration table, from the field descriptions."""
    rows = ["| variable | default | used by | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, list):
            default = ",".join(default)
        elif isinstance(default, bool):
            default = str(default).lower()
        shown = ("unset" if default is None else f"`{default}`")
        used_by = (field.json_schema_extra or {}).get("used_by", "")  # type: ignore[union-attr]
        rows.append(f"| `{env_name(name)}` | {shown} | {used_by} | {field.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_table())
