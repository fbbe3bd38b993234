"""Assemble what a run needs before the loop starts: run directory, tokenizer, task, prepared data."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from distributed_ft.config.load import dump_config
from distributed_ft.config.schema import JobConfig
from distributed_ft.data.prepare import PreparedDataset
from distributed_ft.errors import ConfigError
from distributed_ft.modeling.build import load_tokenizer
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.tasks import get_task
from distributed_ft.tasks.base import Task

log = logging.getLogger("distributed_ft")


@dataclass
class Job:
    """A configured run: where it writes, how it tokenizes, what task and data it has."""

    config: JobConfig
    run_dir: Path
    tokenizer: Any
    task: Task
    data: PreparedDataset

    @property
    def labels(self) -> list[str]:
        assert self.data.labels is not None
        return self.data.labels


def resolve_run_dir(config: JobConfig, name: str, context: RuntimeContext) -> Path:
    """``run.output_dir``, or ``runs/<name>-<timestamp>`` chosen on rank 0 and shared with all ranks."""
    chosen = config.run.output_dir
    if chosen is None:
        chosen = context.broadcast_object(f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return Path(chosen)


def data_splits(config: JobConfig, needed: tuple[str, ...] = ("train",)) -> dict[str, str]:
    """``{split: path}`` of the configured data files; ``needed`` splits must be set."""
    paths = {"train": config.data.train, "validation": config.data.validation, "test": config.data.test}
    for split in needed:
        if not paths[split]:
            raise ConfigError(
                f"data.{split} is not set; give a file, e.g. data.{split}=path/to/{split}.conll"
            )
    return {split: path for split, path in paths.items() if path}


def prepare_data_once(
    task: Task, tokenizer: Any, splits: dict[str, str], labels: list[str] | None, context: RuntimeContext
) -> PreparedDataset:
    """Rank 0 prepares (or finds) the cached shards first; the other ranks then read the same cache."""
    prepared = None
    if context.is_main:
        started = time.perf_counter()
        prepared = task.prepare_data(tokenizer, splits, labels)
        how = "reused cache" if prepared.reused else f"prepared in {time.perf_counter() - started:.1f} s"
        log.info("data: %s (%s)", prepared.directory, how)
        for name, split in prepared.splits.items():
            log.info("  %s", split.stats.describe(name))
    context.barrier()
    if not context.is_main:
        prepared = task.prepare_data(tokenizer, splits, labels)
    return prepared


def build_job(
    config: JobConfig, context: RuntimeContext, name: str, data: PreparedDataset | None = None
) -> Job:
    """Create the run directory, write the resolved config, load the tokenizer and prepare the data.

    ``data`` is given when an orchestrator (Ray) has prepared and delivers the data itself.
    """
    run_dir = resolve_run_dir(config, name, context)
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": str(run_dir)})})
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model.name, config.model.revision)
    task = get_task(config)
    prepare_tokenizer = getattr(task, "prepare_tokenizer", None)
    if prepare_tokenizer is not None:  # e.g. entity-marker tokens, also when Ray delivers the data
        prepare_tokenizer(tokenizer)
    if data is None:
        data = prepare_data_once(task, tokenizer, data_splits(config), None, context)
    task.restore_assets(data.meta)  # e.g. class weights, also where the data was prepared elsewhere
    if context.is_main and data.labels is not None:
        (run_dir / "labels.json").write_text(json.dumps(data.labels))
    return Job(config, run_dir, tokenizer, task, data)
