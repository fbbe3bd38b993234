"""Load tokenizers and ``AutoModelFor*`` models from a hub id, a local directory, or ``builtin:NAME``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForTokenClassification, AutoTokenizer, PreTrainedTokenizerFast

from distributed_ft.config.schema import ModelConfig
from distributed_ft.data import builtin
from distributed_ft.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_CLASSES = {"token_classification": AutoModelForTokenClassification}


def resolve_model_path(name: str) -> str:
    """A builtin resolved to its directory; a local path or a hub id unchanged."""
    return builtin.resolve(name)


def _load_error(name: str, exc: Exception) -> ConfigError:
    where = "local directory" if Path(name).exists() else "hub id (no network here?)"
    return ConfigError(
        f"could not load model.name={name!r} as a {where}: {exc}. Pass a directory written by "
        "save_pretrained, a reachable hub id, or builtin:minilm-l6"
    )


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


def build_model(
    task: str, config: ModelConfig, labels: list[str] | None = None, **config_overrides
) -> nn.Module:
    """Load ``config.name`` with the head for ``task``; ``labels`` set the label maps of the head."""
    path = resolve_model_path(config.name)
    kwargs = dict(config_overrides)
    if labels is not None:
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    try:
        model = AUTO_CLASSES[task].from_pretrained(
            path, revision=config.revision, dtype=_DTYPES[config.dtype], **kwargs
        )
    except (OSError, ValueError) as exc:
        raise _load_error(config.name, exc) from exc
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def load_trained(task: str, directory: str) -> nn.Module:
    """A model exported by a run (its head and label maps come from its own config)."""
    try:
        return AUTO_CLASSES[task].from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise _load_error(directory, exc) from exc
