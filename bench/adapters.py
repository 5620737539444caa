"""Full fine-tune against LoRA (and QLoRA on a GPU): tokens/s, peak memory, checkpoint size.

The same clm job (GPT-2 architecture, packed 128-token blocks of the example data) trains
through `workers.training.run_training`, once per method, each in a fresh process so peak
memory is the run's own. Models: `tiny` is jobs/assets' gpt2-tiny; `medium` (6 x 512, 19M
parameters) and `large` (24 x 1024, 300M, for GPUs) are built here from a GPT2Config with
random weights and the tiny tokenizer, so nothing is downloaded.

Measured per run:
  tokens/s      wall clock over the timed steps (after `--warmup` steps), tokens = batch x
                block, every position of every packed batch
  cpu_ms/token  process CPU time over the same steps per token (all threads): less noisy
                than wall time on a shared machine
  train state   bytes of the parameters, their gradients (the trainable ones) and the
                optimizer's state, counted from the tensors: what the method changes,
                exactly, whatever else the process holds
  peak memory   on CPU the process's peak RSS over the training steps (and its RSS when
                training starts, after the model loaded: the difference is gradients,
                optimizer state and activations); on a GPU torch.cuda.max_memory_allocated
  checkpoint    size of the checkpoint the run saves at its last step (weights or adapter,
                optimizer state, RNG, trainer state)

    python bench/adapters.py                        # CPU: tiny and medium, full vs lora
    python bench/adapters.py --device cuda          # GPU: medium and large, + qlora, bf16
    python bench/adapters.py --models tiny --steps 6 --warmup 2   # quick check

Prints one line per run and a JSON list as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TINY = REPO / "jobs" / "assets" / "models" / "gpt2-tiny"
SHAPES = {"medium": {"n_layer": 6, "n_embd": 512, "n_head": 8},
          "large": {"n_layer": 24, "n_embd": 1024, "n_head": 16}}


def build_model(size: str, out: Path) -> Path:
    """A model directory: the tiny asset, or a GPT-2 of `size` with random weights."""
    if size == "tiny":
        return TINY
    import torch
    import transformers

    torch.manual_seed(0)
    tiny = transformers.AutoConfig.from_pretrained(TINY)
    config = transformers.GPT2Config(vocab_size=tiny.vocab_size, n_positions=1024,
                                     bos_token_id=tiny.bos_token_id,
                                     eos_token_id=tiny.eos_token_id, **SHAPES[size])
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(TINY).save_pretrained(out)
    return out


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _train_state_mib(model: Any, optimizer: Any) -> float:
    import torch

    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.numel() * p.element_size() for p in params if p.requires_grad)  # gradients
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total / 2**20


def measure(model_dir: str, method: str, device: str, steps: int, warmup: int, batch: int,
            block: int) -> dict[str, Any]:
    """One run, in this process (the parent starts a fresh one per run)."""
    import torch
    from transformers import TrainerCallback

    from orchestrator.spec import load_spec
    from workers.training import run_training

    gpu = device == "cuda"
    work = Path(tempfile.mkdtemp(prefix=f"orch-bench-{method}-"))
    sets = [f"model={model_dir}", f"tokenizer={model_dir}", f"training.max_steps={steps}",
            f"training.batch_size={batch}", f"training.max_length={block}",
            "training.packing=true", "training.eval_steps=null", "training.save_steps=null",
            "dataset.eval_files=null", "training.logging_steps=100000",
            "training.warmup_steps=0", "training.learning_rate=1e-4",
            f"resources.gpus={int(gpu)}", f"resources.cpus={os.cpu_count() if gpu else 2}",
            f"training.precision={'bf16' if gpu else 'fp32'}"]
    if method != "full":
        sets += [f"adapter.method={method}", "adapter.r=16", "adapter.alpha=32"]
    spec, _ = load_spec(REPO / "jobs" / "gpt2_clm.yaml", sets)
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["rss_start_mib"] = _rss_mib()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if "trainable_params_fraction" in (logs or {}):
                clock["fraction"] = logs["trainable_params_fraction"]
                clock["trainable"] = logs["trainable_params"]

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (warmup, steps):
                if gpu:
                    torch.cuda.synchronize()
                key = "start" if state.global_step == warmup else "end"
                clock[f"wall_{key}"] = time.perf_counter()
                clock[f"cpu_{key}"] = time.process_time()
            if state.global_step == steps:  # before the final checkpoint is written
                clock["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                clock["state_mib"] = _train_state_mib(kwargs["model"], kwargs["optimizer"])

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    run_training(spec, work / "run", callbacks=[Clock()])
    tokens = (steps - warmup) * batch * block
    wall = clock["wall_end"] - clock["wall_start"]
    cpu = clock["cpu_end"] - clock["cpu_start"]
    checkpoint = work / "run" / "checkpoints" / f"checkpoint-{steps}"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    result = {
        "model": Path(model_dir).name, "method": method, "device": device,
        "params_m": round(clock["trainable"] / clock["fraction"] / 1e6, 2),
        "trainable_fraction": round(clock["fraction"], 5),
        "steps_timed": steps - warmup, "tokens_per_s": round(tokens / wall, 1),
        "cpu_ms_per_token": round(1000 * cpu / tokens, 3),
        "train_state_mib": round(clock["state_mib"], 1),
        "peak_rss_mib": round(clock["peak_rss_mib"]),
        "rss_at_start_mib": round(clock["rss_start_mib"]),
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if gpu else None,
        "checkpoint_mib": round(size / 2**20, 3),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--models", nargs="+", choices=["tiny", *SHAPES], default=None)
    parser.add_argument("--methods", nargs="+", choices=["full", "lora", "qlora"], default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one run, as JSON
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.one:
        print("RESULT " + json.dumps(measure(**json.loads(args.one))), flush=True)
        return

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    models = args.models or (["medium", "large"] if gpu else ["tiny", "medium"])
    methods = args.methods or (["full", "lora", "qlora"] if gpu else ["full", "lora"])
    steps = args.steps or (200 if gpu else 24)
    warmup = args.warmup or (20 if gpu else 4)
    batch = args.batch or (32 if gpu else 8)
    results = []
    with tempfile.TemporaryDirectory(prefix="orch-bench-models-") as tmp:
        for size in models:
            model_dir = build_model(size, Path(tmp) / size)
            for method in methods:
                job = {"model_dir": str(model_dir), "method": method, "device": device,
                       "steps": steps, "warmup": warmup, "batch": batch, "block": args.block}
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                                      capture_output=True, text=True, check=False)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(f"{size} {method}: failed\n{proc.stderr[-3000:]}", flush=True)
                    continue
                row = {**json.loads(lines[-1][len("RESULT "):]), "model": size}
                results.append(row)
                memory = (f"CUDA peak {row['cuda_peak_mib']} MiB" if gpu else
                          f"peak RSS {row['peak_rss_mib']} MiB "
                          f"(at train start {row['rss_at_start_mib']})")
                memory = f"train state {row['train_state_mib']} MiB, {memory}"
                print(f"{size:6s} {method:5s} {row['params_m']}M params, trainable "
                      f"{row['trainable_fraction']:.3%}: {row['tokens_per_s']} tokens/s, "
                      f"{row['cpu_ms_per_token']} CPU ms/token, {memory}, checkpoint "
                      f"{row['checkpoint_mib']} MiB", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
