"""Encode a preparation's splits chunk by chunk, in worker processes when there are several.

Each chunk (``shard_rows`` rows of a split) is encoded by the task's chunk encoder in a worker process and
written as one Parquet shard; the results come back in chunk order, so the shards are the same as those of a
one-process preparation. Workers start with ``forkserver`` (``spawn`` where it is missing): forking this
process, which already runs threads, is unsafe.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from distributed_ft.data.prepare import ChunkEncoder, Preparation, SplitStats

log = logging.getLogger("distributed_ft")

ROW_GROUP_ROWS = 1024
"""Rows per Parquet row group: a reader of a few rows decodes only the groups that hold them."""
MAX_AUTO_PROC = 8
"""``data.num_proc=null`` uses at most this many worker processes."""
AUTO_MIN_ROWS = 100_000
"""``data.num_proc=null`` encodes fewer rows in this process: one process takes ~10 s for them (CoNLL
sentences), and starting workers costs ~3 s (they import torch and transformers), so 2 workers broke even
near here in ``benchmarks/data_scale.py`` (0.87x at 56k sentences, 1.22x at 225k, on 2 cores)."""


def shard_name(split: str, index: int) -> str:
    """``train-00003.parquet``: the file of a split's shard."""
    return f"{split}-{index:05d}.parquet"


def write_shard(table: pa.Table, path: Path) -> None:
    """Write one shard with row groups of :data:`ROW_GROUP_ROWS` rows."""
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


@dataclass(frozen=True)
class _Chunk:
    """Rows ``[first, first + len(rows))`` of a split and where its shard goes.

    ``staging`` ``None``: the encoded rows go back to the preparing process instead (a ``finish`` step).
    """

    split: str
    index: int
    first: int
    rows: pa.Table
    staging: str | None


@dataclass
class Encoded:
    """What encoding a chunk gave: its shard (name and rows) and counts, or the rows themselves."""

    shard: str | None
    rows: int
    stats: SplitStats
    table: pa.Table | None = None


_WORKER_ENCODERS: dict[str, ChunkEncoder] = {}
"""The chunk encoders of the preparation a worker process serves, by split (set by :func:`_start_worker`)."""


def _start_worker(encoders: bytes) -> None:
    """Worker initializer: no tokenizer threads (the workers already use every core), then the encoders."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODERS.update(pickle.loads(encoders))


def _encode_chunk(chunk: _Chunk, encoders: dict[str, ChunkEncoder] | None = None) -> Encoded:
    """Encode one chunk and write its shard (or return its rows); runs in a worker or in-process."""
    table, stats = (encoders or _WORKER_ENCODERS)[chunk.split](chunk.rows, first=chunk.first)
    if chunk.staging is None:
        return Encoded(None, table.num_rows, stats, table)
    name = shard_name(chunk.split, chunk.index)
    write_shard(table, Path(chunk.staging) / name)
    return Encoded(name, table.num_rows, stats)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(num_proc: int | None, rows: int, chunks: int, shard_rows: int) -> int:
    """Worker processes for ``chunks`` chunks of ``rows`` rows; never more than the chunks.

    ``num_proc=None`` (auto): the usable cores up to :data:`MAX_AUTO_PROC`, but 1 below
    :data:`AUTO_MIN_ROWS` or ``2 x shard_rows`` rows (starting a worker costs seconds).
    """
    if num_proc is None:
        small = rows < max(AUTO_MIN_ROWS, 2 * shard_rows)
        num_proc = 1 if small else min(usable_cores(), MAX_AUTO_PROC)
    return max(1, min(num_proc, chunks))


def _chunks(plan: Preparation, staging: Path, shard_rows: int) -> list[_Chunk]:
    """Every split cut into chunks of ``shard_rows`` rows (an empty split is one empty chunk)."""
    return [
        _Chunk(
            split.name,
            index,
            first,
            split.table.slice(first, shard_rows),
            None if split.finish else str(staging),
        )
        for split in plan.splits
        for index, first in enumerate(range(0, max(split.table.num_rows, 1), shard_rows))
    ]


def _start_method() -> multiprocessing.context.BaseContext:
    """``forkserver`` (workers fork from a clean server, not from this threaded process), else ``spawn``."""
    return multiprocessing.get_context(
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    )


def encode_plan(
    plan: Preparation,
    staging: Path,
    shard_rows: int,
    num_proc: int | None,
    progress: Callable[..., Iterable[Any]] | None,
) -> dict[str, list[Encoded]]:
    """Encode every chunk of ``plan`` (in worker processes when there are several).

    Returns:
        The encoded chunks by split, in chunk order.
    """
    chunks = _chunks(plan, staging, shard_rows)
    rows = sum(split.table.num_rows for split in plan.splits)
    workers = worker_count(num_proc, rows, len(chunks), shard_rows)
    if multiprocessing.current_process().daemon:  # a daemonic process may not start children
        workers = 1
    log.info("encoding %d rows in %d chunks on %d process(es)", rows, len(chunks), workers)
    encoders = {split.name: split.encode for split in plan.splits}
    wrap = progress or (lambda items, **_: items)
    results: dict[str, list[Encoded]] = {split.name: [] for split in plan.splits}
    done = wrap(_run(chunks, encoders, workers), total=len(chunks), desc="prepare")
    for chunk, encoded in zip(chunks, done, strict=True):
        results[chunk.split].append(encoded)
    return results


def _run(chunks: list[_Chunk], encoders: dict[str, ChunkEncoder], workers: int) -> Iterator[Encoded]:
    """The encoded chunks in order, from a process pool when ``workers > 1``.

    Workers that cannot start or die (e.g. a script without an ``if __name__ == "__main__":`` guard: the
    workers import the main module) leave the remaining chunks to this process, with a warning.
    """
    done = 0
    if workers > 1:
        try:
            for encoded in _pooled(chunks, encoders, workers):
                done += 1
                yield encoded
        except (BrokenProcessPool, BrokenPipeError) as exc:
            log.warning(
                "data.num_proc: the worker processes failed (%s); encoding the remaining %d chunks in this "
                'process. A script that prepares data needs an `if __name__ == "__main__":` guard (the '
                "workers import the main module)",
                exc or type(exc).__name__,
                len(chunks) - done,
            )
    for chunk in chunks[done:]:
        yield _encode_chunk(chunk, encoders)


def _pooled(chunks: list[_Chunk], encoders: dict[str, ChunkEncoder], workers: int) -> Iterator[Encoded]:
    """The encoded chunks in order from ``workers`` processes (the encoders are pickled once per worker)."""
    context = _start_method()
    if context.get_start_method() == "forkserver":  # the server imports the encoders' modules once
        modules = {getattr(e, "func", e).__module__ for e in encoders.values()}
        context.set_forkserver_preload(sorted(modules | {__name__}))
    payload = pickle.dumps(encoders)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(payload,))
    with pool:
        futures = [pool.submit(_encode_chunk, replace(chunk, rows=_owning(chunk.rows))) for chunk in chunks]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _owning(table: pa.Table) -> pa.Table:
    """A copy of a slice that owns its rows: a pickled slice would carry all of its parent's buffers."""
    return table.take(np.arange(table.num_rows))
