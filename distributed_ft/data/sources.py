"""Batch sources: per-rank, resumable iteration over a prepared Arrow table.

The batch order of an epoch is a pure function of ``(seed, epoch)``, so resuming at batch ``k`` of an
epoch is exact: skip ``k`` batches of the same order (no data is re-read or re-trained). Each rank takes
a disjoint, deterministic subset of the batches.

Batches are collated (and pinned, for a CUDA consumer) by a background thread that keeps ``prefetch``
batches ready. The position counts batches *handed to the consumer*, not batches prepared: a checkpoint
taken while two batches wait in the queue resumes at the first of them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

Batch = dict[str, Any]
Collate = Callable[[list[dict[str, Any]]], Batch]

MEGABATCH_FACTOR = 50
"""Length grouping sorts windows of ``50 x batch_size`` shuffled examples, keeping batches random."""


class RowReader:
    """Fast row access to an Arrow table: list columns are kept as flat numpy values + offsets."""

    def __init__(self, table: pa.Table) -> None:
        self.num_rows = table.num_rows
        self._lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._scalars: dict[str, np.ndarray] = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                offsets = column.offsets.to_numpy()
                values = column.values.to_numpy(zero_copy_only=False)
                self._lists[name] = (values, offsets - offsets[0])
            else:
                self._scalars[name] = column.to_numpy(zero_copy_only=False)

    def row(self, index: int) -> dict[str, Any]:
        """One example as ``{column: numpy array or scalar}``."""
        out: dict[str, Any] = {name: values[index] for name, values in self._scalars.items()}
        for name, (values, offsets) in self._lists.items():
            out[name] = values[offsets[index] : offsets[index + 1]]
        return out


def pad_sequences(sequences: list[np.ndarray], value: int) -> torch.Tensor:
    """Right-pad 1-D integer sequences to the longest one (dynamic padding) as an int64 tensor."""
    width = max(len(s) for s in sequences)
    out = np.full((len(sequences), width), value, dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return torch.from_numpy(out)


_DONE = object()


def pin_batch(batch: Batch) -> Batch:
    """Page-locked copies of a batch's tensors, so host-to-GPU copies run asynchronously."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def prefetch(items: Iterable[Batch], depth: int, pin: bool = False) -> Iterator[Batch]:
    """Iterate ``items`` with a background thread keeping up to ``depth`` of them ready (in order).

    An exception in the producer is re-raised in the consumer; closing the iterator early (``break``)
    stops the producer. ``depth=0`` iterates in the calling thread.
    """
    if depth <= 0:
        for item in items:
            yield pin_batch(item) if pin else item
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                item = pin_batch(item) if pin else item
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put(exc)

    worker = threading.Thread(target=produce, name="dft-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def length_grouped_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar length in random order: shuffle, sort within mega-batches, shuffle batches."""
    order = rng.permutation(len(lengths))
    window = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class PositionedSource:
    """Hands out an epoch's batches from ``_collated(start)``, prefetched, counting those handed out.

    The base of the loop's batch sources (``ArrowBatchSource`` here, ``data/shards.ShardedBatchSource``):
    each adds ``set_epoch``, ``__len__`` and ``load_state_dict``.
    """

    epoch: int
    position: int
    prefetch: int
    pin_memory: bool

    def _collated(self, start: int) -> Iterator[Batch]:
        """The collated batches of the current epoch from batch ``start`` on."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        """The remaining batches of this epoch; ``position`` advances as each one is handed out."""
        ready = prefetch(self._collated(self.position), self.prefetch, self.pin_memory)
        try:
            for batch in ready:
                self.position += 1
                yield batch
        finally:
            ready.close()

    def state_dict(self) -> dict[str, int]:
        """Epoch and number of batches of it already handed out."""
        return {"epoch": self.epoch, "position": self.position}


class ArrowBatchSource(PositionedSource):
    """Batches of a prepared split for one rank.

    Args:
        table: The prepared split (must have a ``length`` column when grouping or sorting by length).
        collate: Turns a list of rows into a batch of tensors (dynamic padding).
        batch_size: Examples per batch on this rank.
        shuffle: Training order (a new permutation per epoch) instead of evaluation order.
        group_by_length: With ``shuffle``, batch examples of similar length together.
        sort_by_length: Without ``shuffle``, batch in length order (fast evaluation; order restored later).
        rank, world_size: This rank takes batches ``rank, rank + world_size, ...``.
        even_batches: Drop the last ``< world_size`` batches so every rank steps equally (training).
        prefetch: Batches a background thread keeps collated ahead of the consumer (0: none).
        pin_memory: Pin prefetched batches (set it when the consumer copies them to a GPU).
    """

    def __init__(
        self,
        table: pa.Table,
        collate: Collate,
        batch_size: int,
        *,
        shuffle: bool,
        group_by_length: bool = True,
        sort_by_length: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_batches: bool = True,
        prefetch: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.rows = RowReader(table)
        self.lengths = (
            np.asarray(table.column("length").to_numpy()) if "length" in table.column_names else None
        )
        self.collate, self.batch_size = collate, batch_size
        self.shuffle, self.group_by_length, self.sort_by_length = shuffle, group_by_length, sort_by_length
        self.seed, self.rank, self.world_size, self.even_batches = seed, rank, world_size, even_batches
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.epoch, self.position = 0, 0
        self._plan: list[np.ndarray] | None = None

    def _epoch_batches(self) -> list[np.ndarray]:
        n = self.rows.num_rows
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            if self.group_by_length and self.lengths is not None:
                batches = length_grouped_order(self.lengths, self.batch_size, rng)
            else:
                order = rng.permutation(n)
                batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        else:
            order = np.arange(n)
            if self.sort_by_length and self.lengths is not None:
                order = np.argsort(-self.lengths, kind="stable")
            batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.even_batches:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches[self.rank :: self.world_size]

    def _batches(self) -> list[np.ndarray]:
        if self._plan is None:
            self._plan = self._epoch_batches()
        return self._plan

    @property
    def dropped_examples(self) -> int:
        """Examples left out of this epoch so that all ranks take the same number of batches."""
        if not self.even_batches or self.world_size == 1:
            return 0
        total = sum(len(b) for b in self._batches()) * self.world_size
        return max(0, self.rows.num_rows - total)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position, self._plan = epoch, 0, None

    def __len__(self) -> int:
        return len(self._batches())

    def _collated(self, start: int) -> Iterator[Batch]:
        for indices in self._batches()[start:]:
            yield self.collate([self.rows.row(int(i)) for i in indices])

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._plan = state["epoch"], state["position"], None
