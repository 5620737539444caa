"""`orch export`: a job's model as a self-contained directory that `from_pretrained` loads.

The directory holds:

  * the model (`config.json`, `model.safetensors`). An adapter job's model is exported
    merged into its base, so it loads without peft and without the base model; the adapter
    itself is kept beside it in `adapter/` (`adapter_config.json` names the base the job
    trained on), for applying to another copy of that base with peft;
  * the tokenizer, with the chat template the job rendered chats with, if any;
  * `generation_config.json` with the job's decoding settings (seq2seq: max_length and
    num_beams; clm on instruction data: max_new_tokens; greedy; the pad and eos tokens);
  * `README.md`, a model card: what was trained, from what data, with which settings (the
    spec), the metrics the store holds, how to load and prompt it, and the orch version;
  * `orch_export.json`: the same facts for programs.

It is written into a staging directory beside the target and renamed into place once
complete: a failed export leaves nothing behind, and the target is refused if it exists and
is not empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec import JobSpec, Objective
from workers import storage
from workers.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGED_ADAPTER_DIR, load_for_inference
from workers.inference import PromptStyle

PROVENANCE = "orch_export.json"
_PIPELINE = {Objective.CLM: "text-generation", Objective.MLM: "fill-mask",
             Objective.SEQ2SEQ: "text2text-generation"}


class ExportRefused(ValueError):
    """The target cannot be used (it exists and is not empty, or cannot be written)."""


@dataclass
class ExportInfo:
    """What the store knows about the job and the chosen model, for the model card."""

    job_id: int
    job_name: str
    state: str
    which: str  # final, best, latest or the step asked for
    kind: str  # final or checkpoint
    step: int
    source: str  # the checkpoint or final directory exported
    checkpoint_metrics: dict[str, float] = field(default_factory=dict)
    job_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {step, value}
    owner: str | None = None


def check_target(target: Path) -> None:
    """Refuse a target that exists and is not an empty directory."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ExportRefused(f"{target} exists and is not a directory; choose a new directory")
    if target.is_dir() and any(target.iterdir()):
        raise ExportRefused(f"{target} exists and is not empty; choose a new or empty directory")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise ExportRefused(f"{parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportRefused(f"cannot write in {parent}; choose a directory you can write")


def export_model(spec: JobSpec, info: ExportInfo, target: Path) -> Path:
    """Write the export of `info.source` to `target` (see the module doc); returns it."""
    target = target.absolute()
    check_target(target)
    staging = target.with_name(f".{target.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        loaded = load_for_inference(info.source, spec.objective, merge=True)
        model, tokenizer = loaded.model, loaded.tokenizer
        style = PromptStyle.of(spec) if spec.objective == Objective.CLM else PromptStyle()
        if style.kind == "chat" and style.template:
            tokenizer.chat_template = style.template  # the one the job rendered chats with
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # as clm training padded
        if model.can_generate():
            _generation_settings(spec, style, model, tokenizer)
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if loaded.kind == "adapter":
            _copy_adapter(info.source, staging / MERGED_ADAPTER_DIR)
        version = code_version()
        facts = {"job": asdict(info), "objective": spec.objective.value,
                 "model_kind": loaded.kind, "base_model": loaded.base_model,
                 "source_prefix": spec.training.source_prefix, "prompt": style.kind,
                 "orch": version, "exported_at": datetime.now(timezone.utc).isoformat(),
                 "spec": spec.to_dict(), "data": data_facts(spec)}
        (staging / PROVENANCE).write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(model_card(spec, info, facts))
        if target.is_dir():
            target.rmdir()  # empty (checked): replaced by the complete export
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _generation_settings(spec: JobSpec, style: PromptStyle, model: Any, tokenizer: Any) -> None:
    """The job's decoding settings as the model's generation config (greedy, as evaluated)."""
    config = model.generation_config
    t = spec.training
    config.do_sample = False
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    if spec.objective == Objective.SEQ2SEQ:
        config.max_length = t.generation_max_length or t.max_target_length
        config.num_beams = t.generation_num_beams or 1
    elif style.instruction and t.generation_max_length:
        config.max_new_tokens = t.generation_max_length
        config.num_beams = 1


def _copy_adapter(source: str, into: Path) -> None:
    local = Path(source)
    if storage.is_url(source):  # load_for_inference fetched it already; fetch the two files
        local = storage.download(source, into.with_name(into.name + ".fetch"))
    into.mkdir(parents=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if (local / name).is_file():
            shutil.copy2(local / name, into / name)
    if local != Path(source):
        shutil.rmtree(local, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Facts for the card


def code_version() -> dict[str, str | None]:
    """orch's package version and, when it runs from a git checkout, the commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("orch")
    except PackageNotFoundError:
        package = None
    commit = None
    source = Path(__file__).resolve().parents[1]
    if (source / ".git").exists():
        try:
            found = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                   capture_output=True, text=True, timeout=10, check=False)
            commit = (found.stdout.strip() or None) if found.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"version": package, "commit": commit}


def data_facts(spec: JobSpec) -> dict[str, Any]:
    """Where the training data came from, with sizes where the files are here."""
    data = spec.dataset
    if data.name is not None:
        return {"dataset": data.name, "config": data.config, "train_split": data.train_split,
                "eval_split": data.eval_split, "eval_fraction": data.eval_fraction,
                "max_train_samples": data.max_train_samples,
                "max_eval_samples": data.max_eval_samples}
    return {"train_files": [_file_facts(f) for f in data.train_files or []],
            "eval_files": [_file_facts(f) for f in data.eval_files or []],
            "eval_fraction": data.eval_fraction,
            "max_train_samples": data.max_train_samples,
            "max_eval_samples": data.max_eval_samples}


def _file_facts(path: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"path": path}
    local = Path(path)
    if storage.is_url(path) or not local.is_file():
        return facts  # not on this machine: named only
    facts["bytes"] = local.stat().st_size
    suffix = local.suffix.lower()
    if suffix in (".jsonl", ".txt", ".csv"):
        with local.open("rb") as f:
            rows = sum(1 for line in f if line.strip())
        facts["rows"] = rows - 1 if suffix == ".csv" and rows else rows
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        facts["rows"] = pq.ParquetFile(local).metadata.num_rows
    return facts


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = [f"| {name} | {value:.6g} |" for name, value in sorted(metrics.items())]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows])


def model_card(spec: JobSpec, info: ExportInfo, facts: dict[str, Any]) -> str:
    """The export's README.md (a Hugging Face model card)."""
    objective = spec.objective
    base = facts.get("base_model") or spec.model
    front = {"library_name": "transformers", "pipeline_tag": _PIPELINE[objective],
             "tags": ["orch", objective.value]}
    version = facts["orch"]
    code = f"orch {version['version'] or 'unknown version'}" + (
        f" (commit {version['commit']})" if version["commit"] else "")
    chosen = (f"the final model (step {info.step})" if info.kind == "final"
              else f"checkpoint-{info.step} ({info.which})")
    evals = {name: m["value"] for name, m in info.job_metrics.items()
             if name.startswith("eval_") and not name.endswith(("runtime", "per_second"))}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {spec.name}", "",
        f"A `{objective.value}` fine-tune of `{spec.model}`, trained by orch as job "
        f"{info.job_id} ({info.state}); this is {chosen}"
        + (", an adapter merged into its base model" if facts["model_kind"] == "adapter"
           else "") + ".",
        "", "## Use it", "", "```python", *usage(spec, facts), "```", "",
    ]
    if facts["model_kind"] == "adapter":
        lines += ["The adapter the job trained is in `adapter/` (its `adapter_config.json` "
                  f"names the base model `{base}`): `peft.PeftModel.from_pretrained(base, "
                  "\"adapter\")` applies it to a copy of that base.", ""]
    lines += ["## Metrics", ""]
    if info.checkpoint_metrics:
        lines += [f"Of this model (evaluated at step {info.step}):", "",
                  _metrics_table(info.checkpoint_metrics), ""]
    if evals:
        lines += ["The job's latest evaluation:", "", _metrics_table(evals), ""]
    if not info.checkpoint_metrics and not evals:
        lines += ["The job recorded no evaluation metrics.", ""]
    lines += ["## Data", "", "```yaml", yaml.safe_dump(facts["data"], sort_keys=False).strip(),
              "```", "",
              "## Training settings", "", "The job's spec, as orch ran it:", "", "```yaml",
              yaml.safe_dump(facts["spec"], sort_keys=False).strip(), "```", "",
              f"Exported from `{info.source}` by {code} at {facts['exported_at']}.", ""]
    return "\n".join(lines)


def usage(spec: JobSpec, facts: dict[str, Any]) -> list[str]:
    """Python lines that load the export and use it as the job did."""
    cls = {Objective.CLM: "AutoModelForCausalLM", Objective.MLM: "AutoModelForMaskedLM",
           Objective.SEQ2SEQ: "AutoModelForSeq2SeqLM"}[spec.objective]
    lines = [f"from transformers import AutoTokenizer, {cls}", "",
             'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
             f'model = {cls}.from_pretrained("path/to/this/directory")']
    if spec.objective == Objective.MLM:
        return lines + ['text = f"The river flows to the {tokenizer.mask_token}."',
                        'inputs = tokenizer(text, return_tensors="pt")',
                        "logits = model(**inputs).logits  # the mask's row: its candidates"]
    if spec.objective == Objective.SEQ2SEQ:
        prefix = json.dumps(spec.training.source_prefix or "")
        return lines + [f"# The job trained with source_prefix {prefix}: inputs need it too.",
                        f'inputs = tokenizer({prefix} + "your text", return_tensors="pt")',
                        "output = model.generate(**inputs)  # the job's max_length and beams",
                        "print(tokenizer.decode(output[0], skip_special_tokens=True))"]
    if facts["prompt"] == "chat":
        prompt = ["chat = [{\"role\": \"user\", \"content\": \"your question\"}]",
                  "text = tokenizer.apply_chat_template(chat, tokenize=False, "
                  "add_generation_prompt=True)",
                  'inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")']
    else:
        prompt = ['inputs = tokenizer("your text", return_tensors="pt")']
    return lines + prompt + [
        "output = model.generate(**inputs)  # greedy, the job's settings",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], '
        "skip_special_tokens=True))"]
