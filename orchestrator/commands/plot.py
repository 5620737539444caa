"""`orch plot JOB [JOB...]`: train and eval curves, several jobs overlaid.

The curves come from the dashboard's curves endpoint (`/ui/api/jobs/{id}/curves`), so the
plot and the dashboard draw the same points: a resumed job's chain (parent -> child) joined
as one curve, superseded values left out, long curves downsampled. `-o FILE` writes a PNG
(matplotlib, its Agg backend: no display needed); without it the chart is drawn in the
terminal (plotext). Both libraries load only here, so the rest of the CLI starts fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from orchestrator.client import Client
from orchestrator.errors import Conflict, InvalidRequest

TRAIN = "train_loss"
POINTS = 2000  # per curve: more than a PNG's width in pixels
FORMATS = (".png", ".svg", ".pdf")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # plotext's colour codes, even with its "clear" theme


@dataclass
class Curves:
    """One job's curves, as the plot draws them."""

    job_id: int
    label: str
    series: dict[str, dict[str, list[Any]]]  # name -> {"steps": [...], "values": [...]}
    resumed_at: list[int]  # steps where a later job of its chain took over


def fetch(client: Client, job_id: int) -> Curves:
    data = client.get(f"/ui/api/jobs/{job_id}/curves", points=POINTS)
    chain = data.get("chain") or []
    name = chain[-1]["name"] if chain else ""
    label = f"job {job_id} {name}".strip()
    if len(chain) > 1:
        label += " (resumes " + " \u2192 ".join(str(c["job_id"]) for c in chain[:-1]) + ")"
    cuts = [int(c["until_step"]) for c in chain if c.get("until_step") is not None]
    return Curves(job_id=job_id, label=label, series=data.get("series") or {}, resumed_at=cuts)


def check_output(path: Path) -> None:
    """An output path that can be written, checked before anything is fetched or drawn."""
    if path.suffix.lower() not in FORMATS:
        raise InvalidRequest(f"-o {path}: give a file name ending in {', '.join(FORMATS)}")
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidRequest(f"-o {path}: is a directory; give a file name")
    if not parent.is_dir():
        raise InvalidRequest(f"-o {path}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidRequest(f"-o {path}: cannot write there (permission denied)")


def gather(client: Client, job_ids: tuple[int, ...], metric: str) -> list[Curves]:
    jobs = [fetch(client, job_id) for job_id in dict.fromkeys(job_ids)]
    for job in jobs:
        if not job.series:
            raise Conflict(f"job {job.job_id} has no metrics yet; nothing to plot")
        if TRAIN not in job.series and metric not in job.series:
            names = ", ".join(sorted(job.series))
            raise Conflict(f"job {job.job_id} has neither {TRAIN} nor {metric} (it has {names}); "
                           "try --metric with one of those")
    return jobs


def save_png(jobs: list[Curves], metric: str, path: Path) -> None:
    """Train loss and `metric` side by side, one colour per job; written to a temporary
    file beside `path` and moved there, so a failure leaves no half-written file."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [TRAIN] if metric == TRAIN else [TRAIN, metric]
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], names, strict=True):
        drawn = False
        for i, job in enumerate(jobs):
            points = job.series.get(name)
            if not points or not points["steps"]:
                continue
            color = colors[i % len(colors)]
            few = len(points["steps"]) <= 30
            ax.plot(points["steps"], points["values"], color=color, label=job.label,
                    linewidth=1.6, marker="o" if few else None, markersize=3.5)
            for step in job.resumed_at:
                ax.axvline(step, color=color, linestyle=":", linewidth=1, alpha=0.7)
            drawn = True
        ax.set_title(name, fontsize=12)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, frameon=False)
        else:
            ax.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    if any(job.resumed_at for job in jobs):
        fig.text(0.01, 0.01, "dotted: where a resumed job took over its chain", fontsize=8,
                 color="gray")
    fig.tight_layout()
    target = path.resolve()
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix,
                                dir=target.parent)
    os.close(fd)
    try:
        fig.savefig(temp, dpi=120)
        os.replace(temp, target)
    except OSError as exc:
        raise InvalidRequest(f"-o {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
        Path(temp).unlink(missing_ok=True)


def terminal_chart(jobs: list[Curves], metric: str, width: int, color: bool) -> str:
    """The same curves as text: one chart per metric, one after the other."""
    import plotext as plt

    names = [TRAIN] if metric == TRAIN else [TRAIN, metric]
    charts = []
    for name in names:
        plt.clf()
        plt.plotsize(max(40, width), 18)
        if not color:
            plt.theme("clear")
        drawn = False
        for job in jobs:
            points = job.series.get(name)
            if points and points["steps"]:
                plt.plot(points["steps"], points["values"], label=job.label, marker="braille")
                drawn = True
        if not drawn:
            charts.append(f"{name}: no values recorded")
            continue
        plt.title(name)
        plt.xlabel("step")
        chart = plt.build()
        charts.append(chart if color else _ANSI.sub("", chart))
    return "\n".join(charts)


@click.command()
@click.argument("job_ids", type=int, nargs=-1, required=True, metavar="JOB...")
@click.option("--output", "-o", "path", type=click.Path(path_type=Path),
              help="write the chart to this file (.png, .svg or .pdf); without it the chart "
                   "is drawn in the terminal")
@click.option("--metric", "-m", default="eval_loss", show_default=True,
              help="the evaluation metric drawn beside train_loss")
def plot(job_ids: tuple[int, ...], path: Path | None, metric: str) -> None:
    """Plot jobs' train_loss and an eval metric against step, overlaid; a resumed job is
    drawn with the jobs it continues, as one curve."""
    import shutil

    from orchestrator.cli import err, friendly_errors, out, plain

    @friendly_errors
    def run() -> None:
        if path is not None:
            check_output(path)
        jobs = gather(Client(), job_ids, metric)
        for job in jobs:
            if metric != TRAIN and metric not in job.series:
                err.print(f"job {job.job_id} has no {plain(metric)} yet", highlight=False)
        if path is not None:
            save_png(jobs, metric, path)
            click.echo(f"wrote {path}")
            return
        width = out.width if out.is_terminal else shutil.get_terminal_size((100, 24)).columns
        click.echo(terminal_chart(jobs, metric, width, color=out.is_terminal))

    run()
