"""Metrics and progress: ``metrics.jsonl`` always (rank 0), TensorBoard / MLflow by ``track.*``, tqdm bars."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from distributed_ft.errors import Preempted
from distributed_ft.runtime.context import RuntimeContext

if TYPE_CHECKING:
    from distributed_ft.config.schema import JobConfig
    from distributed_ft.runtime.trackers import Tracker

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
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
    """Appends one JSON object per event to ``metrics.jsonl`` and mirrors its numbers to the trackers.

    Rank 0 only (other ranks are no-ops). ``metrics.jsonl`` is the record; the trackers
    (:mod:`distributed_ft.runtime.trackers`: TensorBoard, MLflow, by ``track.*``) get each event's numeric
    values keyed ``event/key`` (``event/split/key`` for events of a split: ``eval/validation/f1``). A tracker
    that fails mid-run is dropped with a warning; training and the JSONL go on.
    """

    def __init__(
        self,
        run_dir: Path,
        context: RuntimeContext,
        config: JobConfig | None = None,
        trackers: list[Tracker] | None = None,
    ) -> None:
        self.enabled = context.is_main
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[Tracker] = []
        self.closed = False
        if self.enabled:
            if trackers is not None:
                self.trackers = list(trackers)
            elif config is not None:
                from distributed_ft.runtime.trackers import open_trackers

                self.trackers = open_trackers(run_dir, config)
        opened = _OPEN_LOGGERS.get()
        if opened is not None:
            opened.append(self)

    def log(self, event: str, step: int, **values: Any) -> None:
        """Write ``{"event": event, "step": step, "time": ..., **values}``."""
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        if self.trackers:
            scalars = tracker_scalars(event, values)
            self._each("log", lambda tracker: tracker.log(scalars, step, record["time"]))

    def log_artifacts(self, *paths: Path) -> None:
        """Hand directories (``export/``, ``report/``) to the trackers that keep files (MLflow)."""
        for path in paths:
            if self.enabled and path.exists():
                self._each("log_artifacts", lambda tracker, path=path: tracker.log_artifacts(path))

    def close(self, status: str = "FINISHED") -> None:
        """End the trackers' runs (``FINISHED``, ``FAILED`` or ``KILLED``); a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        self._each("close", lambda tracker: tracker.close(status))

    def _each(self, what: str, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # a tracker never stops training; metrics.jsonl keeps the record
                log.warning(
                    "%s: %s failed (%s); it is off for the rest of the run", type(tracker).__name__, what, exc
                )
                self.trackers.remove(tracker)


def tracker_scalars(event: str, values: dict[str, Any]) -> dict[str, float]:
    """The numbers of an event, keyed ``event/key`` or, for an event of a split, ``event/split/key``."""
    split = values.get("split")
    prefix = f"{event}/{split}" if isinstance(split, str) else event
    return {
        f"{prefix}/{key}": float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


_OPEN_LOGGERS: ContextVar[list[MetricsLogger] | None] = ContextVar("open_metrics_loggers", default=None)


def ends_trackers(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function that opens a :class:`MetricsLogger`: an exception ends its trackers' runs.

    ``FAILED`` for an error, ``KILLED`` for a pre-emption (the run resumes later); a logger the function
    closed itself (``FINISHED``) is left alone.
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        opened: list[MetricsLogger] = []
        token = _OPEN_LOGGERS.set(opened)
        try:
            return function(*args, **kwargs)
        except BaseException as exc:
            for logger in opened:
                logger.close("KILLED" if isinstance(exc, Preempted | KeyboardInterrupt) else "FAILED")
            raise
        finally:
            _OPEN_LOGGERS.reset(token)

    return wrapper


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
