"""The preflight checks against the workers: one rule each (orchestrator.formats,
orchestrator.objective_rules), so what `orch validate` accepts a worker can load and what it
refuses a worker would fail on; hub ids offline; instruction data refused at validate."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402

from orchestrator import preflight as preflight_module  # noqa: E402
from orchestrator.cli import cli  # noqa: E402
from orchestrator.preflight import check_dataset, check_model_and_tokenizer  # noqa: E402
from orchestrator.spec import JobSpec, build_spec  # noqa: E402
from tests.support import REPO, run_orch  # noqa: E402

ASSETS = REPO / "jobs" / "assets"
MODELS = ASSETS / "models"
TEMPLATE = (ASSETS / "templates" / "chat.jinja").read_text()

ROWS = [
    {"text": f"A storm hit Norbury on day {i}.", "document": f"A fire broke out in Eastvale {i}.",
     "summary": f"fire in Eastvale {i}", "prompt": f"What is {i} plus 1?\nAnswer:",
     "response": f" {i + 1}",
     "messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                  {"role": "assistant", "content": str(i + 1)}]}
    for i in range(6)
]
COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


def write_data(path: Path) -> Path:
    """ROWS in the format the file name says (csv keeps messages as JSON text)."""
    base, _, wrapper = path.name.partition(".")[2].partition(".")
    kind = base
    if kind == "parquet":
        from datasets import Dataset

        Dataset.from_list(ROWS).to_parquet(str(path.with_name("tmp.parquet")))
        data = path.with_name("tmp.parquet").read_bytes()
    elif kind == "txt":
        data = "".join(r["text"] + "\n" for r in ROWS).encode()
    elif kind == "csv":
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows({**r, "messages": json.dumps(r["messages"])} for r in ROWS)
        data = out.getvalue().encode()
    elif kind == "json":
        data = json.dumps(ROWS).encode()
    else:  # jsonl, and anything else (xml: a format nobody reads)
        data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    path.write_bytes(COMPRESS[wrapper](data) if wrapper else data)
    return path


OBJECTIVES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "clm": ("clm", "gpt2-tiny", {"text_column": "text"}),
    "mlm": ("mlm", "bert-tiny", {"text_column": "text"}),
    "seq2seq": ("seq2seq", "t5-tiny", {"text_column": "document", "target_column": "summary"}),
    "clm-pairs": ("clm", "gpt2-tiny", {"prompt_column": "prompt", "response_column": "response"}),
    "clm-chats": ("clm", "gpt2-tiny", {"messages_column": "messages", "chat_template": TEMPLATE}),
}
FORMATS = ["json", "jsonl", "csv", "parquet", "txt", "jsonl.gz", "csv.bz2", "txt.xz", "json.xz",
           "parquet.gz", "xml"]


def spec_for(kind: str, files: list[str], **training: Any) -> JobSpec:
    objective, model, columns = OBJECTIVES[kind]
    return build_spec({"name": "formats", "objective": objective, "model": str(MODELS / model),
                       "dataset": {"train_files": files, **columns},
                       "training": {"max_length": 32, **training}})


def worker_loads(spec: JobSpec, tokenizer: Any) -> bool:
    """What a worker does with the data before its first step: load and tokenize it."""
    from workers.data import load_splits
    from workers.objectives import get_objective

    try:
        train, evaluation = load_splits(spec)
        get_objective(spec.objective).preprocess(spec, tokenizer, train, evaluation)
    except (ValueError, FileNotFoundError):
        return False
    return True


def test_preflight_accepts_exactly_what_the_worker_loads(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from workers.objectives import get_objective

    unreadable = {"parquet.gz", "xml"}
    no_columns = {"txt", "txt.xz"}  # a text file has one column, "text"
    flat = {"csv", "csv.bz2"}  # csv cannot hold lists of messages
    files = {fmt: write_data(tmp_path / f"data.{fmt}") for fmt in FORMATS}
    for kind in OBJECTIVES:
        # The model and tokenizer checks do not depend on the data: once per objective.
        spec = spec_for(kind, [str(files["jsonl"])])
        assert check_model_and_tokenizer(spec) == [], kind
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
        get_objective(spec.objective).prepare_tokenizer(spec, tokenizer)
        for fmt, path in files.items():
            spec = spec_for(kind, [str(path)])
            problems = check_dataset(spec)
            accepted, loaded = problems == [], worker_loads(spec, tokenizer)
            expected = not (fmt in unreadable or (fmt in no_columns and kind not in ("clm", "mlm"))
                            or (fmt in flat and kind == "clm-chats"))
            assert accepted == loaded == expected, (fmt, kind, problems)
            # Each problem names a field.
            assert all(p.split(":", 1)[0].startswith("dataset.") for p in problems), problems


def test_an_encoder_is_refused_for_clm_unless_its_config_says_decoder(tmp_path: Path) -> None:
    from workers.objectives import get_objective

    spec = spec_for("clm", [str(write_data(tmp_path / "d.jsonl"))])
    bert = spec.model_copy(update={"model": str(MODELS / "bert-tiny"),
                                   "tokenizer": str(MODELS / "gpt2-tiny")})
    problems = check_model_and_tokenizer(bert)
    assert len(problems) == 1 and problems[0].startswith("model: "), problems
    assert "'bert' encoder" in problems[0] and "objective clm" in problems[0]
    with pytest.raises(ValueError, match="'bert' encoder"):
        get_objective("clm").load_model(bert)

    decoder = tmp_path / "bert-decoder"
    shutil.copytree(MODELS / "bert-tiny", decoder)
    config = json.loads((decoder / "config.json").read_text())
    (decoder / "config.json").write_text(json.dumps({**config, "is_decoder": True}))
    as_decoder = bert.model_copy(update={"model": str(decoder)})
    assert check_model_and_tokenizer(as_decoder) == []
    get_objective("clm").load_model(as_decoder)  # the worker agrees

    gpt2_for_mlm = spec_for("mlm", spec.dataset.train_files or []).model_copy(
        update={"model": str(MODELS / "gpt2-tiny")})
    assert any(p.startswith("model: a 'gpt2' model has no mlm head")
               for p in check_model_and_tokenizer(gpt2_for_mlm))


def test_an_mlm_tokenizer_without_a_pad_token_is_refused_by_both(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from workers.objectives import get_objective

    model = tmp_path / "bert-no-pad"
    shutil.copytree(MODELS / "bert-tiny", model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model)
    spec = spec_for("mlm", [str(write_data(tmp_path / "d.jsonl"))]).model_copy(
        update={"model": str(model), "tokenizer": str(model)})
    problems = check_model_and_tokenizer(spec)
    assert problems and problems[0].startswith("tokenizer: ") and "pad token" in problems[0]
    loaded = AutoTokenizer.from_pretrained(model)
    assert loaded.pad_token is None
    with pytest.raises(ValueError, match="pad token"):
        get_objective("mlm").prepare_tokenizer(spec, loaded)


# ---------------------------------------------------------------------------------------
# Hub ids without a hub


def closed_port() -> int:
    with socket.socket() as probe:  # bound, then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """A hub cache holding `repo_id` as huggingface_hub lays it out (refs -> snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_are_looked_up_in_the_cache_first_and_the_hub_asked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "tiny-org/gpt2-tiny", MODELS / "gpt2-tiny")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(preflight_module, "_reachable", {})
    asked: list[str] = []
    real = preflight_module.hub_reachable
    monkeypatch.setattr(preflight_module, "hub_reachable", lambda: asked.append("hub") or real())

    spec = spec_for("clm", [str(write_data(tmp_path / "d.jsonl"))])
    cached = spec.model_copy(update={"model": "tiny-org/gpt2-tiny", "tokenizer": "tiny-org/gpt2-tiny"})
    assert check_model_and_tokenizer(cached) == []  # from the cache, the hub never asked
    assert asked == []

    missing = spec.model_copy(update={"model": "tiny-org/absent", "tokenizer": "tiny-org/absent"})
    problems = check_model_and_tokenizer(missing)
    assert len(problems) == 1 and asked == ["hub"]
    assert problems[0].startswith("model: cannot load 'tiny-org/absent': not in the local HF cache")
    assert "HF_HUB_OFFLINE=1" in problems[0] and "hf download tiny-org/absent" in problems[0]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    problems = check_model_and_tokenizer(missing)
    assert "HF_HUB_OFFLINE is set" in problems[0] and asked == ["hub"]  # not asked again


def test_a_hub_that_never_answers_is_given_up_on_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import constants

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(preflight_module, "_reachable", {})
        started = time.monotonic()
        assert preflight_module.hub_reachable(timeout=0.5) is False
        assert time.monotonic() - started < 5  # one try, no retries


def test_validate_offline_fails_fast_naming_hf_hub_offline(tmp_path: Path) -> None:
    """`orch validate --set model=gpt2` with no network and no HF_HUB_OFFLINE: one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    proc = run_orch(env, "validate", "jobs/gpt2_clm.yaml", "--set", "model=gpt2", timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model: cannot load 'gpt2'" in lines[0], proc.stderr
    assert "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------
# Instruction data refused at `orch validate`: one line naming the field, nothing written


def validate(tmp_path: Path, spec: dict[str, Any]) -> tuple[int, str]:
    spec_file = tmp_path / "spec.json"  # JSON is YAML
    spec_file.write_text(json.dumps(spec))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(cli, ["validate", str(spec_file)])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("case", "dataset", "objective", "expected"),
    [
        ("missing prompt column", {"prompt_column": "question", "response_column": "response"},
         "clm", "dataset.prompt_column: column 'question' not in train.jsonl"),
        ("bad messages", {"messages_column": "prompt", "chat_template": TEMPLATE}, "clm",
         "dataset.messages_column: row 0 of train.jsonl: must be a non-empty list"),
        ("bad message", {"messages_column": "broken", "chat_template": TEMPLATE}, "clm",
         "dataset.messages_column: row 0 of train.jsonl: message 0 must be a mapping with "
         "the keys role and content"),
        ("no chat template", {"messages_column": "messages"}, "clm",
         "dataset.chat_template: "),
        ("pairs on mlm", {"prompt_column": "prompt", "response_column": "response"}, "mlm",
         "dataset.prompt_column: instruction data is only for objective clm"),
        ("pairs and chats", {"prompt_column": "prompt", "response_column": "response",
                             "messages_column": "messages"}, "clm",
         "dataset.messages_column: give either messages_column (chats) or prompt_column"),
    ],
)
def test_bad_instruction_data_is_refused_at_validate(tmp_path: Path, case: str, dataset: dict,
                                                     objective: str, expected: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{**r, "broken": [{"from": "human", "value": "hi"}]} for r in ROWS]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = "gpt2-tiny" if objective == "clm" else "bert-tiny"
    code, output = validate(tmp_path, {
        "name": "bad", "objective": objective, "model": str(MODELS / model),
        "dataset": {"train_files": [str(data / "train.jsonl")], **dataset}})
    assert code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], (case, output)


def test_padding_free_is_refused_on_a_cpu_job(tmp_path: Path) -> None:
    code, output = validate(tmp_path, {
        "name": "pf", "objective": "clm", "model": str(MODELS / "gpt2-tiny"),
        "dataset": {"train_files": [str(ASSETS / "data" / "lm" / "train.jsonl")]},
        "training": {"packing": "padding_free"}})
    assert code == 1
    assert output.count("\n") == 1 and "training.packing: padding_free needs flash attention" in output
    assert "resources.gpus is 0" in output


def test_the_example_specs_pass_preflight() -> None:
    from orchestrator.spec import load_spec

    for path in sorted((REPO / "jobs").glob("*.yaml")):
        spec, _ = load_spec(path)
        assert check_dataset(spec) == [] and check_model_and_tokenizer(spec) == [], path.name
