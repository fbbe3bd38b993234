"""Tasks: one module per task with its encoding, collation, loss, metrics and decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributed_ft.errors import ConfigError

if TYPE_CHECKING:
    from distributed_ft.config.schema import JobConfig
    from distributed_ft.tasks.base import Task

TASKS = {
    "token_classification": ("distributed_ft.tasks.token_classification", "TokenClassificationTask"),
    "sequence_classification": ("distributed_ft.tasks.sequence_classification", "SequenceClassificationTask"),
    "causal_lm": ("distributed_ft.tasks.causal_lm", "CausalLMTask"),
}
"""``task`` name -> (module, class); modules are imported only when their task is used."""


def get_task(config: JobConfig) -> Task:
    """The task object ``config.task`` names."""
    import importlib

    if config.task not in TASKS:
        raise ConfigError(f"task {config.task!r} is not implemented; available: {', '.join(TASKS)}")
    module, cls = TASKS[config.task]
    return getattr(importlib.import_module(module), cls)(config)
