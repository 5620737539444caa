"""Acceptance: `orch predict` on the session's real Ray cluster through the real CLI, on a
job trained there (a tiny GPT-2 for two steps): the control plane runs the prediction as a
Ray Job, and its answer is the model's own greedy continuation."""

from __future__ import annotations

import json

import pytest

from tests.support import run_orch

pytestmark = pytest.mark.ray

TINY = ["training.max_steps=2", "training.eval_steps=null", "training.save_steps=null",
        "training.batch_size=4", "training.max_length=32", "training.warmup_steps=0",
        "dataset.max_train_samples=16", "dataset.max_eval_samples=4"]


def test_predict_on_the_cluster_answers_with_the_jobs_model(orch_env: dict[str, str]) -> None:
    sets = [arg for option in TINY for arg in ("--set", option)]
    proc = run_orch(orch_env, "submit", "jobs/gpt2_clm.yaml", *sets, "--wait", "-q",
                    timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split()[0]

    # A Ray Job on the cluster, started by the control plane: the CLI needs no Ray access.
    there = run_orch(orch_env, "predict", job_id, "the river", "--max-new-tokens", "4",
                     "--on", "cluster", "-o", "json", check=True)
    answer = json.loads(there.stdout)
    assert answer["where"] == "cluster" and answer["checkpoint"]["which"] == "final"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = answer["checkpoint"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = tokenizer("the river", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer["predictions"] == [{"input": "the river", "output": expected}]
