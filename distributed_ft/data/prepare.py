"""Tokenize once: encode each split with the task's encoder and cache it as Parquet shards + a manifest.

The cache key (fingerprint) covers the bytes of the input files, the tokenizer, the label map and every
option that changes the encoding, so a second run with the same inputs reuses the shards and any change
re-prepares. Shards are written into a temporary directory that is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ft.config.schema import DataConfig

PREPARE_VERSION = 1
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/distributed_ft/prepared`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distributed_ft" / "prepared"


def hash_files(pattern: str) -> str:
    """SHA-256 over the bytes of every file a path or glob names, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(glob(pattern)) or [pattern]:
        digest.update(path.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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


@dataclass
class PreparedSplit:
    """One split of a prepared dataset: its shards and statistics."""

    name: str
    shards: list[Path]
    stats: SplitStats

    def read(self) -> pa.Table:
        """The whole split as one Arrow table (memory-mapped shards)."""
        return pa.concat_tables(pq.read_table(p, memory_map=True) for p in self.shards)


@dataclass
class PreparedDataset:
    """The cached, tokenized splits of a job plus what was fixed when preparing them."""

    directory: Path
    splits: dict[str, PreparedSplit]
    labels: list[str] | None
    reused: bool
    meta: dict[str, Any] = field(default_factory=dict)


def limit_split(table: pa.Table, split: str, data: DataConfig) -> pa.Table:
    """The first ``data.max_{train,eval,test}_samples`` rows of a split (``eval`` means validation)."""
    limit = {"train": data.max_train_samples, "validation": data.max_eval_samples}.get(
        split, data.max_test_samples
    )
    return table.slice(0, limit) if limit else table


def _write_shards(table: pa.Table, directory: Path, split: str, shard_rows: int) -> list[str]:
    names = []
    for index, start in enumerate(range(0, max(table.num_rows, 1), shard_rows)):
        name = f"{split}-{index:05d}.parquet"
        pq.write_table(table.slice(start, shard_rows), directory / name)
        names.append(name)
    return names


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
        splits[name] = PreparedSplit(name, shards, SplitStats(**info["stats"]))
    return PreparedDataset(directory, splits, manifest["labels"], reused=True, meta=manifest.get("meta", {}))


def prepare(
    cache_dir: Path,
    key: str,
    split_encoders: Iterable[tuple[str, Callable[[], tuple[pa.Table, SplitStats]]]],
    *,
    labels: list[str] | None,
    shard_rows: int,
    meta: dict[str, Any] | None = None,
) -> PreparedDataset:
    """Return the prepared dataset for ``key``, encoding and writing it first when not cached.

    Args:
        cache_dir: Root of the cache; the dataset lives in ``cache_dir/key``.
        key: The fingerprint of everything the encoding depends on.
        split_encoders: ``(split name, encode())`` pairs; ``encode`` runs only on a cache miss.
        labels: The label list fixed for this dataset (kept in the manifest).
        shard_rows: Rows per Parquet shard.
        meta: Extra JSON-able facts to keep in the manifest.
    """
    target = cache_dir / key
    cached = load_manifest(target)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        manifest: dict[str, Any] = {"fingerprint": key, "labels": labels, "meta": meta or {}, "splits": {}}
        for split, encode in split_encoders:
            table, stats = encode()
            shards = _write_shards(table, staging, split, shard_rows)
            manifest["splits"][split] = {"shards": shards, "stats": stats.__dict__}
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prepared = load_manifest(target)
    assert prepared is not None
    prepared.reused = False
    return prepared


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
