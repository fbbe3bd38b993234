"""``dft export``: a ``save_pretrained`` directory from a run's checkpoint, after the fact."""

from __future__ import annotations

import json
from pathlib import Path

from distributed_ft.config.load import load_config
from distributed_ft.engine import build_engine
from distributed_ft.errors import CheckpointError, ConfigError
from distributed_ft.modeling.build import load_tokenizer
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.tasks import get_task
from distributed_ft.train.checkpoint import CheckpointManager


def export_run(run_dir: str, out: str, which: str, context: RuntimeContext, merge_lora: bool = False) -> Path:
    """Load checkpoint ``which`` (``best``, ``latest`` or a path) of ``run_dir`` and export it to ``out``."""
    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"{run_dir!r} is not a run directory (no config.yaml)")
    if merge_lora:
        raise ConfigError("--merge-lora needs a PEFT run; this run was trained without peft.method=lora")
    config, _ = load_config(str(root / "config.yaml"))
    checkpoints = CheckpointManager(root / "checkpoints", context)
    checkpoint = {"best": checkpoints.best or checkpoints.latest, "latest": checkpoints.latest}.get(
        which, Path(which)
    )
    if checkpoint is None or not checkpoint.is_dir():
        raise CheckpointError(f"no {which} checkpoint in {root / 'checkpoints'}")
    export_dir = root / "export"
    tokenizer = load_tokenizer(str(export_dir) if export_dir.is_dir() else config.model.name)
    labels_file = root / "labels.json"
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    engine = build_engine(config, context)
    engine.prepare(get_task(config).build_model(labels), total_steps=1)
    engine.load(checkpoint)
    target = Path(out)
    engine.export(target)
    if context.is_main:
        tokenizer.save_pretrained(target)
    return target
