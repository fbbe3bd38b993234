"""Metrics and progress: ``metrics.jsonl`` always (rank 0), TensorBoard when asked, tqdm bars."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from distributed_ft.runtime.context import RuntimeContext

T = TypeVar("T")
log = logging.getLogger("distributed_ft")


def setup_logging(context: RuntimeContext, verbose: bool = False) -> None:
    """Log lines to stderr: everything on rank 0, warnings only on other ranks."""
    level = logging.DEBUG if verbose else logging.INFO
    if not context.is_main:
        level = logging.WARNING
    prefix = f"[rank {context.rank}] " if context.world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


class MetricsLogger:
    """Appends one JSON object per event to ``metrics.jsonl`` (rank 0 only; other ranks are no-ops)."""

    def __init__(self, run_dir: Path, context: RuntimeContext, tensorboard: bool = False) -> None:
        self.enabled = context.is_main
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, event: str, step: int, **values: Any) -> None:
        """Write ``{"event": event, "step": step, "time": ..., **values}``."""
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar on rank 0 when progress is on; a plain pass-through elsewhere."""

    def __init__(self, enabled: bool, context: RuntimeContext) -> None:
        self.enabled = enabled and context.is_main

    def wrap(
        self, items: Iterable[T], total: int | None = None, desc: str = "", initial: int = 0
    ) -> Iterator[T]:
        """Iterate ``items`` with a bar (``initial`` positions it after a resume)."""
        if not self.enabled:
            yield from items
            return
        from tqdm.auto import tqdm

        with tqdm(items, total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True) as bar:
            self.bar = bar
            yield from bar

    def postfix(self, **values: Any) -> None:
        """Show values (loss, lr) on the active bar."""
        bar = getattr(self, "bar", None)
        if bar is not None:
            bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()})
