"""`orch predict` and `orch export`: try a job's model, and take it away.

Both ask the control plane which model `--checkpoint` names (`GET /jobs/{id}/model`: the
final model by default, else the best checkpoint, else the latest; or `final`, `best`,
`latest`, a step), so a checkpoint retention deleted or a job that saved nothing is refused
in one line before anything is loaded.

`orch predict` runs where the model is: on this machine when its files are here (the
checkpoint directory exists, and an adapter's base model too), otherwise on the job's
cluster as a short Ray Job the control plane starts (`POST /jobs/{id}/predict`), so a
laptop needs neither the files nor Ray credentials. `--on` forces either.

`orch export` writes a directory `from_pretrained` loads (workers.export); it reads the
model's files from this machine (or an object-store URL).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator.client import Client, dump
from orchestrator.errors import Conflict, InvalidRequest

if TYPE_CHECKING:  # imported when a command runs: `orch` imports this module for every command
    from orchestrator.api import ModelRef

MAX_INPUTS = 1000
# Inputs per request to the control plane: its bound, and well under the size one
# prediction on the cluster takes (orchestrator.routes.models.MAX_TASK_ARGUMENT).
REQUEST_INPUTS = 64
REQUEST_CHARACTERS = 40_000
CHECKPOINT_HELP = ("which model: final (the default when the job has one), best, latest, or a "
                   "step (e.g. 200)")


def read_inputs(text: str | None, file: Path | None, columns: tuple[str, ...]) -> list[Any]:
    """TEXT and the lines of --file: a JSON string, or an object with a `text` (or the job's
    own input column) field, or `messages` (a chat); blank lines are skipped."""
    inputs: list[Any] = [text] if text is not None else []
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise InvalidRequest(f"--file {file}: cannot read it ({reason})") from None
        for number, line in enumerate(lines, 1):
            if line.strip():
                inputs.append(_input_of(line, f"--file {file} line {number}", columns))
    if not inputs:
        raise InvalidRequest("give a TEXT to predict from, or --file with one input per line")
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(f"{len(inputs)} inputs; orch predict takes at most {MAX_INPUTS} "
                             "at a time")
    return inputs


def _input_of(line: str, where: str, columns: tuple[str, ...]) -> Any:
    hint = ('each line is a JSON string, or an object with a "text" field (or "messages": a '
            "chat)")
    try:
        value = json.loads(line)
    except ValueError:
        raise InvalidRequest(f"{where}: not JSON; {hint}") from None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        messages = value.get("messages")
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages) and messages:
            return messages
        for key in ("text", "input", *columns):
            if isinstance(value.get(key), str):
                return value[key]
    raise InvalidRequest(f"{where}: no text in it; {hint}")


def job_columns(spec: dict[str, Any]) -> tuple[str, ...]:
    """The job's own input columns, accepted as --file fields."""
    data = spec.get("dataset") or {}
    return tuple(c for c in (data.get("prompt_column"), data.get("text_column"))
                 if isinstance(c, str))


def reachable_here(ref: ModelRef) -> bool:
    """The model's files are on this machine: its directory, and an adapter's base model
    (a local directory, or a hub id the local cache may hold)."""
    path = Path(ref.path)
    if "://" in ref.path or not path.is_dir():
        return False
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        from orchestrator.sandbox import is_hub_id

        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        except (OSError, ValueError):
            return False
        return Path(base).is_dir() or (is_hub_id(base) and not os.path.isabs(base))
    return True


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def predict_here(ref: ModelRef, inputs: list[Any], max_new_tokens: int | None,
                 top_k: int) -> list[dict[str, Any]]:
    from orchestrator.spec import spec_from_dict
    from workers.inference import PredictError, Predictor

    _quiet_transformers()
    spec = spec_from_dict(ref.spec)
    try:
        predictor = Predictor.load(spec, ref.path)
        return predictor.predict(inputs, max_new_tokens=max_new_tokens, top_k=top_k)
    except PredictError as exc:
        raise InvalidRequest(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise Conflict(f"cannot load the model at {ref.path}: {exc}") from None


def predict_on_cluster(client: Client, ref: ModelRef, inputs: list[Any],
                       max_new_tokens: int | None, top_k: int) -> list[dict[str, Any]]:
    from orchestrator.api import PredictResponse

    answers: list[dict[str, Any]] = []
    for chunk in request_chunks(inputs):
        body = {"inputs": chunk, "checkpoint": ref.which, "max_new_tokens": max_new_tokens,
                "top_k": top_k}
        # The server waits for the Ray Job (at most ORCH_PREDICT_TIMEOUT): wait as long.
        data = client.request("POST", f"/jobs/{ref.job_id}/predict", json=body, timeout=None)
        answers += PredictResponse.model_validate(data).predictions
    return answers


def request_chunks(inputs: list[Any]) -> list[list[Any]]:
    """The inputs in order, in requests of at most REQUEST_INPUTS inputs and (but for a
    single long one) REQUEST_CHARACTERS characters of JSON."""
    chunks: list[list[Any]] = [[]]
    size = 0
    for item in inputs:
        length = len(json.dumps(item))
        if chunks[-1] and (len(chunks[-1]) >= REQUEST_INPUTS
                           or size + length > REQUEST_CHARACTERS):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += length
    return chunks


def _describe(ref: ModelRef) -> str:
    model = (f"final model (step {ref.step})" if ref.which == "final" or ref.kind == "final"
             else f"checkpoint-{ref.step} ({ref.which})")
    return f"job {ref.job_id} ({ref.name}, {ref.objective}), {model}"


def print_predictions(objective: str, predictions: list[dict[str, Any]]) -> None:
    from orchestrator.cli import _text, out, plain

    for n, answer in enumerate(predictions):
        if n:
            out.print()
        given = answer["input"]
        shown = given if isinstance(given, str) else " | ".join(
            f"{m.get('role')}: {m.get('content')}" for m in given)
        if objective == "mlm":
            out.print(_text(answer["output"]), highlight=False)
            for mask in answer.get("masks", []):
                options = ", ".join(f"{plain(c['token'])} {100 * c['probability']:.1f}%"
                                    for c in mask["candidates"])
                out.print(f"  mask {mask['mask'] + 1}: {_text(options)}", highlight=False)
            continue
        out.print(f"[dim]> {_text(shown)}[/]", highlight=False)
        out.print(_text(answer["output"]), highlight=False, soft_wrap=True)


@click.command()
@click.argument("job_id", type=int)
@click.argument("text", required=False)
@click.option("--file", "-f", "file", type=click.Path(dir_okay=False, path_type=Path),
              help="inputs, one per line: a JSON string or an object with a text field "
                   "(or messages, a chat)")
@click.option("--checkpoint", "-c", default="auto", help=CHECKPOINT_HELP)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096),
              help="tokens to generate (clm; seq2seq: instead of the job's "
                   "generation_max_length)")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 100),
              help="mlm: candidates shown for each mask")
@click.option("--on", "where", type=click.Choice(["auto", "local", "cluster"]), default="auto",
              show_default=True,
              help="local: load the model here; cluster: a Ray Job on the job's cluster; auto: "
                   "here when the model's files are")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="table for people, json for scripts (stable keys)")
def predict(job_id: int, text: str | None, file: Path | None, checkpoint: str,
            max_new_tokens: int | None, top_k: int, where: str, output: str) -> None:
    """Try JOB's model on TEXT: clm continues it, mlm fills its [MASK]s, seq2seq generates
    (with the job's source_prefix and generation settings)."""
    from orchestrator.cli import err, friendly_errors, print_json

    @friendly_errors
    def run() -> None:
        from orchestrator.api import ModelRef, PredictResponse

        client = Client(start=True)  # may need the cluster (a prediction as a Ray Job)
        if file is not None and not file.is_file():
            raise InvalidRequest(f"--file {file}: no such file")
        ref = client.get_as(ModelRef, f"/jobs/{job_id}/model", checkpoint=checkpoint)
        inputs = read_inputs(text, file, job_columns(ref.spec))
        local = where == "local" or (where == "auto" and reachable_here(ref))
        if where == "local" and "://" not in ref.path and not Path(ref.path).is_dir():
            raise Conflict(f"the model's files ({ref.path}) are not on this machine; use "
                           "--on cluster")
        answers = (predict_here(ref, inputs, max_new_tokens, top_k) if local else
                   predict_on_cluster(client, ref, inputs, max_new_tokens, top_k))
        if output == "json":
            return print_json(dump(PredictResponse(
                job_id=ref.job_id, objective=ref.objective, checkpoint=ref.chosen(),
                where="local" if local else "cluster", predictions=answers)))
        err.print(f"{_describe(ref)}, " + ("on this machine" if local else
                                            "on the job's cluster"), highlight=False)
        print_predictions(ref.objective, answers)

    run()


@click.command()
@click.argument("job_id", type=int)
@click.argument("directory", type=click.Path(file_okay=True, path_type=Path))
@click.option("--checkpoint", "-c", default="auto", help=CHECKPOINT_HELP)
def export(job_id: int, directory: Path, checkpoint: str) -> None:
    """Write JOB's model to DIRECTORY, ready for from_pretrained: model (an adapter merged
    into its base), tokenizer, generation settings and a model card."""
    from orchestrator.cli import friendly_errors

    @friendly_errors
    def run() -> None:
        from orchestrator.api import ModelRef
        from workers.export import ExportRefused, check_target

        try:
            check_target(directory)  # before anything is fetched or loaded
        except ExportRefused as exc:
            raise Conflict(str(exc)) from None
        ref = Client().get_as(ModelRef, f"/jobs/{job_id}/model", checkpoint=checkpoint)
        if "://" not in ref.path and not Path(ref.path).is_dir():
            raise Conflict(f"the model's files ({ref.path}) are not on this machine; run orch "
                           "export where the job's storage is mounted")
        export_here(ref, directory)
        click.echo(f"exported {_describe(ref)} to {directory}")

    run()


def export_here(ref: ModelRef, directory: Path) -> Path:
    from orchestrator.spec import spec_from_dict
    from workers.export import ExportInfo, ExportRefused, export_model

    _quiet_transformers()
    info = ExportInfo(
        job_id=ref.job_id, job_name=ref.name, state=ref.state.value, which=ref.which,
        kind=ref.kind.value, step=ref.step, source=ref.path, owner=ref.owner,
        checkpoint_metrics={k: float(v) for k, v in ref.metrics.items()
                            if isinstance(v, (int, float))},
        job_metrics={k: {"step": m.step, "value": m.value} for k, m in ref.job_metrics.items()})
    try:
        return export_model(spec_from_dict(ref.spec), info, directory)
    except ExportRefused as exc:
        raise Conflict(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise Conflict(f"cannot export the model at {ref.path}: {exc}") from None
