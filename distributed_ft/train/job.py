"""The one assembly path: tokenizer and task, prepared data, model (PEFT applied) and run directory.

The loop, the Ray driver and workers, ``dft data prepare``, ``dft export``, ``dft plan --validate`` and the
benchmarks build these pieces here, so a task is always rebuilt the same way: from the config plus the
assets its preparation kept in the manifest (``Task.restore_assets``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import set_seed

from distributed_ft.config.load import dump_config, load_config
from distributed_ft.config.schema import JobConfig
from distributed_ft.data.prepare import PreparedDataset
from distributed_ft.engine.base import Engine
from distributed_ft.errors import ConfigError, DftError
from distributed_ft.modeling import crf, gazetteer
from distributed_ft.modeling.build import load_tokenizer, model_hidden_size
from distributed_ft.modeling.peft import apply_peft
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.tasks import get_task
from distributed_ft.tasks.base import PreparesTokenizer, Task
from distributed_ft.train.checkpoint import PREFIX, is_complete

log = logging.getLogger("distributed_ft")


def load_task(config: JobConfig, tokenizer_source: str | None = None) -> tuple[Any, Task]:
    """The job's tokenizer and task, the tokenizer adapted to the task (added marker tokens, a template).

    ``tokenizer_source``: a directory to load the tokenizer from instead of ``model.name`` (an export).
    """
    if tokenizer_source is None:
        tokenizer = load_tokenizer(config.model.name, config.model.revision)
    else:
        tokenizer = load_tokenizer(tokenizer_source)
    task = get_task(config)
    if isinstance(task, PreparesTokenizer):  # also where the data was prepared elsewhere (Ray workers)
        task.prepare_tokenizer(tokenizer)
    return tokenizer, task


def build_model(config: JobConfig, task: Task, labels: list[str] | None, engine: Engine) -> nn.Module:
    """The task's model, PEFT applied, built inside ``engine.model_construction`` (ZeRO-3: partitioned)."""
    with engine.model_construction(model_hidden_size(config.model)):
        return gazetteer.install(crf.install(apply_peft(task.build_model(labels), config)))


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
    """``run.output_dir``, or the default one (:func:`default_run_dir`) chosen on rank 0 for all ranks."""
    chosen = config.run.output_dir
    if chosen is None:
        chosen = context.broadcast_object(default_run_dir(config, name) if context.is_main else None)
    return Path(chosen)


RUNS = Path("runs")
"""Where runs without ``run.output_dir`` go: ``runs/<name>-<YYYYmmdd-HHMMSS>``."""


def default_run_dir(config: JobConfig, name: str) -> str:
    """The newest unfinished run of this very config under ``runs/`` (``run.resume=auto``), else a new one.

    So a job stopped by SIGTERM resumes when the same command runs again; ``run.resume=never`` starts anew.
    """
    if config.run.resume == "auto" and RUNS.is_dir():
        stamped = re.compile(re.escape(name) + r"-\d{8}-\d{6}")
        runs = sorted((p for p in RUNS.iterdir() if stamped.fullmatch(p.name)), reverse=True)
        for run_dir in runs:
            if _has_checkpoint(run_dir) and not (run_dir / "results.json").exists():
                before = _saved_config(run_dir)
                if before is not None and fingerprint(before) == fingerprint(config):
                    log.info(
                        "resuming the unfinished run %s of this config (run.resume=never: a new run)", run_dir
                    )
                    return str(run_dir)
    return str(RUNS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def fingerprint(config: JobConfig) -> dict[str, Any]:
    """The config as it decides what is trained.

    All of it but where it writes, resumes and shows progress, and the layout (workers, ZeRO stage,
    grad_accum), which a resumed run may change (``train/layout.py``).
    """
    values = config.model_dump(mode="json")
    for key in ("output_dir", "resume", "progress", "num_workers"):
        values["run"].pop(key)
    values["deepspeed"].pop("zero_stage")
    values["train"].pop("grad_accum")
    return values


def _has_checkpoint(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(is_complete(p) for p in checkpoints.glob(f"{PREFIX}*"))


def _saved_config(run_dir: Path) -> JobConfig | None:
    """The ``config.yaml`` a run wrote, or ``None`` when it has none that loads."""
    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        return load_config(str(run_dir / "config.yaml"))[0]
    except ConfigError:
        return None


def run_dir_refusal(run_dir: Path, config: JobConfig) -> str | None:
    """Why ``config`` may not run in ``run_dir`` (``None``: it may). Nothing of a kept run is overwritten.

    A finished run (``results.json``) is never trained over. An unfinished run is resumed only with the
    task, model, PEFT setup and data files it was started with (:data:`IDENTITY`): others would load its
    checkpoints into the wrong shapes, or train on with the old weights under a new ``config.yaml``.
    ``run.resume=never`` explicitly starts that unfinished run over.
    """
    if (run_dir / "results.json").is_file():
        return (
            f"run.output_dir={run_dir} holds a finished run (results.json); its results are kept. Give a new "
            f"run.output_dir, or use `dft evaluate {run_dir}` / `dft predict {run_dir}` to use it"
        )
    if config.run.resume == "never" or not _has_checkpoint(run_dir):
        return None  # nothing that would be resumed
    before = _saved_config(run_dir)
    if before is None:
        return None  # unreadable: nothing of it can be resumed anyway
    changed = config_changes(before, config)
    if not changed:
        return None
    return (
        f"run.output_dir={run_dir} holds an unfinished run of another config ({'; '.join(changed[:3])}). "
        "Resume it with its own config, start it over with run.resume=never, or give a new run.output_dir"
    )


IDENTITY = ("task", "model.", "peft.", "data.train", "data.validation", "data.test", "data.gazetteer")
"""The settings that make a run what it is: a checkpoint resumes only under the same ones (``train.*``,
``eval.*`` or ``run.*`` may change, e.g. more steps or another learning rate)."""


def config_changes(before: JobConfig, after: JobConfig) -> list[str]:
    """``key: old -> new`` for each :data:`IDENTITY` setting that differs between two configs."""

    def flat(config: JobConfig) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section, values in config.model_dump(mode="json").items():
            items = values.items() if isinstance(values, dict) else [("", values)]
            for key, value in items:
                name = f"{section}.{key}" if key else section
                if name.startswith(IDENTITY):
                    out[name] = value
        return out

    old, new = flat(before), flat(after)
    keys = sorted(old | new)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


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
    """Every rank gets the prepared data; one process per cache directory encodes it.

    Rank 0 computes the cache key (a ``stat`` of the inputs, nothing is read) and broadcasts it: the only
    collective, before any work. Every rank then prepares under that key: on a miss the process that takes
    the key's lock encodes and the others wait for its manifest on the filesystem, so a long preparation
    never sits inside a collective (whose timeout it could exceed). Rank 0's failure to compute the key is
    raised on every rank.
    """
    key: str | None = None
    failure: Exception | None = None
    if context.is_main:
        try:
            key = task.cache_key(tokenizer, splits, labels)
        except Exception as exc:
            failure = exc
    key, error = context.broadcast_object((key, _shareable(failure)))
    if failure is not None:
        raise failure
    if error is not None:
        raise error
    started = time.perf_counter()
    prepared = task.prepare_data(tokenizer, splits, labels, key=key)
    if context.is_main:
        seconds = time.perf_counter() - started
        how = f"cache ready after {seconds:.1f} s" if prepared.reused else f"prepared in {seconds:.1f} s"
        log.info("data: %s (%s)", prepared.directory, how)
        for name, split in prepared.splits.items():
            log.info("  %s", split.stats.describe(name))
        for note in prepared.meta.get("training_set", []):
            log.info("  train: %s", note)
    return prepared


def _shareable(error: Exception | None) -> Exception | None:
    """``error`` as the other ranks can unpickle it: our own errors as they are, others as a summary."""
    if error is None or isinstance(error, DftError):
        return error
    return RuntimeError(f"rank 0 could not compute the data cache key: {type(error).__name__}: {error}")


def build_job(
    config: JobConfig, context: RuntimeContext, name: str, data: PreparedDataset | None = None
) -> Job:
    """Create the run directory, write the resolved config, load the tokenizer and prepare the data.

    ``data`` is given when an orchestrator (Ray) has prepared and delivers the data itself.
    """
    run_dir = resolve_run_dir(config, name, context)
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": str(run_dir)})})
    refusal = context.broadcast_object(run_dir_refusal(run_dir, config) if context.is_main else None)
    if refusal is not None:  # every rank stops, not only the one that looked
        raise ConfigError(refusal)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    set_seed(config.train.seed)
    tokenizer, task = load_task(config)
    if data is None:
        data = prepare_data_once(task, tokenizer, data_splits(config), None, context)
    task.restore_assets(data.meta)  # e.g. class weights, also where the data was prepared elsewhere
    if context.is_main and data.labels is not None:
        (run_dir / "labels.json").write_text(json.dumps(data.labels))
    return Job(config, run_dir, tokenizer, task, data)
