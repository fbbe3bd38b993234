"""Per-rank streaming of a prepared split: disjoint shares, bounded reads, exact resume."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_ft.data.shards import ParquetShards, ShardedBatchSource, TableShards, lane_pieces


def _table(first: int, rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + first)
    lengths = rng.integers(1, 40, rows)
    return pa.table(
        {
            "example_id": np.arange(first, first + rows),
            "input_ids": [list(range(n)) for n in lengths],
            "length": lengths,
        }
    )


def _collate(rows: list[dict]) -> dict:
    return {"ids": [int(r["example_id"]) for r in rows], "lengths": [int(r["length"]) for r in rows]}


@pytest.fixture
def shard_files(tmp_path):
    """Five Parquet shards of uneven sizes, 300-row groups: 3,437 rows in all."""
    sizes, paths, first = [1000, 1000, 700, 512, 225], [], 0
    for index, rows in enumerate(sizes):
        path = tmp_path / f"train-{index:05d}.parquet"
        pq.write_table(_table(first, rows), path, row_group_size=300)
        paths.append(path)
        first += rows
    return paths


def _epoch(source: ShardedBatchSource) -> list[list[int]]:
    return [batch["ids"] for batch in source]


def test_lane_pieces_cover_the_stream_once_in_equal_shares():
    rows = [1000, 1000, 700, 512, 225]
    shares = [lane_pieces(rows, seed=3, epoch=1, lane=r, lanes=3) for r in range(3)]
    covered = [(p.shard, i) for pieces in shares for p in pieces for i in range(p.start, p.stop)]
    assert len(covered) == len(set(covered)) == sum(rows)
    sizes = [sum(p.rows for p in pieces) for pieces in shares]
    assert max(sizes) - min(sizes) <= 1
    assert lane_pieces(rows, 3, 2, 0, 3) != shares[0]  # a new block order each epoch


def test_parquet_ranges_cross_row_groups(shard_files):
    reader = ParquetShards(shard_files)
    assert reader.rows == [1000, 1000, 700, 512, 225]
    whole = pq.read_table(shard_files[0])
    ranges = [(650, 910), (0, 10), (299, 301)]
    for (lo, hi), part in zip(ranges, reader.read(0, ranges), strict=True):
        assert part.column("example_id").to_pylist() == whole.column("example_id").to_pylist()[lo:hi]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_epoch_reads_one_copy_across_ranks(shard_files, world_size):
    sources = [
        ShardedBatchSource(ParquetShards(shard_files), _collate, 16, seed=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        seen = []
        for source in sources:
            source.set_epoch(epoch)
            batches = _epoch(source)
            assert len(batches) == len(source) == len(sources[0])  # ranks step together
            seen.extend(i for batch in batches for i in batch)
        assert len(seen) == len(set(seen)) == 3437 - sources[0].dropped_examples
        assert sources[0].dropped_examples < world_size * 16
    # reads counted by the sources: one copy of the kept rows per epoch, not one per rank
    assert sum(s.rows_read for s in sources) == 2 * (3437 - sources[0].dropped_examples)


def test_memory_is_bounded_by_the_window(shard_files, monkeypatch):
    import distributed_ft.data.shards as shards

    loaded = []
    real = shards.read_pieces
    monkeypatch.setattr(shards, "read_pieces", lambda r, p: loaded.append(real(r, p).num_rows) or real(r, p))
    source = ShardedBatchSource(ParquetShards(shard_files), _collate, 10, window_rows=500)
    batches = _epoch(source)
    assert max(loaded) <= 500 and len(loaded) == 7
    assert sum(len(b) < 10 for b in batches) == 1  # windows hold whole batches: one partial batch at most


def test_resume_mid_epoch_is_exact_and_skips_earlier_windows(shard_files):
    def source() -> ShardedBatchSource:
        return ShardedBatchSource(
            ParquetShards(shard_files), _collate, 8, seed=1, rank=1, world_size=2, window_rows=400
        )

    whole = source()
    whole.set_epoch(2)
    expected = _epoch(whole)
    first = source()
    first.set_epoch(2)
    taken = []
    for batch in first:
        taken.append(batch["ids"])
        if len(taken) == 117:  # inside the third window (50 batches each)
            break
    resumed = source()
    resumed.load_state_dict(first.state_dict())
    assert taken + _epoch(resumed) == expected
    assert resumed.rows_read == whole.rows_read - 2 * 400  # the two finished windows are not read again


def test_same_batches_from_memory_and_from_files(shard_files):
    tables = [pq.read_table(p) for p in shard_files]
    in_memory = TableShards([t.num_rows for t in tables], tables.__getitem__)
    kwargs = {"seed": 9, "rank": 0, "world_size": 2}
    assert _epoch(ShardedBatchSource(in_memory, _collate, 12, **kwargs)) == _epoch(
        ShardedBatchSource(ParquetShards(shard_files), _collate, 12, **kwargs)
    )


def test_length_grouping_groups_similar_lengths(shard_files):
    grouped = ShardedBatchSource(ParquetShards(shard_files), _collate, 16, group_by_length=True)
    mixed = ShardedBatchSource(ParquetShards(shard_files), _collate, 16, group_by_length=False)

    def spread(source: ShardedBatchSource) -> float:
        return float(np.mean([np.ptp(b["lengths"]) for b in source]))

    assert spread(grouped) < spread(mixed) / 3


def _steps(sources: list[ShardedBatchSource], stop: int | None = None) -> list[list[list[int]]]:
    """Each optimizer step as the sorted micro-batches every rank takes (a rank's ``grad_accum`` in a row)."""
    first = sources[0]
    iterators = [iter(s) for s in sources]
    steps = []
    for _ in range(first.steps_per_epoch - first.position // first.grad_accum):
        if stop is not None and len(steps) == stop:
            break
        step = [next(it)["ids"] for it in iterators for _ in range(sources[0].grad_accum)]
        steps.append(sorted(step))
    for it in iterators:
        it.close()
    return steps


def _ranks(shard_files, world_size: int, grad_accum: int) -> list[ShardedBatchSource]:
    return [
        ShardedBatchSource(
            ParquetShards(shard_files),
            _collate,
            8,
            seed=4,
            rank=r,
            world_size=world_size,
            grad_accum=grad_accum,
            window_rows=400,
        )
        for r in range(world_size)
    ]


@pytest.mark.parametrize(("world_size", "grad_accum"), [(1, 4), (2, 2), (4, 1)])
def test_steps_do_not_depend_on_the_world_size(shard_files, world_size, grad_accum):
    """4 lanes: every layout of them trains the same micro-batches in every step."""
    expected = _steps(_ranks(shard_files, 4, 1))
    sources = _ranks(shard_files, world_size, grad_accum)
    assert _steps(sources) == expected
    assert sum(s.rows_read for s in sources) == 3437 - sources[0].dropped_examples  # one copy in all


@pytest.mark.parametrize(("before", "after"), [((2, 1), (1, 2)), ((1, 2), (2, 1)), ((2, 2), (4, 1))])
def test_a_resize_continues_the_global_order(shard_files, before, after):
    """Resume at step 37 on another world size: no sample twice, none skipped, the same steps."""
    whole = _steps(_ranks(shard_files, *before))
    first = _ranks(shard_files, *before)
    taken = _steps(first, stop=37)
    states = [s.state_dict() for s in first]
    assert len({(s["steps"], s["lanes"], s["samples"]) for s in states}) == 1  # the ranks agree
    assert states[0]["samples"] == 37 * 8 * before[0] * before[1]
    resumed = _ranks(shard_files, *after)
    for source in resumed:
        source.load_state_dict(states[0])  # rank 0's position, whichever rank reads it
    rest = _steps(resumed)
    assert taken + rest == whole
    ids = [i for step in taken + rest for batch in step for i in batch]
    assert len(ids) == len(set(ids)) == 3437 - first[0].dropped_examples


def test_a_position_of_another_global_batch_is_refused(shard_files):
    from distributed_ft.data.shards import LayoutError

    source = _ranks(shard_files, 2, 1)[0]
    with pytest.raises(LayoutError, match="saved with 2 micro-batches per step; this run has 1 ranks"):
        _ranks(shard_files, 1, 1)[0].load_state_dict(source.state_dict())
