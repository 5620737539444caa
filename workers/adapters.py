"""Parameter-efficient fine-tuning (LoRA, QLoRA) through peft, and loading what a job trained.

A spec with an `adapter:` section trains low-rank matrices beside some of the model's layers
while the base model stays frozen (`wrap`). Checkpoints then hold only the adapter (and any
trainable head) plus its optimizer state, and the final model is either the adapter, which
names its base model, or (`adapter.merge: true`) the adapter merged into the base: a plain
full model (`merge_final`).

`check_adapter` is the cheap check `orch validate` and submit run: the target modules exist
in the model (built on the meta device from its config, so no weights are read), and QLoRA
has what it needs here.

`load_for_inference` is THE way to load a trained job's model from a checkpoint or final
directory, whatever it holds: a full model, a merged one, or an adapter on its base.
`orch predict` and `orch export` call it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from orchestrator.spec import JobSpec, Objective

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Inside a merged final model: the adapter it was merged from, for reuse on another copy of
# the base (from_pretrained ignores subdirectories).
MERGED_ADAPTER_DIR = "adapter"

# Default target modules: the attention projections of each family, the layers the LoRA
# paper adapts. Names are matched as peft does: a module's full name equals the entry or
# ends with "." + the entry. Architectures not listed fall back to peft's own table.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    # GPT-2's layers are transformers' Conv1D: c_attn is q, k and v in one; c_proj matches
    # both the attention output and the MLP's down projection.
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "xlm-roberta": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "t5": ["q", "k", "v", "o"],
    "mt5": ["q", "k", "v", "o"],
    **{name: ["q_proj", "k_proj", "v_proj", "out_proj"]
       for name in ("bart", "mbart", "marian", "pegasus", "opt")},
    **{name: ["q_proj", "k_proj", "v_proj", "o_proj"]
       for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": ["qkv_proj", "o_proj"],
}


def _adaptable_types() -> tuple[type[nn.Module], ...]:
    """Layer types LoRA can adapt (peft's LoRA supports these; GPT-2 style models use Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d)


def _auto_class(objective: Objective) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    return {Objective.CLM: AutoModelForCausalLM, Objective.MLM: AutoModelForMaskedLM,
            Objective.SEQ2SEQ: AutoModelForSeq2SeqLM}[objective]


def _task_type(objective: Objective) -> Any:
    from peft import TaskType

    # Masked LM has no peft task type: the plain PeftModel passes every argument through to
    # the base model's forward, which is all the Trainer needs.
    return {Objective.CLM: TaskType.CAUSAL_LM, Objective.SEQ2SEQ: TaskType.SEQ_2_SEQ_LM,
            Objective.MLM: None}[objective]


# ---------------------------------------------------------------------------------------
# Which modules


def default_target_modules(model_type: str) -> list[str] | str | None:
    """The modules adapted when the spec names none; None when orch knows no default."""
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    found = PEFT.get(model_type)
    return found if found is None or isinstance(found, str) else list(found)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Full names of the leaf layers LoRA can adapt (Linear, Conv1D, Embedding, Conv)."""
    kinds = _adaptable_types()
    return [name for name, module in model.named_modules()
            if name and isinstance(module, kinds) and not any(True for _ in module.children())]


def names_matching(target: str, names: list[str]) -> list[str]:
    """The module names `target` selects, by peft's rule for a list of targets."""
    return [name for name in names if name == target or name.endswith(f".{target}")]


def _short_names(names: list[str]) -> str:
    return ", ".join(sorted({name.rsplit(".", 1)[-1] for name in names}))


def target_modules(spec: JobSpec, model: nn.Module) -> list[str] | str:
    """The spec's target modules, or the architecture's default."""
    assert spec.adapter is not None
    if spec.adapter.target_modules is not None:
        return spec.adapter.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    found = default_target_modules(model_type)
    if found is None:
        raise ValueError(f"adapter.target_modules: no default for a {model_type!r} model; name "
                         f"the layers to adapt, from: {_short_names(adaptable_module_names(model))}")
    return found


def target_problems(spec: JobSpec, model: nn.Module) -> list[str]:
    """Why the adapter cannot wrap `model` (a real one or one on the meta device)."""
    assert spec.adapter is not None
    names = adaptable_module_names(model)
    if not names:
        return [f"adapter: {spec.model} has no Linear/Conv1D layer LoRA could adapt; remove "
                "the adapter section to train every weight"]
    try:
        targets = target_modules(spec, model)
    except ValueError as exc:
        return [str(exc)]
    if isinstance(targets, str):  # "all-linear": peft picks every Linear but the output layer
        return []
    missing = [t for t in targets if not names_matching(t, names)]
    if missing:
        return [f"adapter.target_modules: no Linear/Conv1D/Embedding layer named "
                f"{', '.join(missing)} in {spec.model}; layers that can be adapted: "
                f"{_short_names(names)}"]
    return []


def check_adapter(spec: JobSpec, this_machine_trains: bool = True) -> list[str]:
    """Preflight: the adapter section fits the model and, when `this_machine_trains` (orch
    validate, a server whose cluster is this machine), this machine: qlora needs CUDA and
    bitsandbytes. A team's control plane need not have the GPUs its cluster has; there the
    worker checks again when it loads the base. Cheap: the model is built on the meta device
    from its config (no weights read, no memory allocated)."""
    if spec.adapter is None:
        return []
    problems: list[str] = []
    if spec.adapter.method == "qlora" and this_machine_trains:
        if not torch.cuda.is_available():
            problems.append("adapter.method: qlora quantizes the base model with bitsandbytes' "
                            "4-bit CUDA kernels and this machine has no CUDA GPU; use method: "
                            "lora, or validate on a machine with the GPUs")
        else:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                problems.append("adapter.method: qlora needs the bitsandbytes package; "
                                "pip install bitsandbytes (or use method: lora)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.model)
        with torch.device("meta"):
            model = _auto_class(spec.objective).from_config(config)
    except Exception:  # the model check (preflight) reports a model it cannot load or use
        return problems
    return problems + target_problems(spec, model)


# ---------------------------------------------------------------------------------------
# Training


def quantization_kwargs(spec: JobSpec) -> dict[str, Any]:
    """Extra from_pretrained arguments for the base model: QLoRA's 4-bit NF4 quantization,
    on this worker's GPU. Nothing for LoRA or a full fine-tune."""
    if spec.adapter is None or spec.adapter.method != "qlora":
        return {}
    if not torch.cuda.is_available():
        raise ValueError("adapter.method: qlora needs a CUDA GPU and this worker has none; "
                         "use method: lora")
    from transformers import BitsAndBytesConfig

    wanted = spec.training.precision.value
    compute = (torch.bfloat16 if wanted == "bf16" and torch.cuda.is_bf16_supported()
               else torch.float16 if wanted == "fp16" else torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    # Each data-parallel worker holds a whole 4-bit copy on its own GPU.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return {"quantization_config": config, "device_map": {"": local_rank}}


def modules_to_save(spec: JobSpec, model: PreTrainedModel) -> list[str]:
    """Modules trained in full beside the adapter (and saved with it).

    Only the masked-LM head can need it. Its decoder (hidden -> vocabulary) is normally tied
    to the input embeddings, as BERT's is: the head's big matrix IS the frozen embedding
    matrix, and the pretrained head was trained for exactly this objective, so it stays
    frozen and the adapted attention layers learn what to feed it. Making it trainable would
    copy a vocabulary x hidden matrix into every checkpoint (peft keeps a trained copy of each
    module to save) and untie it from the embeddings, for little gain. An untied decoder has
    weights of its own, which nothing else would adapt to the new data: the prediction head
    around it is then trained in full.
    """
    if spec.objective != Objective.MLM:
        return []
    output = model.get_output_embeddings()
    inputs = model.get_input_embeddings()
    if output is None or inputs is None or output.weight is inputs.weight:
        return []
    names = {id(module): name for name, module in model.named_modules()}
    decoder = names[id(output)]
    head = decoder.rsplit(".", 1)[0] if "." in decoder else decoder  # e.g. cls.predictions
    log.info("masked-LM decoder %s is not tied to the input embeddings: training %s in full",
             decoder, head)
    return [head]


def wrap(spec: JobSpec, model: PreTrainedModel) -> PreTrainedModel:
    """The model with a trainable adapter and everything else frozen (a peft PeftModel)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    adapter = spec.adapter
    assert adapter is not None
    if problems := target_problems(spec, model):
        raise ValueError("; ".join(problems))
    if adapter.method == "qlora":
        # Norms and the output layer in fp32, inputs requiring grad, gradient checkpointing:
        # what training through a frozen 4-bit base needs. Non-reentrant checkpointing: the
        # reentrant kind breaks DDP's gradient hooks on a partly frozen model.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = target_modules(spec, model)
    config = LoraConfig(
        # peft annotates lora_alpha as int, but scales by alpha / r in floats: a fractional
        # alpha works as written.
        r=adapter.r, lora_alpha=adapter.alpha,  # type: ignore[arg-type]
        lora_dropout=adapter.dropout,
        target_modules=targets, task_type=_task_type(spec.objective),
        modules_to_save=modules_to_save(spec, model) or None,
        # Conv1D (GPT-2) stores its weight transposed; peft would switch this on itself, warning.
        fan_in_fan_out=_targets_conv1d(model, targets),
    )
    # The adapter's A matrices are initialised at random: from the job's seed, whatever ran
    # before, so a run is reproducible (and equals a plain peft script that seeds here).
    set_seed(spec.training.seed)
    wrapped = get_peft_model(model, config)
    trainable, total = trainable_parameters(wrapped)
    log.info("job %s: %s r=%d on %s: %d of %d parameters trainable (%.3f%%)", spec.name,
             adapter.method, adapter.r, config.target_modules, trainable, total,
             100.0 * trainable / max(total, 1))
    return wrapped  # type: ignore[return-value]


def _targets_conv1d(model: nn.Module, targets: list[str] | str) -> bool:
    from transformers.pytorch_utils import Conv1D

    if isinstance(targets, str):
        return False
    return any(isinstance(module, Conv1D) and any(names_matching(t, [name]) for t in targets)
               for name, module in model.named_modules())


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) weights count once."""
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if counter is not None:  # peft's: counts a 4-bit weight as the parameters it packs
        return counter()
    params = list(model.parameters())  # deduplicated: a tied weight is listed once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------
# The final model


def merge_final(spec: JobSpec, directory: Path) -> None:
    """Turn a saved adapter directory into the merged full model, in place.

    The base is loaded again, unquantized in float32 on the CPU, and the adapter merged into
    it: the same result whatever the training wrapped the model in (DDP, FSDP) and, for
    QLoRA, a full-precision model rather than a re-quantized one (the adapter was trained
    against the 4-bit base, so the merged model differs from it by the quantization error).
    The adapter itself moves to `<directory>/adapter`. Run by one process (rank 0).
    """
    from peft import PeftModel

    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.merging")
    shutil.rmtree(staging, ignore_errors=True)  # left by a process killed mid-merge
    staging.mkdir()
    try:
        base = _auto_class(spec.objective).from_pretrained(spec.model, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(directory)).merge_and_unload()
        merged.save_pretrained(str(staging))
        adapter_dir = staging / MERGED_ADAPTER_DIR
        adapter_dir.mkdir()
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"):
            if (directory / name).is_file():
                shutil.move(str(directory / name), str(adapter_dir / name))
        for item in directory.iterdir():  # tokenizer files, training_args.bin
            if not (staging / item.name).exists():
                shutil.move(str(item), str(staging / item.name))
        shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("job %s: adapter merged into %s; final model at %s", spec.name, spec.model, directory)


# ---------------------------------------------------------------------------------------
# Inference


@dataclass
class LoadedModel:
    """A trained job's model, ready for inference (eval mode)."""

    model: Any  # a transformers PreTrainedModel, or a peft PeftModel (adapter, not merged)
    tokenizer: PreTrainedTokenizerBase
    # full: every weight trained; merged: an adapter merged into its base; adapter: base +
    # adapter, applied at run time (merged now when load_for_inference was asked to).
    kind: str
    base_model: str | None = None


def _model_class(objective: Objective | str | None, config: Any) -> Any:
    if objective is not None:
        return _auto_class(Objective(objective))
    import transformers

    for architecture in getattr(config, "architectures", None) or []:
        if found := getattr(transformers, architecture, None):
            return found
    raise ValueError(f"cannot tell which model class {config.model_type!r} needs; pass the "
                     "job's objective")


def load_for_inference(
    location: str | Path,
    objective: Objective | str | None = None,
    *,
    base_model: str | None = None,
    merge: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load the model a job trained, from a checkpoint or final directory (or its URL).

    Works for every kind of job output: a full fine-tune's model, a merged adapter (a plain
    full model), or an adapter, which is applied to the base model its adapter_config.json
    names (`base_model` overrides it, e.g. where the base lives elsewhere on this machine).
    With `merge`, an adapter is merged into the base (what an export wants); otherwise it
    stays a peft model. `objective` picks the model class (clm, mlm, seq2seq); without it
    the class comes from the saved config's architectures. This is the one loader `orch
    predict` and `orch export` use.
    """
    from transformers import AutoConfig, AutoTokenizer

    from workers import storage

    local = Path(location) if not storage.is_url(location) else storage.download(
        str(location), Path(tempfile.mkdtemp(prefix="orch-model-")))
    if not local.is_dir():
        raise FileNotFoundError(f"no model directory at {location}")
    # Saved with every checkpoint and final model; an adapter without one (e.g. the one kept
    # inside a merged model) uses its base model's.
    has_tokenizer = (local / "tokenizer_config.json").is_file()
    if (local / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        base_path = base_model or json.loads((local / ADAPTER_CONFIG).read_text()).get(
            "base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{local / ADAPTER_CONFIG} names no base model; pass base_model")
        model_class = _model_class(objective, AutoConfig.from_pretrained(base_path))
        base = model_class.from_pretrained(base_path, dtype=dtype)
        model: Any = PeftModel.from_pretrained(base, str(local))
        if merge:
            model = model.merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(local) if has_tokenizer else base_path)
        loaded = LoadedModel(model, tokenizer, "adapter", base_path)
    else:
        model_class = _model_class(objective, AutoConfig.from_pretrained(str(local)))
        model = model_class.from_pretrained(str(local), dtype=dtype)
        merged_from = local / MERGED_ADAPTER_DIR / ADAPTER_CONFIG
        base_path = (json.loads(merged_from.read_text()).get("base_model_name_or_path")
                     if merged_from.is_file() else None)
        tokenizer = AutoTokenizer.from_pretrained(str(local))
        loaded = LoadedModel(model, tokenizer, "merged" if base_path else "full", base_path)
    if device is not None:
        loaded.model.to(device)
    loaded.model.eval()
    return loaded
