"""The one training core: a JobSpec in, a trained model and its eval metrics out.

`run_training` is what every way of running a job ends up calling (the Ray worker actor,
tests, a laptop). It builds a Hugging Face Trainer for the spec's objective and:

  * evaluates the untrained model first: callbacks get on_evaluate/on_log at global_step 0;
  * trains, evaluating every eval_steps and checkpointing every save_steps under
    output_dir/checkpoints (no cadence: once at the last step);
  * makes sure the last step is evaluated and checkpointed;
  * saves the final model and tokenizer as a plain HF directory at output_dir/final;
  * returns the final eval metrics (`eval_` keys).

Checkpoint retention is not done here (save_total_limit=None): orch's callback decides.
Checkpoints are written under a temporary name and renamed into place, so a process
killed mid-save never leaves a `checkpoint-N` directory behind that looks complete.
With `upload_to` (an fsspec URL, see workers.storage) checkpoints and the final model are
staged on this node and uploaded there instead, and a URL to resume from is fetched first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from orchestrator.spec import JobSpec, Objective, Precision
from workers import adapters, storage
from workers.data import load_splits
from workers.objectives import ObjectiveModule, get_objective, max_positions
from workers.storage import CHECKPOINTS_DIR, FINAL_DIR, RESUME_DIR, STAGING_DIR

log = logging.getLogger(__name__)


class AtomicCheckpoints:
    """Trainer mixin: write each checkpoint in a staging dir, then rename it into place.

    The Trainer writes weights, optimizer, scheduler, RNG state and trainer_state.json one
    after another straight into checkpoint-N; a kill in between would leave a partial
    checkpoint under its final name. The rename is atomic on POSIX filesystems.

    With several data-parallel workers every rank writes into the same staging dir (rank 0
    the weights and optimizer, each rank its own RNG state), so the directory is cleared
    before anyone writes and renamed by rank 0 alone, after a barrier: once, complete.
    """

    # Set by run_training: "<url>/checkpoints" when checkpoints go to an object store.
    _orch_upload_to: str | None = None
    # What the Trainer this is mixed into has (declared for the type checker).
    state: TrainerState

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self._orch_upload_to:
            self._save_and_upload(model, trial, self._orch_upload_to)
            return
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging_root = run_dir / STAGING_DIR
        leader = rank() == 0
        if leader:
            shutil.rmtree(staging_root / name, ignore_errors=True)
        barrier()  # nobody writes into a directory rank 0 is still clearing
        self._write_checkpoint_into(staging_root, model, trial)
        barrier()  # every rank's files are written
        final = run_dir / name
        if leader:
            if final.exists():  # left by an attempt that died after writing it, never registered
                shutil.rmtree(final)
            os.replace(staging_root / name, final)
            with contextlib.suppress(OSError):  # only when empty: nothing else in flight
                staging_root.rmdir()
        barrier()  # the rename is visible before any rank goes on (and on_save registers it)

    def _save_and_upload(self, model: Any, trial: Any, upload_to: str) -> None:
        """Object-store checkpoints: each rank stages what it writes in a directory of its
        own (ranks on other nodes have other disks; ranks on this node must not upload each
        other's files twice) and uploads it into the one checkpoint prefix."""
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        mine = run_dir / STAGING_DIR / f"rank-{rank()}"
        shutil.rmtree(mine, ignore_errors=True)
        remote = storage.join(upload_to, name)
        if rank() == 0:
            storage.remove(remote)  # a dead attempt's unregistered, maybe partial upload
        barrier()  # nobody uploads into a prefix rank 0 is still clearing
        self._write_checkpoint_into(mine, model, trial)
        storage.upload(mine / name, remote)
        shutil.rmtree(mine, ignore_errors=True)
        barrier()  # every rank's part is uploaded before on_save registers the checkpoint

    def _write_checkpoint_into(self, parent: Path, model: Any, trial: Any) -> None:
        # The Trainer derives the checkpoint path from _get_output_dir: point it at `parent`.
        self._get_output_dir = lambda trial=None: str(parent)
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            del self._get_output_dir


def rank() -> int:
    """This process's rank in the data-parallel group; 0 when training alone."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every data-parallel worker; nothing to wait for when training alone."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def with_atomic_checkpoints(trainer_class: type[Trainer]) -> type[Trainer]:
    return type(f"Atomic{trainer_class.__name__}", (AtomicCheckpoints, trainer_class), {})


def configure_threads(spec: JobSpec) -> int:
    """Intra-op threads for torch: OMP_NUM_THREADS if set (Ray sets it to the actor's CPUs),
    else the spec's resources.cpus. Returns the number used."""
    raw = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(raw) if raw.isdigit() and int(raw) > 0 else spec.resources.cpus
    torch.set_num_threads(threads)
    return threads


def precision_args(spec: JobSpec) -> dict[str, bool]:
    """bf16/fp16 flags for TrainingArguments; mixed precision needs CUDA, else fp32."""
    wanted = spec.training.precision
    if wanted == Precision.FP32:
        return {}
    on_cuda = spec.resources.gpus > 0 and torch.cuda.is_available()
    if not on_cuda:
        log.warning("training.precision %s needs a CUDA GPU; this run has none, using fp32",
                    wanted.value)
        return {}
    # Native support only: by default torch also counts emulation, which pre-Ampere GPUs
    # offer and which is far slower than fp32 there.
    if wanted == Precision.BF16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        log.warning("training.precision bf16: this GPU does not support bf16; using fp32")
        return {}
    return {"bf16": True} if wanted == Precision.BF16 else {"fp16": True}


def build_arguments(
    spec: JobSpec,
    objective: ObjectiveModule,
    output_dir: Path,
    has_eval: bool,
    resuming: bool,
) -> TrainingArguments:
    t = spec.training
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir / CHECKPOINTS_DIR),
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.eval_batch_size or t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "warmup_steps": t.warmup_steps,
        "lr_scheduler_type": t.lr_scheduler,
        "logging_strategy": "steps",
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if has_eval and t.eval_steps else "no",
        "eval_steps": t.eval_steps if has_eval else None,
        # Untrained metrics at step 0, inside train() (after on_train_begin, so callbacks
        # see a normal sequence). Not on resume: that step-0 evaluation already happened.
        "eval_on_start": has_eval and not resuming,
        "save_strategy": "steps" if t.save_steps else "no",
        "save_steps": t.save_steps,
        "save_total_limit": None,  # retention is orch's checkpoint callback's job
        "report_to": [],
        "seed": t.seed,
        "dataloader_num_workers": t.dataloader_workers,
        # Fake GPUs (a CPU machine declaring GPU capacity to Ray) train on the CPU too.
        "use_cpu": spec.resources.gpus == 0 or not torch.cuda.is_available(),
        # Progress goes to orch through callbacks; tqdm bars would only clutter worker logs.
        "disable_tqdm": True,
        **precision_args(spec),
        **objective.extra_args(spec),
    }
    if spec.resources.distributed and t.strategy == "fsdp":
        # Through accelerate's FSDP plugin: parameters, gradients and optimizer state sharded
        # across the workers, each transformer block wrapped on its own.
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    if t.max_steps is not None:
        kwargs["max_steps"] = t.max_steps
    else:
        kwargs["num_train_epochs"] = t.epochs if t.epochs is not None else 1.0
    names = {f.name for f in dataclasses.fields(objective.args_class)}
    if "save_safetensors" in names:  # transformers 4.x; 5.x always writes safetensors
        kwargs["save_safetensors"] = True
    return objective.args_class(**kwargs)


class FinalStepFlow(TrainerCallback):
    """At the last optimizer step, evaluate and checkpoint even without a step cadence.

    With eval_steps/save_steps set, HF's DefaultFlowCallback already does this at the end;
    with them unset (strategy "no") nothing would, and the final step would have no metrics
    or checkpoint for orch to rank.
    """

    def __init__(self, evaluate: bool, save: bool) -> None:
        self.evaluate = evaluate
        self.save = save

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if state.global_step >= state.max_steps:
            control.should_evaluate = control.should_evaluate or self.evaluate
            control.should_save = control.should_save or self.save
        return control


class TrainableParameters(TrainerCallback):
    """Logs `trainable_params` and `trainable_params_fraction` at step 0 of a fresh run,
    through the Trainer's own log, so they reach every callback (and the store) like any
    other metric: 1.0 for a full fine-tune, the adapter's share with one."""

    def __init__(self, trainer: Trainer, model: torch.nn.Module) -> None:
        self.trainer = trainer
        # Counted now, before DDP or FSDP wraps (and FSDP shards) the model.
        self.trainable, self.total = adapters.trainable_parameters(model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step > 0:  # resumed: step 0 has them already
            return
        self.trainer.log({"trainable_params": self.trainable,
                          "trainable_params_fraction": self.trainable / max(self.total, 1)})


def _check_lengths(spec: JobSpec, model: PreTrainedModel) -> None:
    limit = max_positions(model)
    if limit is None:
        return
    lengths = {"training.max_length": spec.training.max_length}
    if spec.objective == Objective.SEQ2SEQ:
        lengths["training.max_target_length"] = spec.training.max_target_length or 0
    for field, value in lengths.items():
        if value > limit:
            raise ValueError(
                f"{field}: {value} is more than the {limit} positions {spec.model} supports; "
                f"set it to {limit} or less"
            )


def _last_eval(trainer: Trainer) -> tuple[int, dict[str, float]] | None:
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            metrics = {k: float(v) for k, v in entry.items()
                       if k.startswith("eval_") and isinstance(v, (int, float))}
            return int(entry.get("step", -1)), metrics
    return None


def run_training(
    spec: JobSpec,
    output_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
    resume_from_checkpoint: str | None = None,
    upload_to: str | None = None,
) -> dict[str, float]:
    """Train `spec` and write checkpoints and the final model under `output_dir`, or, with
    `upload_to` (the job's fsspec URL), stage them there and upload them under the URL.
    `resume_from_checkpoint` is a checkpoint directory or URL.

    Returns the final eval metrics (`eval_loss`, ...), or {} when the spec has no eval data.
    """
    started = time.monotonic()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = configure_threads(spec)
    set_seed(spec.training.seed)
    objective = get_objective(spec.objective)
    log.info("job %s: %s on %s, %d torch threads", spec.name, spec.objective.value,
             spec.model, threads)

    train_raw, eval_raw = load_splits(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.model)
    objective.prepare_tokenizer(spec, tokenizer)
    model = objective.load_model(spec)
    _check_lengths(spec, model)
    if spec.adapter is not None:
        model = adapters.wrap(spec, model)  # base frozen, a LoRA adapter to train
    train_ds, eval_ds = objective.preprocess(spec, tokenizer, train_raw, eval_raw)
    has_eval = eval_ds is not None

    args = build_arguments(spec, objective, output_dir, has_eval, resume_from_checkpoint is not None)
    # Whatever a killed attempt was still writing is garbage.
    shutil.rmtree(Path(str(args.output_dir)) / STAGING_DIR, ignore_errors=True)
    if resume_from_checkpoint and storage.is_url(resume_from_checkpoint):
        # The Trainer resumes from a local directory. One copy per rank: ranks sharing a node
        # must not write the same files at once.
        name = resume_from_checkpoint.rstrip("/").rsplit("/", 1)[-1]
        local = output_dir / RESUME_DIR / f"rank-{rank()}" / name
        log.info("job %s: fetching %s to %s", spec.name, resume_from_checkpoint, local)
        resume_from_checkpoint = str(storage.download(resume_from_checkpoint, local))
    trainer = with_atomic_checkpoints(objective.trainer_class)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=objective.collator(spec, tokenizer, model),
        compute_metrics=objective.compute_metrics(spec, tokenizer) if has_eval else None,
        preprocess_logits_for_metrics=objective.preprocess_logits_for_metrics,
        callbacks=[
            FinalStepFlow(evaluate=has_eval and args.eval_strategy == "no",
                          save=args.save_strategy == "no"),
            *callbacks,
        ],
    )
    # Last: the reporter (among `callbacks`) must have started the run before anything logs.
    trainer.add_callback(TrainableParameters(trainer, model))
    trainer._orch_upload_to = storage.join(upload_to, CHECKPOINTS_DIR) if upload_to else None  # type: ignore[attr-defined]
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)

    final_metrics: dict[str, float] = {}
    if has_eval:
        last = _last_eval(trainer)
        # Normally the last step was evaluated inside train(); this covers a run that
        # stopped short of max_steps (e.g. a callback set should_training_stop).
        if last is None or last[0] != trainer.state.global_step:
            trainer.evaluate()
            last = _last_eval(trainer)
        assert last is not None
        final_metrics = last[1]

    final_dir = save_final_model(trainer, output_dir, upload_to,
                                 merge=spec if spec.adapter and spec.adapter.merge else None)
    shutil.rmtree(output_dir / RESUME_DIR, ignore_errors=True)
    log.info("job %s: trained %d steps in %.1fs; final model at %s; %s", spec.name,
             trainer.state.global_step, time.monotonic() - started, final_dir, final_metrics)
    return final_metrics


def save_final_model(trainer: Trainer, output_dir: Path, upload_to: str | None,
                     merge: JobSpec | None = None) -> str:
    """The trained model, tokenizer and generation config as a plain HF directory (loadable
    with from_pretrained) at output_dir/final, or uploaded to <upload_to>/final. Returns
    where it is. An adapter job's model is its adapter (which names its base model), or with
    `merge` (the job's spec) the adapter merged into the base, merged by rank 0 alone."""
    if trainer.is_fsdp_enabled:
        # Checkpoints keep FSDP's sharded state dict (fast, resumable); the final model is
        # gathered into one full state dict so from_pretrained can load it.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if not upload_to:
        final_dir = output_dir / FINAL_DIR
        trainer.save_model(str(final_dir))
        barrier()  # with FSDP every rank takes part; the directory is complete after this
        if merge is not None and rank() == 0:
            adapters.merge_final(merge, final_dir)
        barrier()  # the merged model is in place before any rank goes on
        return str(final_dir)
    # Every rank saves into a directory of its own and uploads what it wrote (only rank 0
    # writes files, unless FSDP has every rank write a part).
    rank_dir = output_dir / CHECKPOINTS_DIR / STAGING_DIR / f"rank-{rank()}"
    mine = rank_dir / FINAL_DIR
    shutil.rmtree(mine, ignore_errors=True)
    remote = storage.join(upload_to, FINAL_DIR)
    if rank() == 0:
        storage.remove(remote)  # a final model uploaded by an attempt that died after it
    barrier()
    trainer.save_model(str(mine))
    barrier()
    if merge is not None and rank() == 0:
        adapters.merge_final(merge, mine)
    storage.upload(mine, remote)
    shutil.rmtree(rank_dir, ignore_errors=True)
    barrier()  # the whole final model is uploaded before rank 0 registers it
    return remote
