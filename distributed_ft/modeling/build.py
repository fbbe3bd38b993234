"""Load tokenizers and ``AutoModelFor*`` models from a hub id, a local directory, or ``builtin:NAME``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from distributed_ft.config.model_source import missing_model_dir
from distributed_ft.config.schema import ModelConfig
from distributed_ft.data import builtin
from distributed_ft.errors import ConfigError
from distributed_ft.modeling import crf, gazetteer

log = logging.getLogger("distributed_ft")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_CLASSES = {
    "token_classification": AutoModelForTokenClassification,
    "sequence_classification": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
}
HEAD_ARCHITECTURES = {
    "token_classification": "ForTokenClassification",
    "sequence_classification": "ForSequenceClassification",
}
"""Classification tasks and the suffix of their head's architecture name (in ``config.architectures``)."""


def resolve_model_path(name: str) -> str:
    """A builtin resolved to its directory; a local path or a hub id unchanged."""
    return builtin.resolve(name)


def _load_error(name: str, exc: Exception) -> ConfigError:
    missing = missing_model_dir(name)
    if missing is not None:
        return ConfigError(missing)
    where = "local directory" if Path(name).exists() else "hub id (no network here?)"
    reason = str(exc).rstrip(". ")
    return ConfigError(
        f"could not load model.name={name!r} as a {where}: {reason}. Pass a directory written by "
        "save_pretrained, a reachable hub id, or builtin:minilm-l6"
    )


def model_hidden_size(config: ModelConfig) -> int | None:
    """The hidden size in the model's ``config.json`` (read without building the model), if it has one."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(resolve_model_path(config.name), revision=config.revision)
    except (OSError, ValueError) as exc:
        raise _load_error(config.name, exc) from exc
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", None)
    return int(hidden) if hidden else None


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerFast:
    """The fast tokenizer of ``name`` (``word_ids()`` needs a fast one)."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    if not tokenizer.is_fast:
        raise ConfigError(f"{name!r} has no fast tokenizer; word-level label alignment needs one")
    return tokenizer


def _shown(labels: list[str], most: int = 6) -> str:
    return ", ".join(labels[:most]) + (f", ... ({len(labels)})" if len(labels) > most else "")


def pretrained_head(model_config: Any) -> tuple[str, list[str]] | None:
    """The task and labels of the classification head a checkpoint's config names, or ``None`` (no head)."""
    for name in getattr(model_config, "architectures", None) or []:
        for task, suffix in HEAD_ARCHITECTURES.items():
            if name.endswith(suffix):
                id2label = getattr(model_config, "id2label", None) or {}
                return task, [str(id2label[i]) for i in sorted(id2label, key=int)]
    return None


def head_mismatch(task: str, model_config: Any, labels: list[str]) -> str | None:
    """Why the classification head of a checkpoint (its config) does not fit ``labels``, else ``None``.

    A checkpoint without such a head (a base or LM model) gets a new head: nothing to mismatch. Generic
    label names (``LABEL_0``, ...) say nothing beyond their count.
    """
    head = pretrained_head(model_config)
    if head is None:
        return None
    head_task, head_labels = head
    kind = head_task.replace("_", "-")
    if head_task != task:
        return f"a {len(head_labels)}-label {kind} head, not a {task.replace('_', '-')} one"
    if len(head_labels) != len(labels):
        return f"a {len(head_labels)}-label {kind} head; this job has {len(labels)} labels"
    generic = all(label == f"LABEL_{i}" for i, label in enumerate(head_labels))
    if not generic and head_labels != labels:
        return f"a {kind} head for the labels {_shown(head_labels)}; this job's labels are {_shown(labels)}"
    return None


def _head_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters outside the base model (the task head)."""
    prefix = f"{model.base_model_prefix}."
    return [name for name, _ in model.named_parameters() if not name.startswith(prefix)]


def _reinitialise(model: nn.Module, names: list[str]) -> None:
    """Fresh weights for the modules owning ``names``: Linear as transformers does, others their own reset."""
    std = getattr(model.config, "initializer_range", 0.02)
    owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in names}
    for owner in sorted(owners):
        module = model.get_submodule(owner)
        if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
            raise ConfigError(
                f"the head {owner!r} keeps its pretrained shape and cannot be re-initialised in a model "
                "constructed partitioned (ZeRO-3): train with deepspeed.zero_stage<=2 or from a checkpoint "
                "without this head"
            )
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()


def _head_plan(task: str, config: ModelConfig, path: str, labels: list[str] | None) -> str | None:
    """Why the pretrained head is replaced, or ``None`` (kept or none); a mismatch under ``false`` fails."""
    if task not in HEAD_ARCHITECTURES or labels is None:
        return None
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path, revision=config.revision)
    except (OSError, ValueError) as exc:
        raise _load_error(config.name, exc) from exc
    mismatch = head_mismatch(task, model_config, labels)
    if mismatch and config.reset_head is False:
        raise ConfigError(f"model {config.name} has {mismatch}: set model.reset_head=auto to replace it")
    if config.reset_head is True and pretrained_head(model_config) is not None:
        return f"model {config.name}: model.reset_head=true"
    return f"model {config.name} has {mismatch} (model.reset_head=auto)" if mismatch else None


def build_model(
    task: str,
    config: ModelConfig,
    labels: list[str] | None = None,
    vocab_size: int | None = None,
    **config_overrides,
) -> nn.Module:
    """Load ``config.name`` with the head for ``task``; ``labels`` set the label maps of the head.

    A pretrained classification head that does not fit ``labels`` is replaced (``model.reset_head``).
    ``vocab_size`` (the tokenizer's length after tokens were added, e.g. entity markers) grows the input
    embeddings when they are smaller; new rows start at the mean of the old ones.
    """
    path = resolve_model_path(config.name)
    kwargs = dict(config_overrides)
    if labels is not None:
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    replace = _head_plan(task, config, path, labels)
    if replace:
        kwargs.update(ignore_mismatched_sizes=True, output_loading_info=True)
    try:
        loaded = AUTO_CLASSES[task].from_pretrained(
            path, revision=config.revision, dtype=_DTYPES[config.dtype], **kwargs
        )
    except (OSError, ValueError) as exc:
        raise _load_error(config.name, exc) from exc
    except RuntimeError as exc:  # a head of another shape that the checkpoint's config did not reveal
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise ConfigError(
            f"model {config.name}: its weights do not fit this job's head ({len(labels or [])} labels); "
            "set model.reset_head=true to replace the head"
        ) from exc
    model = loaded[0] if replace else loaded
    if replace:
        info = loaded[1]
        fresh = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}
        fresh |= set(info.get("missing_keys", ()))
        head = _head_parameters(model)
        _reinitialise(model, [name for name in head if name not in fresh])
        log.info("%s: the head is re-initialised (%s)", replace, ", ".join(head))
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def load_trained(task: str, directory: str) -> nn.Module:
    """A model exported by a run (its head and label maps come from its own config).

    An adapter export (``adapter_config.json``) is loaded onto the base model its config names. A CRF the
    export records (``model.crf``) comes back with it, its scores in the outputs (``modeling/crf.py``), and
    so does a gazetteer embedding (``data.gazetteer``: ``modeling/gazetteer.py``), fed by the ``gazetteer``
    kwarg.
    """
    from distributed_ft.modeling import peft

    if peft.is_adapter_dir(directory):
        model = peft.load_adapter(directory, lambda base, **kwargs: _load_pretrained(task, base, **kwargs))
    else:
        model = _load_pretrained(task, directory)
    return gazetteer.install(crf.install(model))


def _load_pretrained(task: str, name: str, **kwargs) -> nn.Module:
    """``AUTO_CLASSES[task]`` of ``name``, with the CRF its config (or an adapter base's kwargs) records."""
    recorded = kwargs.pop(crf.CONFIG_KEY, None)
    recorded_gazetteer = kwargs.pop(gazetteer.CONFIG_KEY, None)
    path = resolve_model_path(name)
    try:
        model = AUTO_CLASSES[task].from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    if recorded:  # an adapter's base: the CRF's weights are in the adapter
        setattr(model.config, crf.CONFIG_KEY, recorded)
    if recorded_gazetteer:
        setattr(model.config, gazetteer.CONFIG_KEY, recorded_gazetteer)
    model = crf.restore(model, path, weights_in_directory=recorded is None)
    return gazetteer.restore(model, path, weights_in_directory=recorded_gazetteer is None)
