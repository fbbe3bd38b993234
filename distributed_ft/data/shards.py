"""Per-rank streaming over a prepared split: each rank reads only the rows it trains on.

The epoch plan is a pure function of ``(seed, epoch)``, the shards' row counts, the rank and the world
size, so every rank knows every rank's share without reading anything, and a resumed run finds its
place exactly:

1. The split is cut into blocks of :data:`BLOCK_ROWS` consecutive rows of a shard; the blocks are
   shuffled (a new order each epoch).
2. The shuffled blocks form one row stream; rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal,
   contiguous parts of it. Across ranks, an epoch reads the split exactly once.
3. A rank reads its part in windows of ``window_rows`` rows (a multiple of the batch size). Each window
   is shuffled and length-grouped into batches on its own, and the next window is read ahead by a
   thread, so memory per rank is about two windows however large the split is.

Ranks take the same number of batches (computed from the row counts), so collectives stay in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ft.data.sources import (
    MEGABATCH_FACTOR,
    Batch,
    Collate,
    PositionedSource,
    RowReader,
    length_grouped_order,
)

BLOCK_ROWS = 256
"""Rows of one shuffle unit: small enough to mix the split well, large enough to read efficiently."""

MIN_WINDOW_ROWS = 4096
"""A rank shuffles and length-groups at least this many rows at a time (its memory bound)."""


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of shard ``shard``."""

    shard: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class ShardReader(Protocol):
    """Random access to the shards of a prepared split: row counts up front, rows on request."""

    rows: Sequence[int]
    """Rows per shard, known without reading a shard."""

    def read(self, shard: int, ranges: Sequence[tuple[int, int]]) -> list[pa.Table]:
        """Row ranges ``[start, stop)`` of one shard, one table per range, in the order asked."""
        ...


class ParquetShards:
    """Shards as Parquet files: a range decodes only the row groups that hold it."""

    def __init__(self, paths: Sequence[Path], rows: Sequence[int] | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.rows = list(rows) if rows is not None else [pq.read_metadata(p).num_rows for p in self.paths]

    def read(self, shard: int, ranges: Sequence[tuple[int, int]]) -> list[pa.Table]:
        file = pq.ParquetFile(self.paths[shard], memory_map=True)
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        ends = np.cumsum(sizes)
        starts = ends - np.asarray(sizes)
        wanted = sorted({int(g) for lo, hi in ranges for g in np.flatnonzero((starts < hi) & (ends > lo))})
        table = file.read_row_groups(wanted)
        # where each wanted row group begins in the decoded table (a range spans consecutive groups)
        offsets = dict(zip(wanted, np.cumsum([0] + [sizes[g] for g in wanted[:-1]]).tolist(), strict=True))

        def at(row: int) -> int:
            group = int(np.searchsorted(ends, row, side="right"))
            return offsets[group] + row - int(starts[group])

        return [table.slice(at(lo), hi - lo) for lo, hi in ranges]


ShardLoader = Callable[[int], pa.Table]


class TableShards:
    """Shards already in memory, or fetched whole (e.g. from Ray's object store) by ``load(shard)``."""

    def __init__(self, rows: Sequence[int], load: ShardLoader) -> None:
        self.rows, self.load = list(rows), load

    def read(self, shard: int, ranges: Sequence[tuple[int, int]]) -> list[pa.Table]:
        table = self.load(shard)
        return [table.slice(lo, hi - lo) for lo, hi in ranges]


def read_pieces(reader: ShardReader, pieces: Sequence[Piece]) -> pa.Table:
    """The rows of ``pieces`` in order, as one table that owns its memory (no shard stays referenced)."""
    by_shard: dict[int, list[int]] = {}
    for index, piece in enumerate(pieces):
        by_shard.setdefault(piece.shard, []).append(index)
    parts: list[pa.Table | None] = [None] * len(pieces)
    for shard, indices in by_shard.items():
        tables = reader.read(shard, [(pieces[i].start, pieces[i].stop) for i in indices])
        for index, table in zip(indices, tables, strict=True):
            parts[index] = table
    return pa.concat_tables(parts).combine_chunks()  # type: ignore[arg-type]


def share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(first row, rows)`` of rank ``rank``'s contiguous part of a ``total``-row stream."""
    first = rank * total // world_size
    return first, (rank + 1) * total // world_size - first


def rank_pieces(
    rows: Sequence[int], seed: int, epoch: int, rank: int, world_size: int, block_rows: int = BLOCK_ROWS
) -> list[Piece]:
    """Rank ``rank``'s contiguous share of the epoch's shuffled block stream (steps 1-2 of the plan)."""
    blocks = [
        Piece(shard, start, min(start + block_rows, count))
        for shard, count in enumerate(rows)
        for start in range(0, count, block_rows)
    ]
    shuffled = [blocks[i] for i in np.random.default_rng([seed, epoch]).permutation(len(blocks))]
    first, size = share(sum(rows), rank, world_size)
    return take_rows(shuffled, first, first + size)


def take_rows(pieces: Sequence[Piece], start: int, stop: int) -> list[Piece]:
    """Rows ``[start, stop)`` of the row stream that ``pieces`` form, as pieces."""
    out, offset = [], 0
    for piece in pieces:
        lo, hi = max(start, offset), min(stop, offset + piece.rows)
        if lo < hi:
            out.append(Piece(piece.shard, piece.start + lo - offset, piece.start + hi - offset))
        offset += piece.rows
        if offset >= stop:
            break
    return out


class ShardedBatchSource(PositionedSource):
    """Training batches of one rank, streamed from the shards it reads (see the module docstring).

    Args:
        reader: The split's shards.
        collate: Turns a list of rows into a batch of tensors (dynamic padding).
        batch_size: Examples per batch on this rank.
        group_by_length: Batch examples of similar length together (needs a ``length`` column).
        seed: With the epoch, fixes the plan.
        rank, world_size: This rank's place among the ranks that share the split.
        window_rows: Rows shuffled and grouped together (rounded up to whole batches); default
            ``max(50 x batch_size, 4096)``.
        prefetch: Batches a background thread keeps collated ahead of the consumer (0: none).
        pin_memory: Pin prefetched batches (set it when the consumer copies them to a GPU).
    """

    def __init__(
        self,
        reader: ShardReader,
        collate: Collate,
        batch_size: int,
        *,
        group_by_length: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        window_rows: int | None = None,
        prefetch: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.reader, self.collate, self.batch_size = reader, collate, batch_size
        self.group_by_length, self.seed = group_by_length, seed
        self.rank, self.world_size = rank, world_size
        window = window_rows or max(MEGABATCH_FACTOR * batch_size, MIN_WINDOW_ROWS)
        self.window_batches = math.ceil(window / batch_size)
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.epoch, self.position = 0, 0
        self.rows_read = 0
        """Rows this source has read from the shards (all epochs): one share of the split per epoch."""
        total = sum(reader.rows)
        # every rank knows every rank's share; all take as many batches as the smallest share fills
        shares = [share(total, r, world_size)[1] for r in range(world_size)]
        self.batches_per_epoch = math.ceil(min(shares) / batch_size)
        kept = [min(rows, self.batches_per_epoch * batch_size) for rows in shares]
        self.rows_per_epoch = kept[rank]
        self.dropped_examples = total - sum(kept)
        """Examples left out of each epoch so that every rank takes the same number of batches."""

    def describe(self) -> str:
        """One line for the log: this rank's share and what was left out."""
        line = (
            f"rank {self.rank} reads {self.rows_per_epoch:,} of {sum(self.reader.rows):,} rows per epoch "
            f"({self.batches_per_epoch:,} batches, shuffled in windows of {self.window_batches:,} batches)"
        )
        if self.dropped_examples:
            line += f"; {self.dropped_examples:,} examples per epoch left out so all ranks take equal batches"
        return line

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _windows(self) -> list[list[Piece]]:
        """The rank's pieces of the current epoch, cut into windows of whole batches."""
        pieces = rank_pieces(self.reader.rows, self.seed, self.epoch, self.rank, self.world_size)
        step, end = self.window_batches * self.batch_size, self.rows_per_epoch
        return [take_rows(pieces, start, min(start + step, end)) for start in range(0, end, step)]

    def _load(self, pieces: list[Piece]) -> pa.Table:
        # hand the windows already consumed back to the OS: Arrow's allocator keeps freed pages, and a
        # rank's memory would creep up with the number of windows (measured: +15% at 16x the rows)
        pa.default_memory_pool().release_unused()
        table = read_pieces(self.reader, pieces)
        self.rows_read += table.num_rows
        return table

    def _window_batches(self, table: pa.Table, window: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, window])
        if self.group_by_length and "length" in table.column_names:
            return length_grouped_order(table.column("length").to_numpy(), self.batch_size, rng)
        order = rng.permutation(table.num_rows)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _collated(self, start: int) -> Iterator[Batch]:
        windows = self._windows()
        first = start // self.window_batches
        if first >= len(windows):
            return
        with ThreadPoolExecutor(1, thread_name_prefix="dft-read-ahead") as pool:
            ahead: Future[pa.Table] | None = pool.submit(self._load, windows[first])
            for index in range(first, len(windows)):
                assert ahead is not None
                table = ahead.result()
                ahead = pool.submit(self._load, windows[index + 1]) if index + 1 < len(windows) else None
                rows, batches = RowReader(table), self._window_batches(table, index)
                skip = start - index * self.window_batches if index == first else 0
                for indices in batches[skip:]:
                    yield self.collate([rows.row(int(i)) for i in indices])

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
