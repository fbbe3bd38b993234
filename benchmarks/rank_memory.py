"""Peak memory of one training rank reading its share of a prepared split, in a process of its own.

``rank_memory(directory, world_size, batch_size)`` starts one process per rank (all at once, as ranks run);
each imports the library, records its resident set size, then iterates one epoch of its training batches
and reports its peak (``ru_maxrss``). The difference is what the data costs a rank:

* ``sharded``: the library's training source (:class:`~distributed_ft.data.shards.ShardedBatchSource`),
  which reads only the rank's share, a window at a time;
* ``whole``: every rank reading the whole split into memory and taking its batches from it (the way
  ranks read data before per-rank streaming), for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, subprocess_env

MODES = ("sharded", "whole")


def rank_memory(
    directory: Path, world_size: int, batch_size: int, mode: str = "sharded"
) -> list[dict[str, Any]]:
    """One record per rank: ``baseline_bytes`` (after imports), ``peak_bytes``, ``rows_read``, ``batches``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    commands = [
        [
            sys.executable,
            "-m",
            "benchmarks.rank_memory",
            str(directory),
            str(rank),
            str(world_size),
            str(batch_size),
            mode,
        ]
        for rank in range(world_size)
    ]
    env = subprocess_env(threads=1)
    ranks = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) for c in commands]
    records = []
    for rank, process in enumerate(ranks):
        out, _ = process.communicate(timeout=900)
        if process.returncode != 0:
            raise RuntimeError(f"rank {rank} of the {mode} memory probe exited with {process.returncode}")
        records.append(json.loads(out.strip().splitlines()[-1]))
    return records


def _collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from distributed_ft.data.sources import pad_sequences

    return {"input_ids": pad_sequences([r["input_ids"] for r in rows], 0)}


def _probe(directory: Path, rank: int, world_size: int, batch_size: int, mode: str) -> dict[str, Any]:
    from distributed_ft.data.prepare import load_manifest
    from distributed_ft.data.shards import ShardedBatchSource
    from distributed_ft.data.sources import ArrowBatchSource
    from distributed_ft.train.measure import peak_rss_bytes, rss_bytes

    prepared = load_manifest(directory)
    if prepared is None:
        raise SystemExit(f"{directory}: no complete prepared dataset (manifest.json)")
    split = prepared.splits["train"]
    baseline = rss_bytes()
    if mode == "sharded":
        source: Any = ShardedBatchSource(
            split.shard_reader(), _collate, batch_size, rank=rank, world_size=world_size
        )
        batches = sum(1 for _ in source)
        rows_read = source.rows_read
    else:
        table = split.read()
        source = ArrowBatchSource(table, _collate, batch_size, shuffle=True, rank=rank, world_size=world_size)
        batches = sum(1 for _ in source)
        rows_read = table.num_rows
    return {
        "rank": rank,
        "baseline_bytes": baseline,
        "peak_bytes": peak_rss_bytes(),
        "rows_read": rows_read,
        "batches": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="one rank's memory probe (started by rank_memory())")
    parser.add_argument("directory", type=Path)
    parser.add_argument("rank", type=int)
    parser.add_argument("world_size", type=int)
    parser.add_argument("batch_size", type=int)
    parser.add_argument("mode", choices=MODES)
    args = parser.parse_args()
    print(json.dumps(_probe(args.directory, args.rank, args.world_size, args.batch_size, args.mode)))


if __name__ == "__main__":
    main()
