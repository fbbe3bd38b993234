"""Tokenize once: encode each split with the task's encoder and cache it as Parquet shards + a manifest.

The cache key is cheap: every input file enters it by path, size and modification time (a ``stat``; the
data is not read), with the tokenizer, user-given labels and every option that changes the encoding. So
one rank computes it and hands it to the others before any work is done, and a second run with the same
inputs reuses the shards while any change re-prepares.

On a miss one process per cache directory prepares: it creates ``cache_dir/.<key>.lock`` atomically,
reads the inputs, cuts each split into chunks of ``shard_rows`` rows and encodes them in ``num_proc``
worker processes (each writes its own shard into a staging directory), writes the manifest and renames the
directory into place. The others wait for the manifest on the filesystem, not in a collective, and break
a lock whose holder stopped touching it or died on this host (:mod:`distributed_ft.data.cache_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ft.config.schema import DataConfig
from distributed_ft.data.cache_lock import CacheLock, wait_for_holder
from distributed_ft.data.encode_pool import Encoded, encode_plan, shard_name, write_shard
from distributed_ft.data.readers import input_files
from distributed_ft.data.shards import ParquetShards, ShardReader

log = logging.getLogger("distributed_ft")

PREPARE_VERSION = 2
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/distributed_ft/prepared`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distributed_ft" / "prepared"


def cache_dir_for(data: DataConfig) -> Path:
    """``data.cache_dir`` (``~`` expanded), else :func:`default_cache_dir`."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()


def input_stats(path: str) -> list[list[Any]]:
    """``[absolute path, size, mtime_ns]`` of every file a path, glob or directory names; nothing is read."""
    out = []
    for file in input_files(path):
        stat = os.stat(file)
        out.append([os.path.abspath(file), stat.st_size, stat.st_mtime_ns])
    return out


def hash_tokenizer(tokenizer: Any) -> str:
    """A digest of a fast tokenizer's full definition (vocabulary, normaliser, special tokens)."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    for call_state in ("truncation", "padding"):  # set by the last call, not part of the definition
        definition.pop(call_state, None)
    definition = json.dumps(definition, sort_keys=True)
    extra = json.dumps({"special": tokenizer.all_special_tokens, "pad": tokenizer.pad_token_id})
    return hashlib.sha256((definition + extra).encode()).hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    """A short stable digest of a JSON-able description of everything the encoding depends on."""
    text = json.dumps({"version": PREPARE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class SplitStats:
    """What encoding did to one split; reported to the user and kept in the manifest."""

    examples: int = 0
    tokens: int = 0
    truncated_examples: int = 0
    truncated_words: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self, split: str) -> str:
        """One line for the log."""
        line = f"{split}: {self.examples:,} examples, {self.tokens:,} tokens"
        if self.truncated_examples:
            line += (
                f"; {self.truncated_examples:,} examples truncated ({self.truncated_words:,} words past "
                "data.max_length, scored as 'O' in evaluation; raise data.max_length to keep them)"
            )
        return line

    def add(self, other: SplitStats) -> None:
        """Add the counts of another chunk of the same split (``extra`` values are summed too)."""
        self.examples += other.examples
        self.tokens += other.tokens
        self.truncated_examples += other.truncated_examples
        self.truncated_words += other.truncated_words
        for name, value in other.extra.items():
            self.extra[name] = self.extra.get(name, 0) + value


@dataclass
class PreparedSplit:
    """One split of a prepared dataset: its shards and statistics."""

    name: str
    shards: list[Path]
    stats: SplitStats
    rows: list[int] = field(default_factory=list)
    """Rows per shard (from the manifest, or the shards' Parquet footers for an older manifest)."""

    def read(self) -> pa.Table:
        """The whole split as one Arrow table (memory-mapped shards)."""
        return pa.concat_tables(pq.read_table(p, memory_map=True) for p in self.shards)

    def shard_reader(self) -> ShardReader:
        """Random access to the shards' rows, for a rank that reads only its share."""
        return ParquetShards(self.shards, self.rows or None)


@dataclass
class PreparedDataset:
    """The cached, tokenized splits of a job plus what was fixed when preparing them."""

    directory: Path
    splits: dict[str, PreparedSplit]
    labels: list[str] | None
    reused: bool
    meta: dict[str, Any] = field(default_factory=dict)


class ChunkEncoder(Protocol):
    """Encodes rows of a split; ``first`` is the index of the first row in the split (for example ids).

    It runs in worker processes, so it must pickle: a module-level function or a ``functools.partial``
    of one (the tokenizer travels inside it, pickled once per worker).
    """

    def __call__(self, rows: pa.Table, *, first: int) -> tuple[pa.Table, SplitStats]: ...


@dataclass
class SplitPlan:
    """One split to encode: its parsed rows, the chunk encoder and an optional whole-split step."""

    name: str
    table: pa.Table
    encode: ChunkEncoder
    finish: Callable[[pa.Table, SplitStats], tuple[pa.Table, SplitStats]] | None = None
    """Runs on all encoded chunks at once in the preparing process (e.g. packing), which then writes the
    shards; without it each worker writes the shard of its chunk."""


@dataclass
class Preparation:
    """What a cache miss encodes, built by the task after reading and validating its inputs."""

    splits: list[SplitPlan]
    labels: list[str] | None
    meta: dict[str, Any] = field(default_factory=dict)


def limit_split(table: pa.Table, split: str, data: DataConfig) -> pa.Table:
    """The first ``data.max_{train,eval,test}_samples`` rows of a split (``eval`` means validation)."""
    limit = {"train": data.max_train_samples, "validation": data.max_eval_samples}.get(
        split, data.max_test_samples
    )
    return table.slice(0, limit) if limit else table


def _write_shards(
    table: pa.Table, directory: Path, split: str, shard_rows: int
) -> tuple[list[str], list[int]]:
    names, rows = [], []
    for index, start in enumerate(range(0, max(table.num_rows, 1), shard_rows)):
        part = table.slice(start, shard_rows)
        write_shard(part, directory / shard_name(split, index))
        names.append(shard_name(split, index))
        rows.append(part.num_rows)
    return names, rows


def load_manifest(directory: Path) -> PreparedDataset | None:
    """The prepared dataset in ``directory``, or ``None`` when it is absent or incomplete."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    splits = {}
    for name, info in manifest["splits"].items():
        shards = [directory / s for s in info["shards"]]
        if not all(p.is_file() for p in shards):
            return None
        rows = info.get("rows") or [pq.read_metadata(p).num_rows for p in shards]
        splits[name] = PreparedSplit(name, shards, SplitStats(**info["stats"]), rows)
    return PreparedDataset(directory, splits, manifest["labels"], reused=True, meta=manifest.get("meta", {}))


# --------------------------------------------------------------------------- the cache
def prepare(
    cache_dir: Path,
    key: str,
    build: Callable[[], Preparation],
    *,
    shard_rows: int,
    num_proc: int | None = None,
    progress: Callable[..., Iterable[Any]] | None = None,
) -> PreparedDataset:
    """Return the prepared dataset for ``key``, encoding and writing it first when not cached.

    Args:
        cache_dir: Root of the cache; the dataset lives in ``cache_dir/key``.
        key: The cache key of everything the encoding depends on (see the module docstring).
        build: Reads and validates the inputs into a :class:`Preparation`; called only on a miss, by the
            one process that holds the key's lock.
        shard_rows: Rows per chunk: each chunk is encoded in one task and written as one shard.
        num_proc: Worker processes (``None``: see :func:`worker_count`).
        progress: ``progress(items, total=..., desc=...)`` wraps the encoded chunks (a progress bar).
    """
    target, lock_path = cache_dir / key, cache_dir / f".{key}.lock"
    while True:
        cached = load_manifest(target)
        if cached is not None:
            return cached
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = CacheLock.acquire(lock_path)
        if lock is None:
            wait_for_holder(lock_path, (target / MANIFEST).is_file, key)
            continue
        try:
            cached = load_manifest(target)  # published between our look and our lock
            if cached is not None:
                return cached
            _remove_leftovers(cache_dir, key)
            _build_and_publish(cache_dir, key, build(), shard_rows, num_proc, progress)
        finally:
            lock.release()
        prepared = load_manifest(target)
        assert prepared is not None
        prepared.reused = False
        return prepared


def _build_and_publish(
    cache_dir: Path,
    key: str,
    plan: Preparation,
    shard_rows: int,
    num_proc: int | None,
    progress: Callable[..., Iterable[Any]] | None,
) -> None:
    """Encode ``plan`` into a staging directory, write its manifest and publish it as ``cache_dir/key``."""
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        encoded = encode_plan(plan, staging, shard_rows, num_proc, progress)
        manifest: dict[str, Any] = {
            "fingerprint": key,
            "labels": plan.labels,
            "meta": plan.meta,
            "splits": {},
        }
        for split in plan.splits:
            shards, rows, stats = _merge(split, encoded[split.name], staging, shard_rows)
            manifest["splits"][split.name] = {"shards": shards, "rows": rows, "stats": stats.__dict__}
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _publish(staging, target=cache_dir / key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_leftovers(cache_dir: Path, key: str) -> None:
    """Staging directories of ``key`` that a killed preparer left behind (we hold the key's lock)."""
    for leftover in cache_dir.glob(f".{key}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Move a complete ``staging`` directory to ``target`` without ever deleting a complete cache.

    Another process may have prepared the same key meanwhile: its complete cache is kept (ours is
    dropped). An incomplete leftover of a killed run is first renamed aside (atomic), then removed.
    """
    if load_manifest(target) is not None:
        return
    if target.exists():
        aside = target.with_name(f".{target.name}-stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:  # someone published between our check and the rename: theirs is complete
        if load_manifest(target) is None:
            raise


def _merge(
    split: SplitPlan, encoded: list[Encoded], staging: Path, shard_rows: int
) -> tuple[list[str], list[int], SplitStats]:
    """The shards, rows per shard and summed counts of a split's chunks (after ``finish``, if any)."""
    stats = SplitStats()
    for part in encoded:
        stats.add(part.stats)
    if split.finish is None:
        return [p.shard for p in encoded if p.shard], [p.rows for p in encoded], stats
    table, stats = split.finish(pa.concat_tables(p.table for p in encoded if p.table is not None), stats)
    names, rows = _write_shards(table, staging, split.name, shard_rows)
    return names, rows, stats
