"""Gazetteer features added to a token classifier's word embeddings (``data.gazetteer``).

The model gets a child ``gazetteer_embedding``: an ``nn.Embedding(num_features, hidden_size)``,
zero-initialised with ``padding_idx=0``, so a fresh one leaves the model as it was and feature ``0`` (no
match, padding, special tokens) never moves. Being a top-level child it is a head like the CRF: DDP and
ZeRO train (and partition) it, PEFT keeps it in ``modules_to_save``, and it is in checkpoints and
``save_pretrained``; ``config.json`` records it (:data:`CONFIG_KEY`) and the export holds a copy of the
gazetteer file (:data:`FILE`).

How a batch's feature ids reach the embeddings (:func:`install`): the batch carries them as the kwarg
``gazetteer`` (:data:`~distributed_ft.data.gazetteer.COLUMN`). A forward pre-hook (with kwargs) on the
module the engine calls pops it, so the transformers forward never sees it, and keeps the tensor for this
call; a forward hook on the input embedding module adds ``gazetteer_embedding(ids)`` (called as a module:
ZeRO-3 gathers its weight there) to its output, and a forward hook on the outer module drops the tensor
again. Nothing is read on the host; the ids are on the device the batch was moved to. A call without the
kwarg adds nothing (the same as all ids ``0``).

Plain transformers loading the export keeps the key as an unknown config attribute and reports the
``gazetteer_embedding.*`` weights unused: the model without features.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_ft.errors import ConfigError
from distributed_ft.modeling import heads

log = logging.getLogger("distributed_ft")

CONFIG_KEY = "dft_gazetteer"
"""``config.json`` key: ``{"file": FILE, "lowercase": bool, "types": [...], "sha256": ...}``."""
MODULE = "gazetteer_embedding"
"""The embedding's attribute name on the transformers model (its state-dict prefix)."""
FILE = "gazetteer.tsv"
"""The gazetteer's copy in an export directory."""
KWARG = "gazetteer"
"""The batch key (model kwarg) of the feature ids; popped before the transformers forward."""


def attach(model: nn.Module, types: list[str], lowercase: bool, digest: str) -> nn.Module:
    """Add a zero embedding of ``1 + 2 * len(types)`` features and record it in ``model.config``."""
    hidden = model.get_input_embeddings().embedding_dim
    embedding = nn.Embedding(1 + 2 * len(types), hidden, padding_idx=0)
    nn.init.zeros_(embedding.weight)
    dtype = getattr(model, "dtype", torch.float32)
    model.add_module(MODULE, embedding.to(dtype=dtype))
    record = {"file": FILE, "lowercase": lowercase, "types": list(types), "sha256": digest}
    setattr(model.config, CONFIG_KEY, record)
    return model


def spec(model: nn.Module) -> dict[str, Any] | None:
    """The gazetteer ``model.config`` records (``None``: none)."""
    return heads.recorded(model, CONFIG_KEY)


def owner(model: nn.Module) -> nn.Module | None:
    """The transformers model under ``model`` (a PEFT wrapper or the model itself) if it has the embedding."""
    return heads.owner(model, MODULE)


def install(model: nn.Module) -> nn.Module:
    """Route the ``gazetteer`` kwarg of ``model``'s forward to the input embeddings (see the module doc).

    A no-op for a model without a gazetteer embedding. The hooks go on the outermost module: PEFT's
    wrappers call the inner model's ``forward`` directly, past its hooks.
    """
    inner = owner(model)
    if inner is None or getattr(model, "_dft_gazetteer_hook", False):
        return model
    current: dict[str, torch.Tensor] = {}

    def take(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        del module
        ids = kwargs.pop(KWARG, None)
        if ids is not None:
            current["ids"] = ids
        return args, kwargs

    def drop(module: nn.Module, args: Any, outputs: Any) -> None:
        del module, args, outputs
        current.pop("ids", None)

    def add(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        del module, args
        ids = current.get("ids")
        if ids is None:
            return output
        features = getattr(inner, MODULE)(ids.to(output.device, non_blocking=True))  # PEFT may wrap it
        return output + features.to(output.dtype)

    model.register_forward_pre_hook(take, with_kwargs=True)
    model.register_forward_hook(drop, always_call=True)
    inner.get_input_embeddings().register_forward_hook(add)
    model._dft_gazetteer_hook = True
    return model


def restore(model: nn.Module, directory: str | Path, weights_in_directory: bool = True) -> nn.Module:
    """Re-attach the gazetteer embedding an export's config records, its weights from the safetensors.

    Args:
        model: The transformers model loaded from ``directory`` (without the embedding).
        directory: The export (a local directory).
        weights_in_directory: ``False`` for the base of an adapter export (PEFT loads the weights).

    Raises:
        ConfigError: The config records a gazetteer whose weights the directory's safetensors lack.
    """
    recorded = spec(model)
    if not recorded or hasattr(model, MODULE):
        return model
    attach(model, recorded["types"], recorded.get("lowercase", False), recorded.get("sha256", ""))
    if not weights_in_directory:
        return model
    key = f"{MODULE}.weight"
    weight = heads.saved_weights(directory, MODULE).get("weight")
    if weight is None:
        raise ConfigError(
            f"{directory}/config.json records a gazetteer ({CONFIG_KEY}) but no safetensors file there "
            f"holds its {key}: export the run again (dft export RUN_DIR --out DIR)"
        )
    getattr(model, MODULE).load_state_dict({"weight": weight})
    log.info("%s: the gazetteer embedding (unused by transformers' loader) is loaded", directory)
    return model


def recorded_file(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The gazetteer copy an export records and its record (``None``: the export has no gazetteer).

    Reads ``config.json`` (a full export) or ``base_model_kwargs.json`` (an adapter export).

    Raises:
        ConfigError: The export records a gazetteer but its file is missing.
    """
    import json

    directory = Path(directory)
    record = None
    for name in ("config.json", "base_model_kwargs.json"):
        if (directory / name).is_file():
            record = json.loads((directory / name).read_text()).get(CONFIG_KEY) or record
    if not record:
        return None
    path = directory / record.get("file", FILE)
    if not path.is_file():
        raise ConfigError(
            f"{directory} records a gazetteer ({CONFIG_KEY}) but {path.name} is missing there: copy the "
            f"gazetteer the model was trained with to {path}, or export the run again"
        )
    return path, record


def copy_into_export(source: str | Path | None, directory: str | Path) -> None:
    """Copy the job's gazetteer file (``data.gazetteer``) into an export directory (no-op without one)."""
    if source:
        shutil.copyfile(source, Path(directory) / FILE)
