"""What each objective feeds the model: tokenization, padding, labels and masking.

Uses the committed tiny tokenizers and models under jobs/assets (see make_assets.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from orchestrator.spec import JobSpec, build_spec  # noqa: E402
from workers.objectives import get_objective  # noqa: E402

JOBS = Path(__file__).resolve().parents[2] / "jobs"
MODELS = JOBS / "assets" / "models"
DATA = JOBS / "assets" / "data"


def spec_for(objective: str, model: str, **training: object) -> JobSpec:
    data = {
        "name": "unit",
        "objective": objective,
        "model": str(MODELS / model),
        "dataset": {"train_files": [str(DATA / "lm" / "train.jsonl")]},
        "training": training,
    }
    if objective == "seq2seq":
        data["dataset"] = {"train_files": [str(DATA / "summarize" / "train.jsonl")],
                           "text_column": "document", "target_column": "summary"}
    return build_spec(data)


def read_jsonl(path: Path, n: int) -> list[dict[str, str]]:
    with path.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


# ---------------------------------------------------------------------------------------
# clm


def test_clm_labels_are_input_ids_with_padding_ignored() -> None:
    spec = spec_for("clm", "gpt2-tiny", max_length=32)
    clm = get_objective("clm")
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    assert tokenizer.pad_token is None  # GPT-2 style: the objective must supply one
    clm.prepare_tokenizer(spec, tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token

    raw = Dataset.from_dict({"text": ["A storm hit Norbury.", "Norbury council approves a "
                                      "new bridge costing 12 million dollars this year."]})
    train, _ = clm.preprocess(spec, tokenizer, raw, None)
    lengths = [len(ids) for ids in train["input_ids"]]
    assert lengths[0] < lengths[1] <= 32

    batch = clm.collator(spec, tokenizer, None)([train[0], train[1]])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == (2, lengths[1])
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert (labels[mask == 0] == -100).all()
    assert int((mask[0] == 0).sum()) == lengths[1] - lengths[0]


def test_clm_packing_makes_full_blocks_separated_by_eos() -> None:
    spec = spec_for("clm", "gpt2-tiny", max_length=64, packing=True)
    clm = get_objective("clm")
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    clm.prepare_tokenizer(spec, tokenizer)
    rows = read_jsonl(DATA / "lm" / "train.jsonl", 40)
    raw = Dataset.from_list([*rows[:20], {"text": ""}, {"text": "  "}, *rows[20:]])
    train, _ = clm.preprocess(spec, tokenizer, raw, None)  # blank texts are skipped

    total = sum(len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows)  # +1: eos each
    assert len(train) == total // 64
    assert all(len(ids) == 64 for ids in train["input_ids"])
    joined = [t for ids in train["input_ids"] for t in ids]
    assert tokenizer.eos_token_id in joined  # documents are separated
    batch = clm.collator(spec, tokenizer, None)([train[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 64)
    assert (batch["attention_mask"] == 1).all()


def test_clm_needs_pad_or_eos() -> None:
    spec = spec_for("clm", "gpt2-tiny")
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        get_objective("clm").prepare_tokenizer(spec, tokenizer)


# ---------------------------------------------------------------------------------------
# mlm


def test_mlm_masks_about_mlm_probability_and_labels_only_masked() -> None:
    probability = 0.2
    spec = spec_for("mlm", "bert-tiny", max_length=128, mlm_probability=probability)
    mlm = get_objective("mlm")
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    mlm.prepare_tokenizer(spec, tokenizer)
    raw = Dataset.from_list(read_jsonl(DATA / "lm" / "train.jsonl", 256))
    train, _ = mlm.preprocess(spec, tokenizer, raw, None)
    features = [train[i] for i in range(len(train))]
    original = [torch.tensor(f["input_ids"]) for f in features]

    torch.manual_seed(0)
    batch = mlm.collator(spec, tokenizer, None)(features)
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    padded = torch.full_like(ids, tokenizer.pad_token_id)
    for row, seq in enumerate(original):
        padded[row, : len(seq)] = seq

    special = torch.isin(padded, torch.tensor(tokenizer.all_special_ids))
    picked = labels != -100
    candidates = (attention == 1) & ~special
    fraction = picked.sum().item() / candidates.sum().item()
    assert candidates.sum() > 10_000  # a big enough sample for the tolerance below
    assert abs(fraction - probability) < 0.015, fraction
    # Never a special token or padding; labels hold the original token where picked.
    assert not (picked & ~candidates).any()
    assert torch.equal(labels[picked], padded[picked])
    # Unpicked positions keep their token; most picked ones become [MASK] (80/10/10).
    assert torch.equal(ids[~picked], padded[~picked])
    masked = (ids[picked] == tokenizer.mask_token_id).float().mean().item()
    assert 0.75 < masked < 0.85, masked


def test_mlm_needs_a_mask_token() -> None:
    spec = spec_for("mlm", "bert-tiny")
    gpt2_tokenizer = AutoTokenizer.from_pretrained(MODELS / "gpt2-tiny")
    with pytest.raises(ValueError, match="no mask token"):
        get_objective("mlm").prepare_tokenizer(spec, gpt2_tokenizer)


def test_mlm_accuracy_counts_only_masked_positions() -> None:
    spec = spec_for("mlm", "bert-tiny")
    mlm = get_objective("mlm")
    logits = torch.zeros(1, 4, 10)
    logits[0, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0
    preds = mlm.preprocess_logits_for_metrics(logits, None)
    assert preds.tolist() == [[1, 2, 3, 4]]
    labels = torch.tensor([[1, -100, 9, -100]])
    metrics = mlm.compute_metrics(spec, None)(
        type("P", (), {"predictions": preds.numpy(), "label_ids": labels.numpy()})()
    )
    assert metrics == {"accuracy": 0.5}


# ---------------------------------------------------------------------------------------
# seq2seq


def test_seq2seq_labels_padded_with_minus_100_and_prefix_added() -> None:
    spec = spec_for("seq2seq", "t5-tiny", max_length=16, max_target_length=6,
                    source_prefix="summarize: ")
    s2s = get_objective("seq2seq")
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    model = AutoModelForSeq2SeqLM.from_pretrained(spec.model)
    raw = Dataset.from_list([
        {"document": "A storm hit Norbury on Monday and closed 12 roads.",
         "summary": "storm closes 12 roads in Norbury"},
        {"document": "A fire broke out at a bakery in Eastvale.",
         "summary": "fire damages bakery"},
    ])
    train, _ = s2s.preprocess(spec, tokenizer, raw, None)
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels"}
    assert tokenizer.decode(train[0]["input_ids"]).startswith("summarize: A storm")
    assert all(len(ids) <= 16 for ids in train["input_ids"])
    assert len(train[0]["labels"]) == 6  # truncated to max_target_length, </s> kept
    assert train[0]["labels"][-1] == tokenizer.eos_token_id

    batch = s2s.collator(spec, tokenizer, model)([train[0], train[1]])
    labels = batch["labels"]
    short = len(train[1]["labels"])
    assert labels.shape == (2, 6)
    assert (labels[1, short:] == -100).all()
    assert (labels[1, :short] != -100).all()
    # decoder_input_ids: labels shifted right behind the decoder start token (pad for T5).
    decoder = batch["decoder_input_ids"]
    assert (decoder[:, 0] == model.config.decoder_start_token_id).all()
    assert torch.equal(decoder[0, 1:], labels[0, :-1])


def test_seq2seq_metrics_score_rouge_and_bleu() -> None:
    import numpy as np

    spec = spec_for("seq2seq", "t5-tiny")
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "t5-tiny")
    s2s = get_objective("seq2seq")
    refs = ["storm closes 12 roads in Norbury", "fire damages bakery in Eastvale"]
    outs = ["storm closes 12 roads in Norbury", "fire damages hotel"]

    def pad(texts: list[str], value: int) -> np.ndarray:
        ids = [tokenizer(t)["input_ids"] for t in texts]
        width = max(map(len, ids))
        return np.array([seq + [value] * (width - len(seq)) for seq in ids])

    pred = type("P", (), {"predictions": pad(outs, -100), "label_ids": pad(refs, -100)})()
    metrics = s2s.compute_metrics(spec, tokenizer)(pred)
    assert set(metrics) == {"rouge1", "rouge2", "rougeL", "bleu", "gen_len"}
    # First pair perfect (100); second: LCS "fire damages", P = 2/3, R = 2/5, so F = 0.5.
    assert metrics["rougeL"] == pytest.approx((100 + 50) / 2)
    assert 0 < metrics["bleu"] < 100


# ---------------------------------------------------------------------------------------
# clm: every document ends with eos, and the eos is a target (pad == eos must not hide it)


@pytest.mark.parametrize("packing", [False, True])
def test_clm_eos_is_appended_and_kept_as_a_label(packing: bool) -> None:
    spec = spec_for("clm", "gpt2-tiny", max_length=32, packing=packing)
    clm = get_objective("clm")
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    clm.prepare_tokenizer(spec, tokenizer)
    eos = tokenizer.eos_token_id
    docs = ["A storm hit Norbury.", "Fire damages bakery in Eastvale.", "Leo Adams elected mayor.",
            "Norbury council approves a new bridge.", "Crews cleared the roads."]
    train, _ = clm.preprocess(spec, tokenizer, Dataset.from_dict({"text": docs * 4}), None)
    batch = clm.collator(spec, tokenizer, None)([train[i] for i in range(min(4, len(train)))])
    ids, labels = batch["input_ids"], batch["labels"]
    at_eos = ids == eos
    real = batch["attention_mask"] == 1 if "attention_mask" in batch else torch.ones_like(at_eos)
    assert (at_eos & real).any()
    # Every real eos is a target: the model learns where a document ends.
    assert torch.equal(labels[at_eos & real], ids[at_eos & real])
    if not packing:
        for row, doc in enumerate(docs[: ids.shape[0]]):
            n = len(tokenizer(doc)["input_ids"]) + 1
            assert ids[row, n - 1] == eos and labels[row, n - 1] == eos  # the document's end
            assert (labels[row, n:] == -100).all()  # padding (also eos ids) never counts
    else:
        assert torch.equal(labels, ids)  # run_clm: the labels are the block itself
