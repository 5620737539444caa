"""Unit tests of the job spec: parsing, validation messages, overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import (
    JobSpec,
    SpecError,
    build_spec,
    load_spec,
    parse_override,
    parse_yaml,
    spec_from_dict,
)
from tests.support import BILLION_LAUGHS

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


# -- bounds: every field with a sane range has one, and the error names the bound ----------
@pytest.mark.parametrize(("override", "expected"), [
    ("training.max_steps=10000001", "training.max_steps: must be <= 10000000"),
    ("training.max_length=1048577", "training.max_length: must be <= 1048576"),
    ("training.batch_size=65537", "training.batch_size: must be <= 65536"),
    ("training.eval_batch_size=0", "training.eval_batch_size: must be >= 1"),
    ("training.gradient_accumulation_steps=100000", "training.gradient_accumulation_steps: must be <= 65536"),
    ("training.warmup_steps=-1", "training.warmup_steps: must be >= 0"),
    ("training.warmup_steps=20000000", "training.warmup_steps: must be <= 10000000"),
    ("training.logging_steps=20000000", "training.logging_steps: must be <= 10000000"),
    ("training.eval_steps=20000000", "training.eval_steps: must be <= 10000000"),
    ("training.save_steps=20000000", "training.save_steps: must be <= 10000000"),
    ("training.dataloader_workers=257", "training.dataloader_workers: must be <= 256"),
    ("training.seed=-1", "training.seed: must be >= 0"),
    ("training.seed=4294967296", "training.seed: must be <= 4294967295"),
    ("training.learning_rate=11", "training.learning_rate: must be <= 10"),
    ("training.epochs=1000000", "training.epochs: must be <= 100000"),
    ("training.weight_decay=11", "training.weight_decay: must be <= 10"),
    ("training.max_target_length=1048577", "training.max_target_length: must be <= 1048576"),
    ("training.generation_max_length=0", "training.generation_max_length: must be >= 1"),
    ("training.generation_num_beams=65", "training.generation_num_beams: must be <= 64"),
    ("checkpoints.keep_last=1001", "checkpoints.keep_last: must be <= 1000"),
    ("resources.gpus=4097", "resources.gpus: must be <= 4096"),
    ("resources.cpus=4097", "resources.cpus: must be <= 4096"),
    ("resources.workers=4097", "resources.workers: must be <= 4096"),
    ("dataset.max_train_samples=1000000000001", "dataset.max_train_samples: must be <= 1000000000000"),
    ("dataset.max_eval_samples=0", "dataset.max_eval_samples: must be >= 1"),
    ("retries=101", "retries: must be <= 100"),
    ("priority=2147483648", "priority: must be <= 2147483647"),
    ("priority=-2147483649", "priority: must be >= -2147483648"),
])
def test_numbers_out_of_range_name_the_field_and_the_bound(override: str, expected: str) -> None:
    message = problems_of(BASE, (override,))
    assert expected in message and "\n" not in message


def test_a_32_bit_priority_is_accepted() -> None:
    assert build_spec(BASE, ["priority=2147483647"]).priority == 2**31 - 1
    assert build_spec(BASE, ["priority=-2147483648"]).priority == -(2**31)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "Infinity", "NaN"])
@pytest.mark.parametrize("field", ["training.learning_rate", "training.epochs",
                                   "training.weight_decay", "dataset.eval_fraction"])
def test_nan_and_infinity_are_refused_everywhere(field: str, value: str) -> None:
    data = {**BASE, "dataset": {**BASE["dataset"], "eval_fraction": None}}
    assert f"{field}: must be a finite number" in problems_of(data, (f"{field}={value}",))


def test_python_floats_nan_and_infinity_are_refused_as_the_api_receives_them() -> None:
    for value in (float("inf"), float("-inf"), float("nan")):
        assert "training.learning_rate: must be a finite number" in problems_of(
            {**BASE, "training": {"learning_rate": value}})


def test_strings_and_lists_have_length_limits() -> None:
    assert "name: at most 100 characters (got 101)" in problems_of({**BASE, "name": "a" * 101})
    message = problems_of({**BASE, "model": "m" * 5000})
    assert "model: at most 4096 characters (got 5000); shorten it" in message
    assert "m" * 200 not in message  # the value is not echoed back
    files = {**BASE["dataset"], "train_files": [f"/d/{i}.jsonl" for i in range(1001)]}
    assert "dataset.train_files: at most 1000 entries (got 1001)" in problems_of(
        {**BASE, "dataset": files})
    assert "training.source_prefix: at most 4096 characters" in problems_of(
        {**BASE, "training": {"source_prefix": "x" * 4097}})
    long_value = problems_of(BASE, ("resources.gpus=" + "x" * 3000,))
    assert len(long_value) < 300  # a bad value is quoted cut short


def test_yaml_aliases_are_refused_before_anything_expands() -> None:
    """10^9 "lol"s in under 500 bytes: refused at the first alias (line 4), so nothing is
    ever expanded; a parser that expanded it would not come back at all."""
    assert len(BILLION_LAUGHS.encode()) < 500
    with pytest.raises(SpecError) as caught:
        parse_yaml(BILLION_LAUGHS, "bomb.yaml")
    assert str(caught.value) == ("bomb.yaml: line 4: YAML aliases (*name) are not allowed in a "
                                 "spec; write the value out where it is used")
    # An anchor alone expands nothing: plain data, allowed.
    assert parse_yaml("name: &n x\n")["name"] == "x"
    with pytest.raises(SpecError, match=r"--set name: YAML aliases \(\*name\) are not allowed"):
        parse_override("name=[*a]")


def test_deeply_nested_or_huge_yaml_is_one_line() -> None:
    with pytest.raises(SpecError, match="nested too deeply"):
        parse_yaml("a: " + "[" * 800 + "]" * 800)
    with pytest.raises(SpecError, match="a spec is at most 1048576"):
        parse_yaml("a: " + "x" * 2**20)


def test_a_nul_character_anywhere_is_refused_naming_where() -> None:
    message = problems_of({**BASE, "model": "a\0b", "dataset": {
        **BASE["dataset"], "train_files": ["/d/ok.jsonl", "/d/x\0.jsonl"]}})
    assert "model: holds a NUL character" in message
    assert "dataset.train_files.1: holds a NUL character" in message


def test_deeply_nested_data_from_the_api_is_one_problem() -> None:
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(SpecError, match="nested too deeply"):
        spec_from_dict({**BASE, "model": deep})  # what the server validates


@pytest.mark.parametrize(
    ("adapter", "expected"),
    [
        ({"method": "ia3"}, "adapter.method: must be one of 'lora' or 'qlora' (got 'ia3')"),
        ({"r": 0}, "adapter.r: must be > 0 (got 0)"),
        ({"r": 4.5}, "adapter.r: must be a whole number (got 4.5)"),
        ({"alpha": 0}, "adapter.alpha: must be > 0"),
        ({"dropout": 1.0}, "adapter.dropout: must be < 1"),
        ({"dropout": -0.1}, "adapter.dropout: must be >= 0"),
        ({"target_modules": []}, "adapter.target_modules: empty; name at least one module"),
        ({"target_modules": ["q", ""]}, "adapter.target_modules: module names must be non-empty"),
        ({"merge": "yes"}, "adapter.merge:"),
        ({"rank": 8}, "adapter.rank: unknown key in adapter; allowed keys: alpha, dropout, merge, "
                      "method, r, target_modules"),
        ({"method": "qlora"}, "adapter.method: qlora loads the base model in 4 bits with "
                              "bitsandbytes, which needs a CUDA GPU; set resources.gpus: 1"),
    ],
)
def test_bad_adapter_fields_are_named(adapter: dict, expected: str) -> None:
    assert expected in problems_of({**BASE, "adapter": adapter})


def test_adapter_section_defaults_and_qlora_rules() -> None:
    assert build_spec(BASE).adapter is None  # no section: every weight trains
    lora = build_spec({**BASE, "adapter": {}}).adapter
    assert lora is not None and (lora.method, lora.r, lora.alpha, lora.dropout) == ("lora", 16, 32, 0.05)
    assert lora.target_modules is None and lora.merge is False
    one = build_spec(BASE, ["adapter.target_modules=q", "adapter.merge=true"]).adapter
    assert one is not None and one.target_modules == ["q"] and one.merge is True
    linear = build_spec(BASE, ["adapter.target_modules=all-linear"]).adapter
    assert linear is not None and linear.target_modules == "all-linear"
    qlora = build_spec(BASE, ["adapter.method=qlora", "resources.gpus=1"]).adapter
    assert qlora is not None and qlora.method == "qlora"
    assert "qlora is not supported with training.strategy fsdp" in problems_of(
        BASE, ("adapter.method=qlora", "resources.gpus=2", "training.strategy=fsdp"))
    # Round trip: the stored spec validates again (the worker reads it back).
    assert JobSpec.model_validate(build_spec(BASE, ["adapter.r=8"]).to_dict()).adapter.r == 8


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
