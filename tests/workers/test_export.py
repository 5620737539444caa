"""workers.export: the directory loads with from_pretrained alone and computes what the job's
model computes; adapters are merged (and kept); the card says what the job was."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
)

from orchestrator.spec import JobSpec, build_spec  # noqa: E402
from workers import export  # noqa: E402
from workers.adapters import load_for_inference  # noqa: E402
from workers.export import ExportInfo, ExportRefused, export_model  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "jobs" / "assets"
GPT2, T5 = str(ASSETS / "models" / "gpt2-tiny"), str(ASSETS / "models" / "t5-tiny")
TEXT = "the river flows past the old mill"


def spec_for(objective: str, model: str, **training: object) -> JobSpec:
    folder, extra = (("summarize", {"text_column": "document", "target_column": "summary"})
                     if objective == "seq2seq" else ("lm", {}))
    return build_spec({"name": "exported", "objective": objective, "model": model,
                       "dataset": {"train_files": [str(ASSETS / "data" / folder / "train.jsonl")],
                                   **extra},
                       "training": training})


def info_for(source: str) -> ExportInfo:
    return ExportInfo(job_id=7, job_name="exported", state="succeeded", which="best",
                      kind="checkpoint", step=40, source=source,
                      checkpoint_metrics={"eval_loss": 2.5},
                      job_metrics={"eval_loss": {"step": 60, "value": 2.25},
                                   "train_loss": {"step": 60, "value": 2.0}})


def logits(model: torch.nn.Module, tokenizer: object) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(TEXT, return_tensors="pt")).logits  # type: ignore[operator]


def test_a_full_model_exports_to_an_equal_self_contained_directory(tmp_path: Path) -> None:
    spec = spec_for("clm", GPT2)
    target = export_model(spec, info_for(GPT2), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
    loaded = AutoModelForCausalLM.from_pretrained(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    reference = load_for_inference(GPT2, "clm")
    assert torch.equal(logits(loaded, tokenizer), logits(reference.model, reference.tokenizer))
    assert tokenizer.pad_token == tokenizer.eos_token  # padded as clm training padded
    generation = GenerationConfig.from_pretrained(target)
    assert generation.do_sample is False and generation.pad_token_id == tokenizer.eos_token_id

    card = (target / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation")
    assert "job 7" in card and "checkpoint-40 (best)" in card
    assert "| eval_loss | 2.5 |" in card and "| eval_loss | 2.25 |" in card
    assert "train.jsonl" in card and "rows: 2000" in card and "learning_rate" in card
    facts = json.loads((target / export.PROVENANCE).read_text())
    assert facts["spec"] == spec.to_dict() and facts["model_kind"] == "full"
    assert facts["orch"]["version"] == "0.1.0"
    assert facts["data"]["train_files"][0]["rows"] == 2000


def test_an_adapter_exports_merged_and_kept(tmp_path: Path) -> None:
    """The export of an adapter loads with from_pretrained alone (no peft, no base model
    needed) and computes what base + adapter computes."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(GPT2)
    # Random B matrices: a fresh adapter is otherwise a no-op, and the test could not fail.
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                              fan_in_fan_out=True, init_lora_weights=False))
    adapter_dir = tmp_path / "adapter-final"
    wrapped.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(GPT2).save_pretrained(adapter_dir)

    target = export_model(spec_for("clm", GPT2), info_for(str(adapter_dir)), tmp_path / "out")
    assert (target / "model.safetensors").is_file() and not (target / "adapter_config.json").exists()
    assert json.loads((target / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == GPT2
    reference = load_for_inference(adapter_dir, "clm")  # the peft model, not merged
    tokenizer = AutoTokenizer.from_pretrained(target)
    exported = AutoModelForCausalLM.from_pretrained(target).eval()
    expected = logits(reference.model, reference.tokenizer)
    assert torch.allclose(logits(exported, tokenizer), expected, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(GPT2).eval()
    assert not torch.allclose(logits(plain, tokenizer), expected, atol=1e-3)
    assert "merged into its base model" in (target / "README.md").read_text()


def test_seq2seq_keeps_its_generation_settings_and_says_the_prefix(tmp_path: Path) -> None:
    spec = spec_for("seq2seq", T5, source_prefix="summarize: ", generation_max_length=9,
                    generation_num_beams=3)
    target = export_model(spec, info_for(T5), tmp_path / "out")
    generation = GenerationConfig.from_pretrained(target)
    assert (generation.max_length, generation.num_beams, generation.do_sample) == (9, 3, False)
    assert AutoModelForSeq2SeqLM.from_pretrained(target) is not None
    card = (target / "README.md").read_text()
    assert 'source_prefix "summarize: "' in card and "pipeline_tag: text2text-generation" in card
    assert json.loads((target / export.PROVENANCE).read_text())["source_prefix"] == "summarize: "


def test_a_used_target_is_refused_and_a_failure_leaves_nothing(tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ExportRefused, match="exists and is not empty"):
        export_model(spec_for("clm", GPT2), info_for(GPT2), used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ExportRefused, match="not a directory"):
        export_model(spec_for("clm", GPT2), info_for(GPT2), a_file)
    with pytest.raises(ExportRefused, match="does not exist"):
        export_model(spec_for("clm", GPT2), info_for(GPT2), tmp_path / "no" / "out")
    # A model that cannot be loaded: no target, no staging directory.
    broken = tmp_path / "broken"
    shutil.copytree(GPT2, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises
        export_model(spec_for("clm", GPT2), info_for(str(broken)), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "broken", "used"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_model(spec_for("clm", GPT2), info_for(GPT2), empty) == empty
    assert (empty / "config.json").is_file()


def test_a_chat_jobs_export_renders_chats_as_the_job_did(tmp_path: Path) -> None:
    pytest.importorskip("workers.objectives.instruction",
                        reason="instruction data is not in this orch yet")
    from orchestrator.spec import load_spec

    spec, _ = load_spec(ASSETS.parent / "gpt2_instruct.yaml")
    target = export_model(spec, info_for(GPT2), tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(target)
    chat = [{"role": "user", "content": "Which day comes after Tuesday?"}]
    # The job's template (the tiny GPT-2 has none of its own), with the generation prompt.
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "User: Which day comes after Tuesday?\nAssistant:")
    generation = GenerationConfig.from_pretrained(target)
    assert generation.max_new_tokens == spec.training.generation_max_length
    assert "apply_chat_template" in (target / "README.md").read_text()
