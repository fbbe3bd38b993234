"""``dft export``: a ``save_pretrained`` directory from a run's checkpoint, after the fact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distributed_ft.config.load import load_config
from distributed_ft.config.schema import JobConfig
from distributed_ft.engine import build_engine
from distributed_ft.errors import CheckpointError, ConfigError
from distributed_ft.modeling import gazetteer
from distributed_ft.modeling.build import load_trained
from distributed_ft.modeling.peft import MERGEABLE, merge_adapter, write_export_extras
from distributed_ft.runtime import storage
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.train.checkpoint import PREFIX, CheckpointManager
from distributed_ft.train.job import build_model, load_task

RUN_PARTS = ("config.yaml", "labels.json", "export", "checkpoints")
"""What an export reads from a run directory on storage."""


def local_run(location: str | Path) -> Path:
    """``location`` as a local run directory: a storage URI (``s3://...``) is downloaded once.

    A run directory copied to storage holds ``checkpoints/``; a Ray run keeps its checkpoints at the top
    of ``STORAGE/<run>`` (next to ``config.yaml``), so without ``checkpoints/`` all of it is copied.

    Raises:
        ConfigError: ``location`` is a URI without ``config.yaml`` (not a run), or cannot be read.
    """
    if not storage.is_uri(location):
        return Path(location)
    copy = storage.local_copy(str(location), parts=RUN_PARTS)
    if not (copy / "config.yaml").is_file():
        raise ConfigError(f"{str(location)!r} is not a run directory (no config.yaml)")
    return copy if (copy / "checkpoints").is_dir() else storage.local_copy(str(location))


def checkpoints_dir(root: Path) -> Path:
    """Where the checkpoints of run directory ``root`` are: ``checkpoints/``, or ``root`` (Ray's layout)."""
    nested = root / "checkpoints"
    return root if not nested.is_dir() and any(root.glob(f"{PREFIX}*")) else nested


def run_config(run_dir: str | Path) -> JobConfig:
    """The resolved config a run directory was trained with.

    Raises:
        ConfigError: ``run_dir`` has no ``config.yaml``.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir!r} is not a run directory (no config.yaml)")
    return load_config(str(path))[0]


def export_run(
    run_dir: str | Path, out: str, which: str, context: RuntimeContext, merge_lora: bool = False
) -> Path:
    """Load checkpoint ``which`` (``best``, ``latest`` or a path) of ``run_dir`` and export it to ``out``.

    ``run_dir`` may be a storage URI (see :func:`local_run`). A PEFT run exports its adapter
    (``adapter_config.json`` + weights + tokenizer); ``merge_lora`` merges a LoRA or IA3 adapter into the
    base weights and writes a full model instead.
    """
    root = local_run(run_dir)
    config = run_config(root)
    if merge_lora and config.peft.method not in MERGEABLE:
        full = " (its export is a full model already)" if config.peft.method in ("none", "freeze") else ""
        raise ConfigError(
            f"--merge-lora merges LoRA or IA3 adapters; this run used peft.method={config.peft.method}{full}"
        )
    checkpoints = CheckpointManager(checkpoints_dir(root), context)
    checkpoint = {"best": checkpoints.best or checkpoints.latest, "latest": checkpoints.latest}.get(
        which, Path(which)
    )
    if checkpoint is None or not checkpoint.is_dir():
        raise CheckpointError(f"no {which} checkpoint of {run_dir} (looked in {checkpoints.directory})")
    export_dir = root / "export"
    tokenizer, task = load_task(config, str(export_dir) if export_dir.is_dir() else None)
    labels_file = root / "labels.json"
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    engine = build_engine(config, context)
    model = build_model(config, task, labels, engine)
    engine.prepare(model, total_steps=1)
    engine.load(checkpoint, weights_only=True)
    target = Path(out)
    written = target.with_name(f".{target.name}.adapter") if merge_lora else target
    engine.export(written)  # every rank: ZeRO-3 gathers the partitioned parameters
    if context.is_main:
        tokenizer.save_pretrained(written)
        write_export_extras(engine.module, written)
        gazetteer.copy_into_export(getattr(config.data, "gazetteer", None), written)
        if merge_lora:  # merged on one plain CPU copy, from the adapter just written
            merge_adapter(load_trained(config.task, str(written))).save_pretrained(target)
            tokenizer.save_pretrained(target)
            gazetteer.copy_into_export(getattr(config.data, "gazetteer", None), target)
            shutil.rmtree(written)
    context.barrier()
    return target
