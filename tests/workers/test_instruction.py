"""Instruction data for clm: labels on the responses only, chat templates, truncation,
packing, and eval_exact_match, end to end on the committed tiny GPT-2 and instruct data.

Set ORCH_EXAMPLE_JOBS=1 to also run jobs/gpt2_instruct.yaml in full and check that exact
match rises well above the untrained model's (about a minute or two on 2 CPUs).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from orchestrator.spec import INSTRUCTION_METRICS, JobSpec, build_spec, load_spec  # noqa: E402
from workers.objectives import get_objective  # noqa: E402
from workers.objectives.instruction import RESPONSE_START, ClmTrainer  # noqa: E402
from workers.training import run_training  # noqa: E402

JOBS = Path(__file__).resolve().parents[2] / "jobs"
ASSETS = JOBS / "assets"
GPT2 = ASSETS / "models" / "gpt2-tiny"
TEMPLATE = (ASSETS / "templates" / "chat.jinja").read_text()
EOS = "<|endoftext|>"


def instruct_spec(**training: Any) -> JobSpec:
    dataset = training.pop("dataset", {"prompt_column": "prompt", "response_column": "response"})
    resources = training.pop("resources", {})
    return build_spec({
        "name": "instruct", "objective": "clm", "model": str(GPT2),
        "dataset": {"train_files": [str(ASSETS / "data" / "instruct" / "train.jsonl")], **dataset},
        "training": {"max_length": 64, **training}, "resources": resources,
    })


def prepared(spec: JobSpec) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    get_objective("clm").prepare_tokenizer(spec, tokenizer)
    return tokenizer


def preprocess(spec: JobSpec, rows: list[dict[str, Any]]) -> tuple[Dataset, Dataset]:
    tokenizer = prepared(spec)
    raw = Dataset.from_list(rows)
    train, evaluation = get_objective("clm").preprocess(spec, tokenizer, raw, raw)
    assert evaluation is not None
    return train, evaluation


PAIRS = [{"prompt": "What is 3 plus 4?\nAnswer:", "response": " 7"},
         {"prompt": "Which day comes after Monday?\nAnswer:", "response": " Tuesday"}]


def test_prompt_tokens_are_not_learned_and_response_tokens_are() -> None:
    spec = instruct_spec()
    tokenizer = prepared(spec)
    train, evaluation = preprocess(spec, PAIRS)
    assert train.column_names == ["input_ids", "labels"]
    for row, pair in zip(evaluation, PAIRS, strict=True):
        prompt = tokenizer(pair["prompt"])["input_ids"]
        response = tokenizer(pair["response"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt + response + [tokenizer.eos_token_id]
        assert row["labels"] == [-100] * len(prompt) + response + [tokenizer.eos_token_id]
        assert row[RESPONSE_START] == len(prompt)

    # The collated batch pads labels with -100 and keeps them aligned with the inputs.
    batch = get_objective("clm").collator(spec, tokenizer, None)(
        [{k: train[i][k] for k in ("input_ids", "labels")} for i in range(2)])
    learned = batch["labels"] != -100
    assert torch.equal(batch["labels"][learned], batch["input_ids"][learned])
    assert int(learned.sum()) == sum(len(tokenizer(p["response"])["input_ids"]) + 1 for p in PAIRS)

    everything, _ = preprocess(instruct_spec(train_on_prompt=True), PAIRS)
    assert everything["labels"] == everything["input_ids"]


def test_the_shipped_chat_template_renders_turns_and_learns_assistant_turns_only() -> None:
    spec = instruct_spec(dataset={"messages_column": "messages", "chat_template": TEMPLATE})
    tokenizer = prepared(spec)
    chat = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 3 plus 4?"},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "And 2 plus 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Thanks"}]
    rendered = tokenizer.apply_chat_template(chat[:5], tokenize=False, chat_template=TEMPLATE)
    assert rendered == (f"Answer briefly.\nUser: What is 3 plus 4?\nAssistant: 7{EOS}\n"
                        f"User: And 2 plus 2?\nAssistant: 4{EOS}")
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, chat_template=TEMPLATE,
                                           add_generation_prompt=True)
    assert prompt == "Answer briefly.\nUser: What is 3 plus 4?\nAssistant:"

    _, evaluation = preprocess(spec, [{"messages": chat}])
    row = evaluation[0]
    ids, labels = row["input_ids"], row["labels"]
    # The text is the rendering up to the last assistant turn (the trailing user turn has
    # nothing to learn), ending with eos.
    assert tokenizer.decode(ids) == rendered
    learned = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(learned) == f" 7{EOS} 4{EOS}"
    # Generation for exact match continues everything before the last answer.
    assert tokenizer.decode(ids[:row[RESPONSE_START]]).endswith("And 2 plus 2?\nAssistant:")


def test_truncation_keeps_the_response_and_chats_without_an_answer_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = instruct_spec(max_length=16)
    tokenizer = prepared(spec)
    long_prompt = "Which town does this sentence name? " + "A storm hit Norbury. " * 20 + "\nAnswer:"
    train, _ = preprocess(spec, [{"prompt": long_prompt, "response": " Norbury"}])
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    response = tokenizer(" Norbury", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) == 16
    assert ids[-len(response):] == response == labels[-len(response):]  # the answer is whole
    assert tokenizer.decode(ids[: -len(response)]).endswith("Norbury. \nAnswer:")  # the prompt's end

    chats = instruct_spec(dataset={"messages_column": "messages", "chat_template": TEMPLATE})
    rows = [{"messages": [{"role": "user", "content": "Hello?"}]},
            {"messages": [{"role": "user", "content": "2 plus 2?"},
                          {"role": "assistant", "content": "4"}]}]
    with caplog.at_level(logging.WARNING, logger="workers.objectives.instruction"):
        train, evaluation = preprocess(chats, rows)
    assert len(train) == len(evaluation) == 1
    assert any("dropped 1 of 2 train examples" in r.getMessage() for r in caplog.records)


def test_packed_instruction_blocks_keep_each_examples_labels() -> None:
    spec = instruct_spec(packing=True, max_length=16)
    rows = PAIRS * 6
    unpacked, _ = preprocess(instruct_spec(max_length=16), rows)
    train, evaluation = preprocess(spec, rows)
    joined_ids = [t for ids in unpacked["input_ids"] for t in ids]
    joined_labels = [t for labels in unpacked["labels"] for t in labels]
    assert all(len(ids) == 16 for ids in train["input_ids"])
    assert [t for ids in train["input_ids"] for t in ids] == joined_ids[: 16 * len(train)]
    assert [t for ls in train["labels"] for t in ls] == joined_labels[: 16 * len(train)]
    assert len(evaluation) == len(rows)  # eval examples are never packed
    batch = get_objective("clm").collator(spec, prepared(spec), None)(
        [{k: train[i][k] for k in ("input_ids", "labels", "attention_mask")} for i in range(2)])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)


def test_padding_free_flattens_each_batch_with_restarting_positions() -> None:
    spec = instruct_spec(packing="padding_free", precision="bf16", resources={"gpus": 1})
    train, _ = preprocess(spec, PAIRS)
    batch = get_objective("clm").collator(spec, prepared(spec), None)(
        [{k: train[i][k] for k in ("input_ids", "labels")} for i in range(2)])
    lengths = [len(ids) for ids in train["input_ids"]]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["position_ids"][0].tolist() == [*range(lengths[0]), *range(lengths[1])]
    assert batch["labels"][0, lengths[0]] == -100  # nothing before an example predicts its start


def test_padding_free_without_flash_attention_is_refused_by_the_worker() -> None:
    spec = instruct_spec(packing="padding_free", precision="bf16", resources={"gpus": 1})
    with pytest.raises(ValueError, match=r"training\.packing: padding_free needs flash attention"):
        get_objective("clm").load_model(spec)


def test_batched_generation_is_the_same_as_one_at_a_time() -> None:
    """eval_exact_match generates left-padded batches; padding must not change an answer."""
    spec = instruct_spec()
    tokenizer = prepared(spec)
    model = AutoModelForCausalLM.from_pretrained(GPT2)
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PAIRS] + [tokenizer("Hi")["input_ids"]]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
             for p in prompts]
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    together = model.generate(**batch, max_new_tokens=5, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:]
    assert together.tolist() == alone


class Evaluations(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, float]]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                    **kwargs: Any) -> None:
        self.seen.append((state.global_step, dict(metrics)))


def test_instruction_job_reports_exact_match_and_ranks_checkpoints_by_it(tmp_path: Path) -> None:
    """The example spec, cut to a few steps: the wiring end to end (the learning itself is
    the opt-in test below)."""
    from tests.support import attempt_session
    from workers import attempt

    spec, text = load_spec(JOBS / "gpt2_instruct.yaml", [
        "training.max_steps=4", "training.eval_steps=2", "training.save_steps=2",
        "dataset.max_train_samples=64", "dataset.max_eval_samples=8", "training.logging_steps=1",
        "training.warmup_steps=0", "training.generation_max_length=4"])
    assert spec.checkpoints.best_metric == "eval_exact_match" and spec.checkpoints.best_mode == "max"
    evaluations = Evaluations()
    with attempt_session(tmp_path, spec) as session:
        store, job_id = session.store, session.job_id
        client = session.client()
        final = attempt.train(attempt.begin(client, where="here", details={}), client,
                              callbacks=[evaluations])
        run = Path(store.require_job(job_id).artifact_dir)
        stored = [m.step for m in store.metrics(job_id, "eval_exact_match")]
        ckpts = [c for c in store.checkpoints(job_id) if c.kind == "checkpoint"]
    assert [step for step, _ in evaluations.seen] == [0, 2, 4]
    for _, metrics in evaluations.seen:
        assert set(INSTRUCTION_METRICS) <= set(metrics)
        assert 0.0 <= metrics["eval_exact_match"] <= 1.0
    assert evaluations.seen[0][1]["eval_exact_match"] == 0.0  # the untrained model
    assert final["eval_exact_match"] == evaluations.seen[-1][1]["eval_exact_match"]
    assert stored == [0, 2, 4]
    assert all("eval_exact_match" in c.metrics for c in ckpts)
    assert sum(c.is_best for c in ckpts) == 1
    # The final model answers greedily, generation_max_length tokens at most, by default.
    final_model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert final_model.generation_config.max_new_tokens == 4
    assert final_model.generation_config.do_sample is False


def test_exact_match_counts_only_identical_answers() -> None:
    spec = instruct_spec()
    tokenizer = prepared(spec)
    _, evaluation = preprocess(spec, PAIRS)

    class Scripted(torch.nn.Module):
        """Answers the first prompt right and the second wrong, whatever the weights."""

        def __init__(self) -> None:
            super().__init__()
            self.training = False

        def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            answers = [tokenizer(" 7")["input_ids"] + [tokenizer.eos_token_id],
                       tokenizer(" Tuesday!")["input_ids"] + [tokenizer.eos_token_id]]
            width = max(map(len, answers))
            tails = [a + [tokenizer.eos_token_id] * (width - len(a)) for a in answers]
            return torch.cat([input_ids, torch.tensor(tails[: len(input_ids)])], dim=1)

    trainer = ClmTrainer.__new__(ClmTrainer)
    trainer.model = Scripted()
    trainer.processing_class = tokenizer
    trainer.args = type("A", (), {"process_index": 0, "world_size": 1, "device": "cpu",
                                  "per_device_eval_batch_size": 8})()
    trainer.autocast_smart_context_manager = lambda: torch.autocast("cpu", enabled=False)
    assert trainer.exact_match(evaluation) == 0.5


# ---------------------------------------------------------------------------------------
# Does the example learn? (opt-in: ORCH_EXAMPLE_JOBS=1)


@pytest.mark.skipif(os.environ.get("ORCH_EXAMPLE_JOBS") != "1",
                    reason="the full instruction example: set ORCH_EXAMPLE_JOBS=1 (1-2 minutes)")
def test_the_instruction_example_learns_to_answer(tmp_path: Path) -> None:
    spec, _ = load_spec(JOBS / "gpt2_instruct.yaml")
    evaluations = Evaluations()
    started = time.monotonic()
    final = run_training(spec, tmp_path, callbacks=[evaluations])
    wall = time.monotonic() - started
    before = evaluations.seen[0][1]
    summary = (f"gpt2_instruct.yaml: {wall:.1f}s wall, {spec.training.max_steps} steps, "
               f"eval_loss {before['eval_loss']:.3f} -> {final['eval_loss']:.3f}, "
               f"eval_exact_match {before['eval_exact_match']:.3f} -> "
               f"{final['eval_exact_match']:.3f}")
    print(summary)
    print(json.dumps([(step, round(m["eval_exact_match"], 3)) for step, m in evaluations.seen]))
    assert before["eval_exact_match"] < 0.05, summary
    assert final["eval_exact_match"] > 0.4, summary
