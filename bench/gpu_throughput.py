"""Tokens/s and MFU of orch's clm and seq2seq training paths in bf16 on one GPU.

Prepared for one H200 (at most ~5 minutes, no network): the models are built from
configs of real shapes (GPT-2 small: 12 layers x 768; T5-small: 6+6 layers x 512) with
random weights and the tiny tokenizers (and so vocabularies) from jobs/assets: 87M and 46M
parameters. They train through `workers.training.run_training` (the
same Hugging Face Trainer core orch runs) on the example datasets, repeated as needed.

Tokens are what the GPU computes on: every position of every batch, padding included
(clm: batch x block; seq2seq: batch x (padded source + padded target)). MFU uses the
standard 6 x parameters FLOPs per token (forward + backward, attention scores left out),
counting the encoder's parameters for source tokens and the decoder's for target tokens,
against the GPU's dense bf16 peak (`--peak-tflops`, default 989 for H100/H200 SXM).

    python bench/gpu_throughput.py                 # on the GPU: both paths, ~3 minutes
    python bench/gpu_throughput.py --dry           # CPU: tiny models, a few steps, no MFU

Prints one line per path and a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ASSETS = REPO / "jobs" / "assets" / "models"


def build_model_dir(kind: str, dry: bool, out: Path) -> tuple[Path, dict[str, int]]:
    """A model directory of a realistic size (or the tiny asset, dry) with the tiny tokenizer.
    Returns it and the parameter counts that MFU needs."""
    import transformers

    if kind == "clm":
        tiny = ASSETS / "gpt2-tiny"
        config = transformers.AutoConfig.from_pretrained(tiny)
        if not dry:
            config = transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=1024,
                                             n_embd=768, n_layer=12, n_head=12,
                                             bos_token_id=config.bos_token_id,
                                             eos_token_id=config.eos_token_id)
        model = transformers.GPT2LMHeadModel(config)
        counts = {"decoder": model.num_parameters(exclude_embeddings=False)}
    else:
        tiny = ASSETS / "t5-tiny"
        config = transformers.AutoConfig.from_pretrained(tiny)
        if not dry:
            config = transformers.T5Config(vocab_size=config.vocab_size, d_model=512, d_ff=2048,
                                           d_kv=64, num_layers=6, num_heads=8,
                                           decoder_start_token_id=config.decoder_start_token_id,
                                           pad_token_id=config.pad_token_id,
                                           eos_token_id=config.eos_token_id)
        model = transformers.T5ForConditionalGeneration(config)
        counts = {"encoder": model.get_encoder().num_parameters(),
                  "decoder": model.get_decoder().num_parameters()
                  + model.lm_head.weight.numel()}
    model.save_pretrained(out)
    # The tiny tokenizer, allowed the real model's lengths (its own limit is 256).
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(out)
    return out, counts


def measure(kind: str, dry: bool, steps: int, warmup: int, batch: int,
            peak_tflops: float) -> dict[str, Any]:
    import torch

    import workers.training as training
    from orchestrator.spec import load_spec

    work = Path(tempfile.mkdtemp(prefix=f"orch-gpu-{kind}-"))
    model_dir, params = build_model_dir(kind, dry, work / "model")
    gpu = torch.cuda.is_available() and not dry
    sets = [f"model={model_dir}", f"tokenizer={model_dir}", f"training.max_steps={steps}",
            f"training.batch_size={batch}", "training.eval_steps=null",
            "training.save_steps=null", "training.logging_steps=100000",
            "dataset.eval_files=null", f"resources.gpus={int(gpu)}", "resources.cpus=4",
            "training.precision=bf16", "training.warmup_steps=0",
            "training.dataloader_workers=2" if gpu else "training.dataloader_workers=0"]
    if kind == "clm":
        spec_file = REPO / "jobs" / "gpt2_clm.yaml"
        sets += [f"training.max_length={64 if dry else 1024}", "training.packing=true"]
    else:
        spec_file = REPO / "jobs" / "t5_summarize.yaml"
        sets += [f"training.max_length={64 if dry else 512}",
                 f"training.max_target_length={16 if dry else 128}"]
    spec, _ = load_spec(spec_file, sets)

    counted: dict[str, Any] = {"src": 0, "tgt": 0}

    class Count:
        """Trainer mixin: positions computed per step, and the clock after `warmup` steps."""

        def training_step(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            loss = super().training_step(model, inputs, *a, **k)  # type: ignore[misc]
            step = self.state.global_step  # type: ignore[attr-defined]
            if step == warmup:
                if gpu:
                    torch.cuda.synchronize()
                counted["t0"] = time.perf_counter()
            elif step > warmup:
                counted["src"] += inputs["input_ids"].numel()
                if kind == "seq2seq":
                    counted["tgt"] += inputs["labels"].numel()
            return loss

    wrap = training.with_atomic_checkpoints
    training.with_atomic_checkpoints = lambda cls: type("Counted", (Count, wrap(cls)), {})  # type: ignore[assignment]
    try:
        training.run_training(spec, work / "run")
    finally:
        training.with_atomic_checkpoints = wrap  # type: ignore[assignment]
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - counted["t0"]
    tokens = counted["src"] + counted["tgt"]
    if kind == "clm":
        flops = 6 * params["decoder"] * counted["src"]
    else:
        flops = 6 * (params["encoder"] * counted["src"] + params["decoder"] * counted["tgt"])
    result = {
        "path": kind, "device": torch.cuda.get_device_name() if gpu else "cpu (dry run)",
        "params_m": round(sum(params.values()) / 1e6, 1), "steps_timed": steps - warmup - 1,
        "batch": batch, "tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "tflops": round(flops / seconds / 1e12, 2),
        "mfu": round(flops / seconds / (peak_tflops * 1e12), 4) if gpu else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if gpu else None,
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry", action="store_true", help="tiny models on CPU, a few steps")
    parser.add_argument("--paths", nargs="+", default=["clm", "seq2seq"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    steps = args.steps or (6 if args.dry else 300)
    warmup = args.warmup or (2 if args.dry else 30)
    batch = args.batch or (4 if args.dry else 32)
    results = []
    for kind in args.paths:
        row = measure(kind, args.dry, steps, warmup, batch, args.peak_tflops)
        results.append(row)
        print(f"{kind:8s} {row['device']}: {row['tokens_per_s']} tokens/s, {row['tflops']} "
              f"TFLOP/s, MFU {row['mfu']}, peak memory {row['peak_mem_gib']} GiB", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
