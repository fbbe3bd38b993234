"""What the extra heads (``modeling/crf.py``, ``modeling/gazetteer.py``) share.

Each head is a top-level child module of the transformers model, recorded under its own key in
``model.config`` (so the export's ``config.json`` carries it) and saved with the model's weights, which
plain transformers reports unused when it loads the export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def recorded(model: nn.Module, config_key: str) -> dict[str, Any] | None:
    """The record ``model.config`` holds under ``config_key`` (``None``: the model has no such head)."""
    config = getattr(model, "config", None)
    return getattr(config, config_key, None) if config is not None else None


def owner(model: nn.Module, module_name: str) -> nn.Module | None:
    """The transformers model under ``model`` (a PEFT wrapper or the model itself) if it has the child."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner if hasattr(inner, module_name) else None


def saved_weights(directory: str | Path, module_name: str) -> dict[str, torch.Tensor]:
    """The child's tensors in the directory's safetensors files, keyed as its own state dict."""
    from safetensors import safe_open

    prefix = f"{module_name}."
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                if key.startswith(prefix):
                    weights[key[len(prefix) :]] = handle.get_tensor(key)
    return weights
