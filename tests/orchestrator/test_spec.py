"""Unit tests of the job spec: parsing, validation messages, overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import JobSpec, SpecError, build_spec, load_spec, parse_override, parse_yaml

BASE = {
    "name": "t5-test",
    "objective": "seq2seq",
    "model": "google-t5/t5-small",
    "dataset": {"train_files": ["train.jsonl"], "eval_fraction": 0.1,
                "text_column": "document", "target_column": "summary"},
}


def problems_of(data: dict, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as info:
        build_spec(data, overrides)
    return str(info.value)


def test_minimal_seq2seq_spec_fills_objective_defaults() -> None:
    spec = build_spec(BASE)
    assert spec.tokenizer == "google-t5/t5-small"
    assert spec.training.max_target_length == 64
    assert spec.training.generation_max_length == 64
    assert spec.training.mlm_probability is None
    assert spec.checkpoints.best_metric == "eval_loss" and spec.checkpoints.best_mode == "min"


def test_mlm_and_clm_defaults() -> None:
    mlm = build_spec({**BASE, "objective": "mlm",
                      "dataset": {"train_files": "a.jsonl", "eval_fraction": 0.1}})
    assert mlm.training.mlm_probability == 0.15
    clm = build_spec({**BASE, "objective": "clm",
                      "dataset": {"train_files": "a.jsonl", "eval_fraction": 0.1}})
    assert clm.training.packing is False


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"foo": 1}, "foo: unknown key"),
        ({"objective": "gan"}, "objective: must be one of 'clm', 'mlm' or 'seq2seq'"),
        ({"resources": {"gpus": -1}}, "resources.gpus: must be >= 0"),
        ({"resources": {"gpus": 1.5}}, "resources.gpus: must be a whole number (got 1.5)"),
        ({"resources": {"gpus": "2"}}, "resources.gpus: must be a whole number (got '2')"),
        ({"resources": {"gpus": True}}, "resources.gpus: must be a whole number"),
        ({"training": {"epochs": 1, "max_steps": 10}}, "max_steps or epochs, not both"),
        ({"training": {"mlm_probability": 0.2}}, "training.mlm_probability: only for objective mlm"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate: must be > 0"),
        ({"training": {"save_steps": 15, "eval_steps": 10}}, "multiple of eval_steps"),
        ({"checkpoints": {"best_metric": "accuracy"}}, "checkpoints.best_metric"),
        ({"dataset": {"train_files": ["a"]}}, "dataset.target_column: required for seq2seq"),
        ({"dataset": {"name": "x", "train_files": ["a"], "target_column": "s"}},
         "give either `name`"),
        ({"training": {"bogus": 3}}, "training.bogus: unknown key in training; allowed keys"),
    ],
)
def test_bad_fields_are_named_with_a_fix(patch: dict, expected: str) -> None:
    assert expected in problems_of({**BASE, **patch})


def test_missing_required_fields() -> None:
    message = problems_of({"name": "x", "objective": "clm"})
    assert "model: required" in message and "dataset: required" in message


def test_target_column_refused_for_clm_and_mlm() -> None:
    for objective in ("clm", "mlm"):
        assert "dataset.target_column: only for seq2seq" in problems_of(
            {**BASE, "objective": objective})


def test_mlm_probability_range() -> None:
    data = {**BASE, "objective": "mlm", "dataset": {"train_files": "a", "eval_fraction": 0.1}}
    for bad in (0, 1, 1.5, -0.1):
        assert "training.mlm_probability: must be between 0 and 1" in problems_of(
            {**data, "training": {"mlm_probability": bad}})


def test_overrides_are_validated_like_the_file() -> None:
    spec = build_spec(BASE, ["training.learning_rate=1e-4", "resources.gpus=2",
                             "training.source_prefix=summarize: "])
    assert spec.training.learning_rate == pytest.approx(1e-4)
    assert spec.resources.gpus == 2
    assert spec.training.source_prefix == "summarize: "
    assert "resources.gpus: must be a whole number" in problems_of(BASE, ("resources.gpus=two",))
    assert "nope: unknown key" in problems_of(BASE, ("nope=1",))
    assert "write KEY=VALUE" in problems_of(BASE, ("training.learning_rate",))


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=1e-4") == ("a", 1e-4)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=true") == ("a", True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [1", "malformed YAML"),
        ("!!python/object/apply:os.system ['echo pwned']", "YAML tag not allowed"),
        ("name: !!python/name:os.system x", "YAML tag not allowed"),
        ("- a\n- b", "top level must be a mapping"),
        ("", "the file is empty"),
    ],
)
def test_yaml_is_plain_data_only(text: str, expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        parse_yaml(text, "x.yaml")


def test_load_spec_resolves_local_paths_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    spec_file = tmp_path / "sub" / "job.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text(
        "name: x\nobjective: seq2seq\nmodel: ../models/tiny\n"
        "dataset: {train_files: data/train.jsonl, eval_files: [data/eval.jsonl],"
        " text_column: d, target_column: s}\n"
    )
    spec, text = load_spec(spec_file)
    assert spec.model == str(tmp_path / "models" / "tiny")
    assert spec.tokenizer == spec.model
    assert spec.dataset.train_files == [str(tmp_path / "sub" / "data" / "train.jsonl")]
    assert text.startswith("name: x")
    # Hub ids stay hub ids.
    hub = build_spec(BASE, base_dir=tmp_path)
    assert hub.model == "google-t5/t5-small"


def test_missing_spec_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_to_dict_round_trips() -> None:
    spec = build_spec(BASE)
    assert JobSpec.model_validate(spec.to_dict()) == spec


def test_data_parallel_resources() -> None:
    single = build_spec(BASE)
    assert single.resources.num_workers == 1 and not single.resources.distributed
    gpus = build_spec(BASE, ["resources.gpus=4", "resources.cpus=3"])
    assert gpus.resources.workers == 4 and gpus.resources.total_cpus == 12
    cpu = build_spec(BASE, ["resources.workers=2", "resources.placement=spread"])
    assert cpu.resources.distributed and cpu.resources.gpus == 0
    assert cpu.resources.placement == "spread" and cpu.training.strategy == "ddp"
    assert build_spec(BASE, ["resources.gpus=2", "training.strategy=fsdp"]).training.strategy == "fsdp"
    assert "training.strategy: fsdp shards the model across GPU workers" in problems_of(
        BASE, ("resources.workers=2", "training.strategy=fsdp"))
    assert "resources.workers: with gpus > 0 each worker holds one GPU" in problems_of(
        BASE, ("resources.gpus=2", "resources.workers=3"))
    assert "resources.placement: must be one of" in problems_of(BASE, ("resources.placement=x",))
    assert "training.strategy: must be one of" in problems_of(BASE, ("training.strategy=zero3",))


def test_checkpoint_storage_is_a_path_resolved_against_the_spec_or_a_url(tmp_path: Path) -> None:
    spec = build_spec(BASE, ["checkpoints.storage=shared/runs"], base_dir=tmp_path)
    assert spec.checkpoints.storage == str(tmp_path / "shared" / "runs")
    url = build_spec(BASE, ["checkpoints.storage=s3://bucket/runs"], base_dir=tmp_path)
    assert url.checkpoints.storage == "s3://bucket/runs"  # not resolved as a relative path
    assert "checkpoints.storage: unknown URL scheme bogus://" in \
        problems_of(BASE, ("checkpoints.storage=bogus://bucket/runs",))


def test_a_mistyped_key_gets_a_suggestion() -> None:
    assert "training.learnig_rate: unknown key in training; did you mean learning_rate?" in \
        problems_of(BASE, ("training.learnig_rate=1e-4",))
    assert "dataset.prompt_colum: unknown key in dataset; did you mean prompt_column?" in \
        problems_of(BASE, ("dataset.prompt_colum=q",))
    # Nothing close: the allowed keys instead.
    assert "training.zzz: unknown key in training; allowed keys: batch_size," in \
        problems_of(BASE, ("training.zzz=1",))


CLM = {**BASE, "objective": "clm", "dataset": {"train_files": ["t.jsonl"], "eval_fraction": 0.1}}


def test_instruction_data_fields_and_defaults(tmp_path: Path) -> None:
    pairs = build_spec(CLM, ["dataset.prompt_column=q", "dataset.response_column=a"])
    assert pairs.dataset.instruction and pairs.training.train_on_prompt is False
    assert pairs.dataset.columns == {"dataset.prompt_column": "q", "dataset.response_column": "a"}
    assert pairs.training.generation_max_length == 64  # for eval_exact_match
    plain = build_spec(CLM)
    assert not plain.dataset.instruction and plain.training.train_on_prompt is None
    assert plain.dataset.columns == {"dataset.text_column": "text"}

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chats = build_spec(CLM, ["dataset.messages_column=messages", "dataset.chat_template=chat.jinja"],
                       base_dir=tmp_path)
    # The template travels in the spec, not as a path the workers may not see.
    assert chats.dataset.chat_template == template.read_text()
    inline = build_spec(CLM, ["dataset.messages_column=m", "dataset.chat_template=T {{ x }}"],
                        base_dir=tmp_path)
    assert inline.dataset.chat_template == "T {{ x }}"
    with pytest.raises(SpecError, match=r"dataset\.chat_template: cannot read .*nope\.jinja"):
        build_spec(CLM, ["dataset.messages_column=m", "dataset.chat_template=nope.jinja"],
                   base_dir=tmp_path)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("dataset.prompt_column=q",), "dataset.response_column: required with dataset.prompt_column"),
        (("dataset.prompt_column=q", "dataset.response_column=a", "dataset.messages_column=m"),
         "dataset.messages_column: give either messages_column (chats) or prompt_column"),
        (("dataset.chat_template=T {{ x }}",), "dataset.chat_template: only renders dataset.messages_column"),
        (("training.train_on_prompt=true",), "training.train_on_prompt: only for instruction data"),
        (("training.generation_max_length=8",), "training.generation_max_length: only for objective seq2seq"),
        (("training.packing=padding_free",), "training.packing: padding_free needs flash attention"),
        (("training.packing=padding_free", "resources.gpus=1"),
         "training.packing: padding_free runs flash attention, which needs training.precision bf16"),
        (("training.packing=sometimes",), "training.packing"),
        (("checkpoints.best_metric=eval_exact_match",),
         "checkpoints.best_metric: clm reports eval_loss, eval_perplexity; pick one"),
        (("dataset.prompt_column=q", "dataset.response_column=a", "checkpoints.best_metric=rougeL"),
         "checkpoints.best_metric: clm on instruction data reports eval_loss, eval_perplexity, "
         "eval_exact_match"),
    ],
)
def test_instruction_and_packing_rules(overrides: tuple[str, ...], expected: str) -> None:
    assert expected in problems_of(CLM, overrides)


def test_instruction_fields_are_clm_only_and_exact_match_ranks_instruction_jobs() -> None:
    for objective in ("mlm", "seq2seq"):
        message = problems_of({**BASE, "objective": objective},
                              ("dataset.prompt_column=q", "dataset.response_column=a"))
        assert "dataset.prompt_column: instruction data is only for objective clm" in message
    spec = build_spec(CLM, ["dataset.messages_column=m", "checkpoints.best_metric=exact_match"])
    assert spec.checkpoints.best_metric == "eval_exact_match" and spec.checkpoints.best_mode == "max"
    gpu = build_spec(CLM, ["training.packing=padding_free", "resources.gpus=1",
                           "training.precision=bf16"])
    assert gpu.training.packing == "padding_free"
