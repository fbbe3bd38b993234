"""Per-rank streaming over a prepared split: each rank reads only the rows it trains on.

The epoch plan is a pure function of ``(seed, epoch)``, the shards' row counts and the number of
**lanes** (micro-batches in one optimizer step: ``world_size x grad_accum``), never of the world size on
its own. So every rank knows every rank's share without reading anything, a resumed run finds its place
exactly, and a run resumed on another number of ranks (grad_accum adapted, the lanes kept) continues the
same sample order:

1. The split is cut into blocks of :data:`BLOCK_ROWS` consecutive rows of a shard; the blocks are
   shuffled (a new order each epoch).
2. The shuffled blocks form one row stream; lane ``l`` of ``K`` takes the ``l``-th of ``K`` equal,
   contiguous parts of it. Across lanes, an epoch reads the split exactly once.
3. A lane is read in windows of ``window_rows`` rows (a multiple of the batch size). Each window is
   shuffled and length-grouped into batches on its own, and the next window is read ahead by a thread,
   so memory per lane is about two windows however large the split is.
4. Optimizer step ``s`` of an epoch takes batch ``s`` of every lane; rank ``r`` of ``W`` reads lanes
   ``r x K/W ... (r + 1) x K/W - 1`` and hands their batch ``s`` to the loop in that order (its
   accumulation window). Which rank computes which lane does not change the step's gradient.

Lanes take the same number of batches (computed from the row counts), so collectives stay in step and
every step holds ``K`` micro-batches.
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


def lane_pieces(
    rows: Sequence[int], seed: int, epoch: int, lane: int, lanes: int, block_rows: int = BLOCK_ROWS
) -> list[Piece]:
    """Lane ``lane``'s contiguous share of the epoch's shuffled block stream (steps 1-2 of the plan)."""
    blocks = [
        Piece(shard, start, min(start + block_rows, count))
        for shard, count in enumerate(rows)
        for start in range(0, count, block_rows)
    ]
    shuffled = [blocks[i] for i in np.random.default_rng([seed, epoch]).permutation(len(blocks))]
    first, size = share(sum(rows), lane, lanes)
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


class LayoutError(ValueError):
    """A data position that the current ranks and ``grad_accum`` cannot continue."""


class ShardedBatchSource(PositionedSource):
    """Training batches of one rank, streamed from the lanes it reads (see the module docstring).

    Args:
        reader: The split's shards.
        collate: Turns a list of rows into a batch of tensors (dynamic padding).
        batch_size: Examples per batch (one micro-batch of one lane).
        group_by_length: Batch examples of similar length together (needs a ``length`` column).
        seed: With the epoch, fixes the plan.
        rank, world_size: This rank's place among the ranks that share the split.
        grad_accum: Micro-batches this rank takes per optimizer step (its lanes); the plan has
            ``world_size x grad_accum`` lanes.
        window_rows: Rows of a lane shuffled and grouped together (rounded up to whole batches); default
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
        grad_accum: int = 1,
        window_rows: int | None = None,
        prefetch: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.reader, self.collate, self.batch_size = reader, collate, batch_size
        self.group_by_length, self.seed = group_by_length, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.lanes = world_size * grad_accum
        self.own_lanes = list(range(rank * grad_accum, (rank + 1) * grad_accum))
        window = window_rows or max(MEGABATCH_FACTOR * batch_size, MIN_WINDOW_ROWS)
        self.window_batches = math.ceil(window / batch_size)
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.epoch, self.position = 0, 0
        self.rows_read = 0
        """Rows this source has read from the shards (all epochs): its lanes' share of the split per epoch."""
        total = sum(reader.rows)
        # every lane's size is known up front; all take as many batches as the smallest lane fills
        sizes = [share(total, lane, self.lanes)[1] for lane in range(self.lanes)]
        self.steps_per_epoch = math.ceil(min(sizes) / batch_size)
        self.kept = [min(rows, self.steps_per_epoch * batch_size) for rows in sizes]
        self.rows_per_epoch = sum(self.kept[lane] for lane in self.own_lanes)
        self.dropped_examples = total - sum(self.kept)
        """Examples left out of each epoch so that every lane takes the same number of batches."""

    def describe(self) -> str:
        """One line for the log: this rank's share and what was left out."""
        lanes = (
            f"lane {self.own_lanes[0]}"
            if self.grad_accum == 1
            else (f"lanes {self.own_lanes[0]}-{self.own_lanes[-1]}")
        )
        line = (
            f"rank {self.rank} reads {lanes} of {self.lanes} ({self.rows_per_epoch:,} of "
            f"{sum(self.reader.rows):,} rows per epoch, {self.steps_per_epoch:,} steps, shuffled in windows "
            f"of {self.window_batches:,} batches)"
        )
        if self.dropped_examples:
            line += f"; {self.dropped_examples:,} examples per epoch left out so all lanes take equal batches"
        return line

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return self.steps_per_epoch * self.grad_accum

    def _lane_windows(self, lane: int) -> list[list[Piece]]:
        """The lane's pieces of the current epoch, cut into windows of whole batches."""
        pieces = lane_pieces(self.reader.rows, self.seed, self.epoch, lane, self.lanes)
        step, end = self.window_batches * self.batch_size, self.kept[lane]
        return [take_rows(pieces, start, min(start + step, end)) for start in range(0, end, step)]

    def _load(self, pieces: list[Piece]) -> pa.Table:
        # hand the windows already consumed back to the OS: Arrow's allocator keeps freed pages, and a
        # rank's memory would creep up with the number of windows (measured: +15% at 16x the rows)
        pa.default_memory_pool().release_unused()
        table = read_pieces(self.reader, pieces)
        self.rows_read += table.num_rows
        return table

    def _window_batches(self, table: pa.Table, lane: int, window: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, lane, window])
        if self.group_by_length and "length" in table.column_names:
            return length_grouped_order(table.column("length").to_numpy(), self.batch_size, rng)
        order = rng.permutation(table.num_rows)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _lane(self, lane: int, start: int) -> Iterator[Batch]:
        """The collated batches of one lane from its batch ``start`` on, the next window read ahead."""
        windows = self._lane_windows(lane)
        first = start // self.window_batches
        if first >= len(windows):
            return
        with ThreadPoolExecutor(1, thread_name_prefix=f"dft-read-lane{lane}") as pool:
            ahead: Future[pa.Table] | None = pool.submit(self._load, windows[first])
            for index in range(first, len(windows)):
                assert ahead is not None
                table = ahead.result()
                ahead = pool.submit(self._load, windows[index + 1]) if index + 1 < len(windows) else None
                rows, batches = RowReader(table), self._window_batches(table, lane, index)
                skip = start - index * self.window_batches if index == first else 0
                for indices in batches[skip:]:
                    yield self.collate([rows.row(int(i)) for i in indices])

    def _collated(self, start: int) -> Iterator[Batch]:
        if start % self.grad_accum:
            raise LayoutError(f"position {start} is inside an accumulation window of {self.grad_accum}")
        step = start // self.grad_accum
        lanes = [self._lane(lane, step) for lane in self.own_lanes]
        try:
            for _ in range(step, self.steps_per_epoch):
                for lane in lanes:
                    yield next(lane)
        finally:
            for lane in lanes:
                lane.close()

    def state_dict(self) -> dict[str, int]:
        """Epoch, this rank's batches handed out, and the layout-free position: steps of ``lanes``."""
        steps = self.position // self.grad_accum
        samples = sum(min(steps * self.batch_size, kept) for kept in self.kept)
        return {
            "epoch": self.epoch,
            "position": self.position,
            "steps": steps,
            "lanes": self.lanes,
            "samples": samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at a saved position, whichever ranks saved it, as long as the lanes are the same.

        Raises:
            LayoutError: The state was written with another number of lanes (global batch).
        """
        self.epoch = state["epoch"]
        if "steps" not in state:  # a state written before lanes existed: the same layout resumes
            self.position = state["position"]
            return
        if state["lanes"] != self.lanes:
            raise LayoutError(
                f"the data position was saved with {state['lanes']} micro-batches per step; this run has "
                f"{self.world_size} ranks x grad_accum {self.grad_accum} = {self.lanes}"
            )
        self.position = state["steps"] * self.grad_accum
