"""workers.inference: each objective answers as the job trained, checked against the model
called directly (the tiny models stand in for a job's final model: same directory layout)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)

from orchestrator.spec import JobSpec, build_spec  # noqa: E402
from workers import inference  # noqa: E402
from workers.inference import PredictError, Predictor, PromptStyle, RemoteRequest  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "jobs" / "assets"
GPT2, BERT, T5 = (str(ASSETS / "models" / m) for m in ("gpt2-tiny", "bert-tiny", "t5-tiny"))
# The instruction example's chat template (jobs/assets/templates/chat.jinja).
CHAT = ("{%- for message in messages -%}{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content'] + "
        "eos_token }}{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] }}"
        "{%- else -%}{{ message['content'] }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif -%}")


def spec_for(objective: str, model: str, **training: object) -> JobSpec:
    dataset: dict[str, object] = {"train_files": [str(ASSETS / "data" / "lm" / "train.jsonl")]}
    if objective == "seq2seq":
        dataset["target_column"] = "summary"
    return build_spec({"name": "t", "objective": objective, "model": model, "dataset": dataset,
                       "training": training})


@pytest.fixture(scope="module")
def clm() -> Predictor:
    return Predictor.load(spec_for("clm", GPT2), GPT2, device="cpu")


def test_clm_continues_greedily_and_batches_like_one_by_one(clm: Predictor) -> None:
    texts = ["the river", "a much longer text about the hills and the"]
    answers = clm.predict(texts, max_new_tokens=6)
    assert [a["input"] for a in answers] == texts
    tok = AutoTokenizer.from_pretrained(GPT2)
    model = AutoModelForCausalLM.from_pretrained(GPT2).eval()
    for text, answer in zip(texts, answers, strict=True):
        ids = tok(text, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        # Left padding in the batch changes nothing: each equals its own unpadded generation.
        assert answer["output"] == expected and expected
    assert set(answers[0]) == {"input", "output"}


def test_clm_without_max_new_tokens_uses_a_default(clm: Predictor) -> None:
    tok = clm.tokenizer
    out = clm.predict(["the"])[0]["output"]
    assert 0 < len(tok(out, add_special_tokens=False)["input_ids"]) <= inference.DEFAULT_NEW_TOKENS


def test_instruction_prompts_are_rendered_as_training_rendered_them(clm: Predictor) -> None:
    tok = clm.tokenizer
    # prompt/response data: the prompt as written, the tokenizer's specials, no eos.
    clm.style = PromptStyle("pair")
    assert clm.prompt_ids("Q: 2+2?\nAnswer:") == tok("Q: 2+2?\nAnswer:")["input_ids"]
    # Chats: the template with the generation prompt; a text is one user turn.
    clm.style = PromptStyle("chat", CHAT)
    rendered = "User: hello\nAssistant:"
    assert clm.prompt_ids("hello") == tok(rendered, add_special_tokens=False)["input_ids"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert clm.prompt_ids(chat) == tok("Be brief.\nUser: hi\nAssistant:",
                                       add_special_tokens=False)["input_ids"]
    answer = clm.predict([chat], max_new_tokens=3)[0]
    assert answer["input"] == chat and answer["output"] == answer["output"].strip()
    clm.style = PromptStyle()
    with pytest.raises(PredictError, match="only for jobs trained on chats"):
        clm.predict([chat])


def test_the_prompt_style_comes_from_the_jobs_dataset_fields() -> None:
    def spec(**data: object) -> SimpleNamespace:
        return SimpleNamespace(dataset=SimpleNamespace(**data))

    assert PromptStyle.of(spec(text_column="text")) == PromptStyle("plain")
    assert PromptStyle.of(spec(prompt_column="q", response_column="a")) == PromptStyle("pair")
    assert PromptStyle.of(spec(messages_column="m", chat_template=CHAT)) == PromptStyle("chat",
                                                                                        CHAT)


def test_mlm_fills_each_mask_with_its_top_k() -> None:
    predictor = Predictor.load(spec_for("mlm", BERT), BERT, device="cpu")
    text = "the cat sat on the [MASK] by the [MASK] ."
    answer = predictor.predict([text], top_k=3)[0]
    tok = AutoTokenizer.from_pretrained(BERT)
    model = AutoModelForMaskedLM.from_pretrained(BERT).eval()
    encoded = tok(text, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**encoded).logits[0], dim=-1)
    positions = (encoded["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist()
    assert [m["mask"] for m in answer["masks"]] == [0, 1]
    filled = encoded["input_ids"][0].clone()
    for mask, position in zip(answer["masks"], positions, strict=True):
        top = torch.topk(probs[position], 3)
        assert [c["token_id"] for c in mask["candidates"]] == top.indices.tolist()
        assert [c["probability"] for c in mask["candidates"]] == pytest.approx(top.values.tolist())
        filled[position] = top.indices[0]
    assert answer["output"] == tok.decode(filled, skip_special_tokens=True)
    assert "[MASK]" not in answer["output"]
    with pytest.raises(PredictError, match=r"input 2 has no \[MASK\] to fill"):
        predictor.predict([text, "no mask here"])


def test_seq2seq_generates_with_the_jobs_prefix_and_settings() -> None:
    spec = spec_for("seq2seq", T5, source_prefix="summarize: ", generation_max_length=7,
                    generation_num_beams=2)
    predictor = Predictor.load(spec, T5, device="cpu")
    seen: list[dict[str, object]] = []
    generate = predictor.model.generate

    def spy(**kwargs: object) -> object:
        seen.append(kwargs)
        return generate(**kwargs)

    predictor.model.generate = spy
    answer = predictor.predict(["the storm hit the coast"])[0]
    tok = AutoTokenizer.from_pretrained(T5)
    ids = tok("summarize: the storm hit the coast", return_tensors="pt")
    # The model saw the prefixed text and generated with the job's length and beams.
    assert seen[0]["input_ids"].tolist() == ids["input_ids"].tolist()
    assert (seen[0]["max_length"], seen[0]["num_beams"]) == (7, 2)
    model = AutoModelForSeq2SeqLM.from_pretrained(T5).eval()
    out = model.generate(**ids, max_length=7, num_beams=2, do_sample=False)
    assert answer == {"input": "the storm hit the coast",
                      "output": tok.decode(out[0], skip_special_tokens=True).strip()}
    predictor.predict(["x"], max_new_tokens=3)  # the command's length instead of the job's
    assert seen[-1]["max_new_tokens"] == 3 and "max_length" not in seen[-1]


def test_the_cluster_entrypoint_answers_in_one_marked_line(capsys: pytest.CaptureFixture[str]) -> None:
    request = RemoteRequest(spec=spec_for("mlm", BERT).to_dict(), location=BERT,
                            inputs=["a [MASK] b"], top_k=2)
    assert RemoteRequest.decode(request.encode()) == request
    assert inference.main([request.encode()]) == 0
    printed = capsys.readouterr().out
    result = inference.parse_result("some log line\n" + printed)
    assert result is not None and len(result["predictions"][0]["masks"][0]["candidates"]) == 2
    # The person's mistake comes back as one line, not a traceback.
    bad = RemoteRequest(spec=request.spec, location=BERT, inputs=["no mask"])
    assert "has no [MASK]" in inference.run_remote(bad)["error"]
    missing = RemoteRequest(spec=request.spec, location=str(ASSETS / "nothing"), inputs=["[MASK]"])
    assert "no model directory" in inference.run_remote(missing)["error"]
    assert inference.parse_result("no marker here") is None
    assert json.loads(json.dumps(result)) == result


def test_instruction_jobs_prompt_exactly_as_their_training_tokenized_prompts() -> None:
    """For the instruction example (chats) and its prompt/response variant, the tokens
    predict feeds the model are the training example's tokens up to its response."""
    instruction = pytest.importorskip("workers.objectives.instruction",
                                      reason="instruction data is not in this orch yet")
    from orchestrator.spec import load_spec

    jobs = ASSETS.parent
    rows = [json.loads(line) for line in
            (ASSETS / "data" / "instruct" / "eval.jsonl").read_text().splitlines()[:3]]
    chat_spec, _ = load_spec(jobs / "gpt2_instruct.yaml")
    pair_spec, _ = load_spec(jobs / "gpt2_instruct.yaml", [
        "dataset.messages_column=null", "dataset.chat_template=null",
        "dataset.prompt_column=prompt", "dataset.response_column=response"])
    for spec in (chat_spec, pair_spec):
        predictor = Predictor.load(spec, GPT2, device="cpu")
        tok = predictor.tokenizer
        for row in rows:
            if spec is chat_spec:
                assert predictor.style == PromptStyle("chat", spec.dataset.chat_template)
                segments = instruction.chat_segments(row["messages"], tok,
                                                     spec.dataset.chat_template)
                asked = row["messages"][:-1]  # the conversation up to the answer
            else:
                assert predictor.style == PromptStyle("pair")
                segments = instruction.pair_segments(row["prompt"], row["response"])
                asked = row["prompt"]
            example = instruction.encode(segments, tok, chat=spec is chat_spec,
                                         train_on_prompt=False, max_length=512)
            start = example[instruction.RESPONSE_START]
            assert predictor.prompt_ids(asked) == example["input_ids"][:start]
        # Answers are the response alone, at most the job's generation_max_length tokens.
        answer = predictor.predict([asked])[0]["output"]
        assert len(tok(answer, add_special_tokens=False)["input_ids"]) <= (
            spec.training.generation_max_length)
