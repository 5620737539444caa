"""What each objective needs from its model, tokenizer and instruction data: the one rule.

The preflight checks (`orch validate`, submit) and the workers (before they spend any time
training) both ask these functions, so a spec that passes one passes the other. Torch-free:
the functions read a model config, a tokenizer or a data record they are handed; transformers
is imported only to read its own tables of which architecture has which head.

Every problem is one line that names the spec field and says what to do.
"""

from __future__ import annotations

from typing import Any

from orchestrator.spec import JobSpec, Objective

# Roles a chat message may have; the assistant's turns are what an instruction job learns.
CHAT_ROLES = ("system", "user", "assistant", "tool")
ASSISTANT = "assistant"


def _head_tables() -> dict[str, Any]:
    from transformers.models.auto import modeling_auto as auto

    return {
        "clm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "mlm": auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "seq2seq": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    }


def model_problem(spec: JobSpec, config: Any) -> str | None:
    """Whether the model's architecture has a head for the objective (config: its
    PretrainedConfig). None when it does."""
    tables = _head_tables()
    objective = spec.objective.value
    kind = getattr(config, "model_type", None)
    if not isinstance(kind, str) or kind not in tables[objective]:
        return (f"model: a {kind!r} model has no {objective} head; use a model made for "
                f"{objective} or change objective")
    if spec.objective == Objective.CLM and _encoder_only(kind, config, tables):
        # transformers lists e.g. BertLMHeadModel as a causal LM, but it is an encoder whose
        # causal head only works as the decoder of an encoder-decoder pair.
        return (f"model: {spec.model} is a {kind!r} encoder (bidirectional), which has no "
                "causal-LM head of its own (its config does not say is_decoder: true); for "
                "objective clm use a decoder model (GPT-style), or use objective mlm with it")
    return None


def _encoder_only(kind: str, config: Any, tables: dict[str, Any]) -> bool:
    """A masked-LM architecture whose causal class is its decoder adaptation: in both head
    tables with different classes, and not an encoder-decoder (whose causal class is its
    own decoder, e.g. BART's)."""
    causal, masked = tables["clm"].get(kind), tables["mlm"].get(kind)
    return (masked is not None and causal != masked and kind not in tables["seq2seq"]
            and not getattr(config, "is_decoder", False))


def chat_template(spec: JobSpec, tokenizer: Any) -> str | None:
    """The chat template an instruction job renders messages with: the spec's, else the
    tokenizer's own."""
    return spec.dataset.chat_template or getattr(tokenizer, "chat_template", None) or None


def tokenizer_problems(spec: JobSpec, tokenizer: Any) -> list[str]:
    """What the objective needs from the tokenizer and it lacks."""
    name = spec.tokenizer or spec.model
    problems: list[str] = []
    if spec.objective == Objective.MLM:
        if tokenizer.mask_token is None:
            problems.append(
                f"tokenizer: {name} has no mask token, which masked language modelling needs; "
                "use a BERT-style tokenizer (or objective clm for GPT-style models)")
        if tokenizer.pad_token is None:
            problems.append(f"tokenizer: {name} has no pad token to pad mlm batches with; use "
                            "a tokenizer that defines one")
    elif spec.objective == Objective.CLM:
        if tokenizer.pad_token is None and tokenizer.eos_token is None:
            problems.append(
                f"tokenizer: {name} has neither a pad token nor an eos token, so batches "
                "cannot be padded and documents cannot end; use a tokenizer that defines eos")
        elif tokenizer.eos_token is None:
            problems.append(f"tokenizer: {name} has no eos token to end each document with; "
                            "use a tokenizer that defines one")
        if spec.dataset.messages_column and chat_template(spec, tokenizer) is None:
            problems.append(
                f"dataset.chat_template: {name} has no chat template to render "
                f"dataset.messages_column with; give one (a Jinja file, e.g. "
                "chat_template: ./assets/templates/chat.jinja)")
    elif tokenizer.pad_token is None:
        problems.append(f"tokenizer: {name} has no pad token to pad seq2seq batches with; use "
                        "a tokenizer that defines one")
    return problems


def messages_problem(value: Any) -> str | None:
    """Why one row's messages are not a chat: a list of {role, content} mappings with string
    content and a known role (other keys go to the template as they are). None when they
    are."""
    if not isinstance(value, list) or not value:
        return f"must be a non-empty list of {{role, content}} messages (got {_short(value)})"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return (f"message {i} must be a mapping with the keys role and content "
                    f"(got {_short(message)})")
        if message["role"] not in CHAT_ROLES:
            return f"message {i} has role {message['role']!r}; use one of {', '.join(CHAT_ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {i}'s content must be text (got {_short(message['content'])})"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
