"""The `orch` command line. Thin: it validates specs, then talks to the control plane.

A user's mistake ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from orchestrator.client import Client, dump
from orchestrator.commands.users import users
from orchestrator.errors import InvalidRequest, OrchError, SpecError

# What a command needs beyond click is imported inside it: the api models (pydantic), the
# spec (pydantic, yaml), rich (tables, colour) and the HTTP client's httpx cost a CLI
# process far more CPU than the command itself, and each command needs only some of them
# (`orch --help` none, `orch submit -q` no rich). tests/orchestrator/test_cli_imports.py
# keeps it so.
if TYPE_CHECKING:
    from rich.console import Console

    from orchestrator.api import JobDetail, JobSummary

TERMINAL = {"succeeded", "failed", "cancelled"}
# C0 and C1 control characters but tab and newline: an ANSI escape in a job's name, owner
# or error must not drive the terminal of whoever lists it.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# In logs a carriage return stays too: progress bars redraw their line with it.
_LOG_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:
    out: Console
    err: Console


def __getattr__(name: str) -> Any:
    """`out` and `err`, the rich consoles of stdout and stderr, made on first use (a test
    may put its own in place with mock.patch.object)."""
    if name in ("out", "err"):
        from rich.console import Console

        console = Console(stderr=name == "err")
        globals()[name] = console
        return console
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _console(name: str) -> Console:
    console = globals().get(name)
    return __getattr__(name) if console is None else console


def _out() -> Console:
    return _console("out")


def _err() -> Console:
    return _console("err")


def plain(value: object) -> str:
    """Text someone else wrote (a job's name, owner, error...), safe to print as is."""
    return _CONTROL.sub("", str(value))


def _text(value: object) -> str:
    """The same for rich output: control characters stripped and markup escaped, so
    `[bold red]x[/]` in an owner's name prints as written."""
    from rich.markup import escape

    return escape(plain(value))


def friendly_errors(fn: F) -> F:
    """Turn the errors a user can cause into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OrchError as exc:
            _err().print(f"[bold red]error:[/] {_text(exc)}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            _err().print("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def output_option(fn: F) -> F:
    return click.option("--output", "-o", type=click.Choice(["table", "json"]),
                        default="table", show_default=True,
                        help="table for people, json for scripts (stable keys)")(fn)


def print_json(data: Any) -> None:
    if not isinstance(data, (dict, str, int, float)) and data is not None:
        data = dump(data)
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


_STATE_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow",
                "running": "cyan", "pending": "blue", "queued": "magenta"}


def _state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orch")
def cli() -> None:
    """orch: fine-tune language models (clm, mlm, seq2seq) on a Ray cluster."""


# -- specs ----------------------------------------------------------------------------------
@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a spec field, e.g. --set training.learning_rate=1e-4")
@friendly_errors
def validate(spec_file: Path, overrides: tuple[str, ...]) -> None:
    """Check a job spec without submitting it (model, tokenizer and data included)."""
    from orchestrator.preflight import preflight
    from orchestrator.spec import load_spec

    spec, _ = load_spec(spec_file, overrides)
    problems = preflight(spec)
    if problems:
        raise SpecError(problems, str(spec_file))
    click.echo(f"ok: {spec.name} ({spec.objective.value}, model {plain(spec.model)}, "
               f"{spec.resources.gpus} GPU(s))")


@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a spec field, e.g. --set resources.gpus=2")
@click.option("--wait", is_flag=True, help="follow the job; exit 0 only if it succeeds")
@click.option("--quiet", "-q", is_flag=True, help="print only the job id")
@friendly_errors
def submit(spec_file: Path, overrides: tuple[str, ...], wait: bool, quiet: bool) -> None:
    """Validate SPEC_FILE and queue it as a job. Prints the job id."""
    from orchestrator.api import JobSummary
    from orchestrator.spec import load_spec

    spec, text = load_spec(spec_file, overrides)
    spec_yaml = text + "".join(f"\n# --set {o}" for o in overrides)
    client = Client(start=True)
    job = client.post_as(JobSummary, "/jobs", {"spec": spec.to_dict(), "spec_yaml": spec_yaml})
    if quiet:
        click.echo(job.id)
    else:
        click.echo(f"submitted job {job.id} ({plain(job.name)}, {job.state.value})")
    if wait:
        final = _follow(client, job.id)
        sys.exit(0 if final.state == "succeeded" else 1)


def _follow(client: Client, job_id: int) -> JobDetail:
    """Show live progress until the job ends (see orchestrator.commands.follow); return its
    final status."""
    from orchestrator.commands.follow import follow

    try:
        status = follow(client, job_id, _err())
    except KeyboardInterrupt:
        _err().print(f"stopped following; job {job_id} keeps running "
                  f"(orch cancel {job_id} stops it)")
        raise
    _print_result(status)
    return status


def _print_result(status: JobDetail) -> None:
    evals = {k: v.value for k, v in status.metrics.items() if k.startswith("eval_")
             and not k.endswith(("runtime", "per_second"))}
    summary = ", ".join(f"{_text(k)} {_fmt(v)}" for k, v in sorted(evals.items()))
    err = _err()
    err.print(f"job {status.id} {_state(status.state.value)}" + (f": {summary}" if summary else ""))
    if status.state == "succeeded":
        err.print(f"artifacts: {_text(status.artifact_dir)}")
    elif status.error:
        err.print(f"[red]error:[/] {_text(status.error)}", highlight=False)


# -- inspection -----------------------------------------------------------------------------
def check_states(text: str | None) -> str | None:
    """`--state running,queued`, checked here: an unknown state is one line naming the
    valid ones (the server refuses it too, with a 422)."""
    if not text:
        return None
    from orchestrator.states import JobState

    valid = [s.value for s in JobState]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise InvalidRequest(f"--state: unknown {', '.join(unknown)}; the states are "
                             f"{', '.join(valid)}")
    return ",".join(names)


def utc_option(fn: F) -> F:
    return click.option("--utc", is_flag=True,
                        help="times as ISO 8601 in UTC (marked Z) instead of local and relative")(fn)


def wide_option(fn: F) -> F:
    return click.option("--wide", "-w", is_flag=True,
                        help="every column, as wide as it needs (the terminal wraps it)")(fn)


def _note(job: JobSummary) -> str:
    """What a row says besides its numbers: why it waits, or how it failed."""
    if job.waiting_reason:
        return job.waiting_reason
    return job.error.strip().splitlines()[0][:200] if job.error and job.error.strip() else ""


def _ran(job: JobSummary) -> str:
    from orchestrator.progress import duration

    if job.elapsed_seconds is not None:
        return duration(job.elapsed_seconds)
    return f"queued {duration(job.queued_seconds)}" if job.queued_seconds is not None else ""


@cli.command("list")
@click.option("--state", help="only these states, comma separated (e.g. running,queued)")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@wide_option
@utc_option
@output_option
@friendly_errors
def list_jobs(state: str | None, limit: int, wide: bool, utc: bool, output: str) -> None:
    """List jobs, newest first: progress, time running, ETA, and why a job waits."""
    from orchestrator.api import JobSummary

    jobs = Client().get_as(list[JobSummary], "/jobs", state=check_states(state), limit=limit)
    if output == "json":
        return print_json(jobs)
    from rich.table import Column

    from orchestrator.commands.render import Clock, long, print_table, short, table
    from orchestrator.progress import duration, step_of

    clock = Clock(utc=utc)
    rows = [{"id": str(j.id), "name": _text(j.name), "state": _state(j.state.value),
             "objective": _text(j.objective), "owner": _text(j.owner), "gpus": str(j.gpus),
             "step": step_of(j.progress.step, j.progress.total), "ran": _ran(j),
             "ETA": duration(j.eta_seconds), "created": clock.ago(j.created_at),
             "note": _text(_note(j))} for j in jobs]
    # Names wrap only past 20 characters; columns no job has a value for are left out.
    name_width = min(20, max((len(plain(j.name)) for j in jobs), default=4))
    columns = [short("id", "right"), Column("name", overflow="fold", min_width=name_width),
               short("state")]
    if wide:
        columns += [short("objective"), short("owner"), short("gpus", "right")]
    columns += [short(c, "right") for c in ("step", "ran", "ETA") if wide or any(r[c] for r in rows)]
    columns += [short("created"), long("note")]
    shown = table(*columns)
    for row in rows:
        shown.add_row(*(row[str(c.header)] for c in columns))
    print_table(_out(), shown, wide)


@cli.command()
@click.argument("job_id", type=int)
@utc_option
@output_option
@friendly_errors
def status(job_id: int, utc: bool, output: str) -> None:
    """Show a job: state (and why it waits), progress, latest metrics, history."""
    from orchestrator.api import JobDetail

    data = Client().get_as(JobDetail, f"/jobs/{job_id}")
    if output == "json":
        return print_json(data)
    from orchestrator.commands.render import Clock, long, short, table
    from orchestrator.progress import duration, step_of
    from orchestrator.states import AttemptOutcome

    out = _out()
    clock = Clock(utc=utc)
    out.print(f"[bold]job {data.id}[/] {_text(data.name)} ({_text(data.objective)}) "
              f"{_state(data.state.value)}", highlight=False)
    if data.waiting_reason:
        out.print(f"  waiting: {_text(data.waiting_reason)}", highlight=False)
    progress = [f"step {step_of(data.progress.step, data.progress.total)}"] if (
        data.progress.step is not None) else []
    if data.queued_seconds is not None:
        progress.append(f"queued {duration(data.queued_seconds)}")
    if data.elapsed_seconds is not None:
        progress.append(f"ran {duration(data.elapsed_seconds)}")
    if data.eta_seconds is not None:
        progress.append(f"ETA {duration(data.eta_seconds)}")
    progress.append(f"created {clock.ago(data.created_at)}")
    out.print("  " + ", ".join(progress), highlight=False)
    # Retries count only attempts lost to an infrastructure failure; an attempt Ray never
    # started does not use one up.
    retried = sum(a.outcome == AttemptOutcome.RETRIED for a in data.attempt_history)
    out.print(f"  owner {_text(data.owner)}, {data.gpus} GPU(s), {data.cpus} CPU(s), "
              f"attempt {data.attempts}, retries used {retried} of {data.max_attempts - 1}",
              highlight=False)
    out.print(f"  artifacts {_text(data.artifact_dir)}", highlight=False, soft_wrap=True)
    if data.parent_job_id:
        out.print(f"  resumes job {data.parent_job_id} from {_text(data.resume_from or '')}",
                  highlight=False, soft_wrap=True)
    if data.error:
        out.print(f"  [red]error:[/] {_text(data.error)}", highlight=False)
    if data.metrics:
        shown = table(long("metric"), short("step", "right"), short("value", "right"),
                      title="latest metrics")
        for name, m in sorted(data.metrics.items()):
            shown.add_row(_text(name), str(m.step), _fmt(m.value))
        out.print(shown)
    if len(data.attempt_history) > 1 or any(a.cause for a in data.attempt_history):
        shown = table(short("attempt", "right"), long("Ray job"), short("started"),
                      short("ended"), short("outcome"), long("cause", ratio=2), title="attempts")
        for a in data.attempt_history:
            shown.add_row(str(a.attempt), _text(a.ray_submission_id), clock.at(a.started_at),
                          clock.at(a.ended_at), a.outcome.value,
                          _text(a.cause.splitlines()[0][:200]) if a.cause else "")
        out.print(shown)
    shown = table(short("at"), short("from"), short("to"), long("by"), long("reason", ratio=3),
                  title="history")
    for e in data.events:
        shown.add_row(clock.at(e.at), e.from_state.value if e.from_state else "",
                      e.to_state.value, _text(str(e.details.get("user", ""))), _text(e.reason))
    out.print(shown)


# The columns `orch metrics` shows by default (with the objective's headline metric).
METRIC_COLUMNS = ("train_loss", "eval_loss")


@cli.command()
@click.argument("job_id", type=int)
@click.option("--name", help="only this metric")
@click.option("--wide", "--all", "-w", "wide", is_flag=True,
              help="every metric, not only train_loss, eval_loss and the headline one")
@click.option("--superseded", is_flag=True,
              help="also show superseded values, kept as history: those written after the "
                   "step a later run resumed from (all, if it started over); with attempts")
@output_option
@friendly_errors
def metrics(job_id: int, name: str | None, wide: bool, superseded: bool, output: str) -> None:
    """Metrics a job recorded, by step: train_loss, eval_loss and the objective's headline
    metric (eval_rougeL for seq2seq, eval_accuracy for mlm); --wide for all of them."""
    from orchestrator.api import MetricsResponse

    data = Client().get_as(MetricsResponse, f"/jobs/{job_id}/metrics", name=name,
                           all=superseded or None)
    if output == "json":
        return print_json(data)
    from orchestrator.commands.render import print_table, short, table
    from orchestrator.progress import headline

    recorded = sorted({m.name for m in data.metrics})
    wanted = [*METRIC_COLUMNS, headline(data.objective or "")]
    names = [n for n in dict.fromkeys(wanted) if n in recorded]
    if wide or name or not names:
        names = recorded
    # With --superseded a superseded value and the one that replaced it share a step, even
    # an attempt (Ray Train restarted the worker group): a row each, the superseded first.
    rows: dict[tuple[int, ...], dict[str, float]] = {}
    for m in data.metrics:
        if m.name in names:
            key: tuple[int, ...] = ((m.step, m.attempt, int(not m.superseded)) if superseded
                                    else (m.step,))
            rows.setdefault(key, {})[m.name] = m.value
    shown = table(short("step", "right"),
                  *((short("attempt", "right"), short("superseded")) if superseded else ()),
                  *(short(_text(n), "right") for n in names))
    for row, values in sorted(rows.items()):
        marks = [str(row[1]), "" if row[2] else "*"] if superseded else []
        shown.add_row(str(row[0]), *marks, *(_fmt(values.get(n)) for n in names))
    print_table(_out(), shown, wide)
    hidden = len(recorded) - len(names)
    if hidden:
        _err().print(f"{hidden} more metric(s) recorded: --wide shows them", style="dim",
                  highlight=False)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--all", "include_deleted", is_flag=True, help="include checkpoints retention removed")
@wide_option
@utc_option
@output_option
@friendly_errors
def checkpoints(job_id: int, include_deleted: bool, wide: bool, utc: bool, output: str) -> None:
    """Checkpoints and the final model a job produced, each with its full path (on a line of
    its own, so it is never cut; --wide puts it in a column)."""
    from orchestrator.api import CheckpointsResponse

    client = Client()
    data = client.get_as(CheckpointsResponse, f"/jobs/{job_id}/checkpoints",
                         all=include_deleted or None)
    if output == "json":
        return print_json(data)
    from orchestrator.commands.render import Clock, aligned, print_table, table
    from orchestrator.progress import headline

    clock = Clock(utc=utc)
    main = headline(data.objective or "")
    shown_metrics = list(dict.fromkeys(["eval_loss", main]))
    header = ["step", "kind", "best", "latest", "size MB", *shown_metrics, "created"]
    rows = []
    for c in data.checkpoints:
        rows.append([str(c.step), c.kind.value + (" (deleted)" if c.deleted else ""),
                     "*" if c.is_best else "", "*" if c.is_latest else "",
                     f"{c.size_bytes / 1e6:.1f}",
                     *(_fmt(c.metrics.get(m)) for m in shown_metrics), clock.ago(c.created_at)])
    if wide:
        shown = table(*header, "path")
        for row, c in zip(rows, data.checkpoints, strict=True):
            shown.add_row(*row, _text(c.path))
        return print_table(_out(), shown, wide=True)
    if not rows:
        click.echo("no checkpoints")
        return
    right = [True, False, False, False, True, *(True for _ in shown_metrics), False]
    lines = aligned([header, *rows], right)
    click.echo(lines[0])
    for line, c in zip(lines[1:], data.checkpoints, strict=True):
        click.echo(line)
        click.echo(f"  {plain(c.path)}")


@cli.command()
@click.argument("job_id", type=int)
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
@friendly_errors
def logs(job_id: int, follow: bool) -> None:
    """Print a job's logs (driver and workers). With --follow off a terminal, a plain
    progress line goes to stderr every ORCH_PROGRESS_INTERVAL seconds too."""
    from orchestrator.api import LogsResponse
    from orchestrator.commands.follow import Ticker, on_terminal

    client = Client()
    ticker = Ticker(client, job_id) if follow and not on_terminal() else None
    offset = 0
    while True:
        data = client.get_as(LogsResponse, f"/jobs/{job_id}/logs", offset=offset)
        click.echo(_LOG_CONTROL.sub("", data.text), nl=False)
        offset = data.offset
        if not follow or data.state.is_terminal:
            break
        if ticker is not None:
            ticker.tick()
        time.sleep(2.0)


@cli.command()
@click.argument("job_id", type=int)
@friendly_errors
def cancel(job_id: int) -> None:
    """Cancel a job: a queued one never starts, a running one is stopped."""
    from orchestrator.api import CancelResponse

    data = Client().post_as(CancelResponse, f"/jobs/{job_id}/cancel")
    click.echo(plain(data.message))
    if not data.cancelled:
        sys.exit(1)


@cli.command()
@click.argument("job_id", type=int)
@click.option("--wait", is_flag=True, help="follow the new job; exit 0 only if it succeeds")
@friendly_errors
def resume(job_id: int, wait: bool) -> None:
    """Continue a failed or cancelled job from its latest checkpoint, as a new job."""
    from orchestrator.api import JobSummary

    client = Client(start=True)
    job = client.post_as(JobSummary, f"/jobs/{job_id}/resume")
    click.echo(f"submitted job {job.id} (resumes job {job_id} from {plain(job.resume_from)})")
    if wait:
        final = _follow(client, job.id)
        sys.exit(0 if final.state == "succeeded" else 1)


# -- who ------------------------------------------------------------------------------------
cli.add_command(users)


@cli.command()
@output_option
@friendly_errors
def whoami(output: str) -> None:
    """Who the server takes you for (your token's user), and your limits."""
    from orchestrator.api import WhoAmI

    client = Client()
    me = client.get_as(WhoAmI, "/whoami")
    if output == "json":
        return print_json(me)
    cap = "no GPU cap" if me.gpu_cap is None else f"GPU cap {me.gpu_cap}"
    click.echo(f"{me.name} ({me.role}) on {client.url} (auth {me.auth}); {cap}, max "
               f"priority {me.max_priority}")


# -- lifecycle ------------------------------------------------------------------------------
@cli.command()
@click.option("--num-gpus", type=int, help="GPUs the local Ray cluster declares (default: detected)")
@click.option("--num-cpus", type=int, help="CPUs the local Ray cluster declares (default: detected)")
@friendly_errors
def up(num_gpus: int | None, num_cpus: int | None) -> None:
    """Start the local Ray cluster and control plane (submit does this on demand)."""
    from orchestrator import cluster
    from orchestrator.api import ClusterInfo
    from orchestrator.client import start_local_server
    from orchestrator.settings import get_settings

    tgt = cluster.target()
    cluster.check_local_ports()  # before anything starts
    if tgt.local and get_settings().executor == "ray":
        cluster.start_local(num_cpus=num_cpus, num_gpus=num_gpus)
    url = start_local_server()
    info = Client(url=url).get_as(ClusterInfo, "/cluster")
    click.echo(f"orch is up: server {url}, Ray {plain(info.jobs_url or 'none (no-op executor)')} "
               f"({info.gpus} GPUs, {info.cpus} CPUs, {info.nodes} node(s))")


@cli.command()
@click.option("--keep-ray", is_flag=True, help="stop only the control plane")
@friendly_errors
def down(keep_ray: bool) -> None:
    """Stop the local control plane and the local Ray cluster."""
    from orchestrator import cluster
    from orchestrator.client import stop_local_server

    stopped = stop_local_server()
    click.echo("orch server stopped" if stopped else "no local orch server was running")
    if not keep_ray and cluster.target().local:
        cluster.stop_local()
        click.echo("local Ray cluster stopped")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="a non-loopback address needs --auth users")
@click.option("--port", default=None, type=int, help="default: $ORCH_SERVER_PORT or 8770")
@click.option("--auth", type=click.Choice(["local", "users"]), default=None,
              help="local: only the token in $ORCH_HOME/api_token (one person); users: a team "
                   "server, every request needs a user's token; default $ORCH_AUTH or local")
@friendly_errors
def server(host: str, port: int | None, auth: str | None) -> None:
    """Run the control plane in the foreground (the CLI starts one on demand)."""
    import os

    from orchestrator.client import local_port
    from orchestrator.server import serve

    if auth:
        # The flag is the setting: everything that reads the settings (the spec's allowed
        # roots too, whose defaults depend on the mode) must see this mode, not the variable's.
        os.environ.update(ORCH_AUTH=auth)
    serve(host, port or local_port())


from orchestrator.commands.dashboard import dashboard  # noqa: E402  (the module imports cli's helpers)

cli.add_command(dashboard)
from orchestrator.commands import model, plot, tracking  # noqa: E402  (they use cli's helpers)

cli.add_command(plot.plot)
cli.add_command(model.predict)
cli.add_command(model.export)
cli.add_command(tracking.tensorboard)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
