"""`orch tensorboard JOB...`: the command that shows jobs' TensorBoard event files.

A job with `tracking.tensorboard: true` writes them to `<job dir>/tensorboard` (see
workers.tracking). One job is `tensorboard --logdir DIR`; several jobs, or a resumed job (whose
curve starts in the jobs it continues), are named runs side by side (`--logdir_spec
job-3:DIR,job-7:DIR`). The event files are where the job ran: the command is printed, not
run, for the machine that has them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import click

from orchestrator.client import Client
from orchestrator.errors import Conflict

if TYPE_CHECKING:  # imported when the command runs: `orch` imports this module for every command
    from orchestrator.api import JobDetail

TENSORBOARD_DIR = "tensorboard"  # workers.tracking.TENSORBOARD_DIR (no torch import here)


def event_dirs(client: Client, job_ids: tuple[int, ...]) -> dict[str, str]:
    """`job-<id>` -> its event directory, for each job and the jobs a resumed one continues
    (oldest first); a job that writes none is refused in one line."""
    from orchestrator.api import JobDetail

    runs: dict[str, str] = {}
    for job_id in job_ids:
        chain: list[JobDetail] = []
        current: int | None = job_id
        while current is not None and len(chain) < 100:
            job = client.get_as(JobDetail, f"/jobs/{current}")
            chain.append(job)
            current = job.parent_job_id
        if not _writes_events(chain[0]):
            raise Conflict(f"job {job_id} writes no TensorBoard event files; submit it with "
                           "tracking: {tensorboard: true} in its spec")
        for job in reversed(chain):
            if _writes_events(job):
                runs[f"job-{job.id}"] = str(Path(job.artifact_dir) / TENSORBOARD_DIR)
    return runs


def _writes_events(job: JobDetail) -> bool:
    return bool((job.spec.get("tracking") or {}).get("tensorboard"))


def command_for(runs: dict[str, str], port: int | None) -> str:
    if len(runs) == 1:
        args = ["tensorboard", "--logdir", next(iter(runs.values()))]
    else:
        args = ["tensorboard", "--logdir_spec", ",".join(f"{n}:{d}" for n, d in runs.items())]
    if port is not None:
        args += ["--port", str(port)]
    return shlex.join(args)


@click.command()
@click.argument("job_ids", type=int, nargs=-1, required=True, metavar="JOB...")
@click.option("--port", type=click.IntRange(1, 65535), help="the port TensorBoard serves on")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="table for people, json for scripts (stable keys)")
def tensorboard(job_ids: tuple[int, ...], port: int | None, output: str) -> None:
    """Print the command that shows JOBs' TensorBoard curves (tracking.tensorboard)."""
    from orchestrator.cli import friendly_errors, plain

    @friendly_errors
    def run() -> None:
        runs = event_dirs(Client(), job_ids)
        command = command_for(runs, port)
        if output == "json":
            click.echo(json.dumps({"command": command, "logdirs": runs}, indent=2,
                                  sort_keys=True))
            return
        click.echo(plain(command))
        missing = [d for d in runs.values() if not Path(d).is_dir()]
        if missing:
            click.echo(f"({len(missing)} of the directories are not on this machine: run it "
                       "where the job ran, or on a machine that mounts its storage)", err=True)

    run()
