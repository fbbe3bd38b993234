"""Load tokenizers and ``AutoModelFor*`` models from a hub id, a local directory, or ``builtin:NAME``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from distributed_ft.config.schema import ModelConfig
from distributed_ft.data import builtin
from distributed_ft.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_CLASSES = {
    "token_classification": AutoModelForTokenClassification,
    "sequence_classification": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
}


def resolve_model_path(name: str) -> str:
    """A builtin resolved to its directory; a local path or a hub id unchanged."""
    return builtin.resolve(name)


def _load_error(name: str, exc: Exception) -> ConfigError:
    where = "local directory" if Path(name).exists() else "hub id (no network here?)"
    return ConfigError(
        f"could not load model.name={name!r} as a {where}: {exc}. Pass a directory written by "
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


def build_model(
    task: str,
    config: ModelConfig,
    labels: list[str] | None = None,
    vocab_size: int | None = None,
    **config_overrides,
) -> nn.Module:
    """Load ``config.name`` with the head for ``task``; ``labels`` set the label maps of the head.

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
    try:
        model = AUTO_CLASSES[task].from_pretrained(
            path, revision=config.revision, dtype=_DTYPES[config.dtype], **kwargs
        )
    except (OSError, ValueError) as exc:
        raise _load_error(config.name, exc) from exc
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def load_trained(task: str, directory: str) -> nn.Module:
    """A model exported by a run (its head and label maps come from its own config).

    An adapter export (``adapter_config.json``) is loaded onto the base model its config names.
    """
    from distributed_ft.modeling import peft

    if peft.is_adapter_dir(directory):
        return peft.load_adapter(directory, lambda base, **kwargs: _load_pretrained(task, base, **kwargs))
    return _load_pretrained(task, directory)


def _load_pretrained(task: str, name: str, **kwargs) -> nn.Module:
    try:
        return AUTO_CLASSES[task].from_pretrained(resolve_model_path(name), **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
