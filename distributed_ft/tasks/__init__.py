"""Tasks: one module per task with its encoding, collation, loss, metrics and decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributed_ft.errors import ConfigError

if TYPE_CHECKING:
    from distributed_ft.config.schema import JobConfig
    from distributed_ft.tasks.base import Task


def get_task(config: JobConfig) -> Task:
    """The task object ``config.task`` names."""
    if config.task == "token_classification":
        from distributed_ft.tasks.token_classification import TokenClassificationTask

        return TokenClassificationTask(config)
    raise ConfigError(f"task {config.task!r} is not implemented yet; available: token_classification")
