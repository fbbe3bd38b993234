"""Data preparation that scales: a stat-only cache key, parallel encoding, the lock, no barrier, streaming.

The lock tests start real processes (``multiprocessing`` with ``spawn``): one prepares, the others wait on
the filesystem.
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import multiprocessing
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_ft.config.load import validate
from distributed_ft.data import cache_lock, encode_pool
from distributed_ft.data.prepare import Preparation, SplitPlan, SplitStats, load_manifest, prepare
from distributed_ft.data.readers import read_records, read_token_tags
from distributed_ft.errors import DataError
from distributed_ft.tasks.causal_lm import CausalLMTask
from distributed_ft.tasks.sequence_classification import SequenceClassificationTask
from distributed_ft.tasks.token_classification import TokenClassificationTask
from distributed_ft.testing import (
    ENTITY_WORDS,
    FILLER,
    INSTRUCTIONS,
    make_conll,
    make_instruction_tokenizer,
    make_tokenizer,
)
from distributed_ft.train.job import prepare_data_once

SPAWN = multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------- the three tasks
def _config(task: str, cache: Path, **data):
    metric = {"token_classification": "f1", "sequence_classification": "macro_f1", "causal_lm": "loss"}[task]
    raw = {
        "task": task,
        "model": {"name": "unused"},
        "data": {"cache_dir": str(cache), "max_length": 48, "shard_rows": 16, **data},
        "eval": {"metric": metric},
        "run": {"progress": False},
    }
    return validate(raw)


def _texts(path: Path, n: int, seed: int) -> str:
    """Classification records: a sentence and the entity type it mentions most (or ``none``)."""
    rng, records = random.Random(seed), []
    for _ in range(n):
        kind = rng.choice([*sorted(ENTITY_WORDS), "none"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
        if kind != "none":
            words.insert(rng.randrange(len(words)), rng.choice(ENTITY_WORDS[kind]))
        records.append({"text": " ".join(words), "label": kind})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _chats(path: Path, n: int) -> str:
    """``n`` records of the sample instruction set (repeated)."""
    lines = (INSTRUCTIONS / "train.jsonl").read_text().splitlines()
    path.write_text("".join(lines[i % len(lines)] + "\n" for i in range(n)))
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """``task -> (task class, tokenizer, splits)`` with every split several shards long."""
    root = tmp_path_factory.mktemp("corpora")
    ner = {
        "train": str(make_conll(root / "train.conll", 90, seed=1)),
        "validation": str(make_conll(root / "dev.conll", 40, seed=2)),
    }
    texts = {"train": _texts(root / "train.jsonl", 90, 1), "validation": _texts(root / "dev.jsonl", 40, 2)}
    chats = {
        "train": _chats(root / "chat-train.jsonl", 70),
        "validation": _chats(root / "chat-dev.jsonl", 40),
    }
    return {
        "token_classification": (TokenClassificationTask, make_tokenizer(), ner),
        "sequence_classification": (SequenceClassificationTask, make_tokenizer(), texts),
        "causal_lm": (CausalLMTask, make_instruction_tokenizer(), chats),
    }


def _task(corpora, name: str, cache: Path, **data):
    cls, tokenizer, splits = corpora[name]
    return cls(_config(name, cache, **data)), tokenizer, splits


TASKS = ["token_classification", "sequence_classification", "causal_lm"]


# --------------------------------------------------------------------------- the cache key
@pytest.mark.parametrize("name", TASKS)
def test_the_key_is_computed_without_reading_the_data(corpora, name, tmp_path, monkeypatch):
    task, tokenizer, splits = _task(corpora, name, tmp_path / "cache")
    data_files = {os.path.abspath(p) for p in splits.values()}
    opened = []

    def recording(open_):
        def wrapper(file, *args, **kwargs):
            opened.append(os.path.abspath(os.fspath(file)) if isinstance(file, str | os.PathLike) else file)
            return open_(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    monkeypatch.setattr(type(task), "read", lambda *a, **k: pytest.fail("the key read the data"))
    key = task.cache_key(tokenizer, splits)
    assert task.cache_key(tokenizer, splits) == key
    assert not data_files & set(opened)


def test_the_key_changes_with_a_file_size_or_mtime(corpora, tmp_path):
    task, tokenizer, splits = _task(corpora, "token_classification", tmp_path / "cache")
    train = tmp_path / "train.conll"
    train.write_bytes(Path(splits["train"]).read_bytes())
    splits = {**splits, "train": str(train)}
    key = task.cache_key(tokenizer, splits)
    stat = train.stat()
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = task.cache_key(tokenizer, splits)
    assert touched != key
    with train.open("ab") as handle:
        handle.write(b"\n")
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same mtime, other size
    assert task.cache_key(tokenizer, splits) not in (key, touched)
    assert task.cache_key(tokenizer, splits, labels=["O", "B-PER", "I-PER"]) != key  # given labels count
    longer = TokenClassificationTask(_config("token_classification", tmp_path, max_length=64))
    assert longer.cache_key(tokenizer, splits) != task.cache_key(tokenizer, splits)


def test_a_missing_input_fails_the_key_naming_the_file(corpora, tmp_path):
    task, tokenizer, splits = _task(corpora, "token_classification", tmp_path / "cache")
    with pytest.raises(DataError, match=r"nope\.conll: file not found"):
        task.cache_key(tokenizer, {**splits, "validation": str(tmp_path / "nope.conll")})


# --------------------------------------------------------------------------- parallel encoding
def _contents(prepared) -> dict:
    return {
        name: {
            "shards": [p.name for p in split.shards],
            "rows": split.rows,
            "stats": split.stats,
            "table": split.read(),
        }
        for name, split in prepared.splits.items()
    }


@pytest.mark.parametrize("name", TASKS)
def test_two_processes_encode_the_same_shards_as_one(corpora, name, tmp_path, caplog):
    caplog.set_level("INFO", logger="distributed_ft")
    one, tokenizer, splits = _task(corpora, name, tmp_path / "one", num_proc=1)
    two = _task(corpora, name, tmp_path / "two", num_proc=2)[0]
    serial = one.prepare_data(tokenizer, splits)
    parallel = two.prepare_data(tokenizer, splits)
    assert "on 2 process(es)" in caplog.text and "on 1 process(es)" in caplog.text
    assert serial.directory.name == parallel.directory.name  # num_proc is no part of the key
    expected, got = _contents(serial), _contents(parallel)
    assert set(expected) == set(got) == {"train", "validation"}
    for split in expected:
        assert got[split]["table"].equals(expected[split]["table"]), split
        assert {k: v for k, v in got[split].items() if k != "table"} == {
            k: v for k, v in expected[split].items() if k != "table"
        }
        assert len(expected[split]["shards"]) > 1
        assert sum(expected[split]["rows"]) == expected[split]["table"].num_rows
    manifest = json.loads((parallel.directory / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == parallel.splits["train"].rows


def test_example_ids_follow_the_split_across_chunks(corpora, tmp_path):
    task, tokenizer, splits = _task(corpora, "token_classification", tmp_path / "cache")
    train = task.prepare_data(tokenizer, splits).splits["train"]
    assert train.read().column("example_id").to_pylist() == list(range(90))
    assert train.rows == [16] * 5 + [10]


def _numbered(rows: pa.Table, *, first: int) -> tuple[pa.Table, SplitStats]:
    """A chunk encoder: the rows with their split index."""
    ids = pa.array(np.arange(first, first + rows.num_rows), pa.int64())
    return rows.append_column("example_id", ids), SplitStats(examples=rows.num_rows, tokens=2 * rows.num_rows)


def _plan(rows: int, marker: str | None = None, delay: float = 0.0) -> Preparation:
    """A one-split preparation of ``rows`` rows; appends this process's pid to ``marker`` when built."""
    if marker is not None:
        with open(marker, "a") as handle:
            handle.write(f"{os.getpid()}\n")
    time.sleep(delay)
    table = pa.table({"length": pa.array(np.full(rows, 3), pa.int32())})
    return Preparation([SplitPlan("train", table, _numbered)], labels=["O"])


def test_shards_have_small_row_groups_and_rows_in_the_manifest(tmp_path):
    prepared = prepare(tmp_path, "key", functools.partial(_plan, 2500), shard_rows=3000)
    (shard,) = prepared.splits["train"].shards
    groups = pq.ParquetFile(shard).metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [1024, 1024, 452]
    assert prepared.splits["train"].stats.examples == 2500 and prepared.splits["train"].rows == [2500]
    manifest_path = tmp_path / "key" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["splits"]["train"]["rows"]  # a manifest written before rows existed
    manifest_path.write_text(json.dumps(manifest))
    assert load_manifest(tmp_path / "key").splits["train"].rows == [2500]


def test_auto_worker_count():
    assert encode_pool.worker_count(None, rows=100, chunks=7, shard_rows=16) == 1  # small: not worth a worker
    big = encode_pool.AUTO_MIN_ROWS
    assert encode_pool.worker_count(None, rows=big, chunks=99, shard_rows=16) == min(
        encode_pool.usable_cores(), 8
    )
    assert encode_pool.worker_count(None, rows=big, chunks=1, shard_rows=big) == 1
    assert encode_pool.worker_count(3, rows=10, chunks=2, shard_rows=5) == 2  # never more than the chunks


# --------------------------------------------------------------------------- the lock
def _prepare_in_child(cache: str, marker: str, delay: float, result: str) -> None:
    started = time.monotonic()
    prepared = prepare(Path(cache), "key", functools.partial(_plan, 40, marker, delay), shard_rows=16)
    out = {
        "reused": prepared.reused,
        "seconds": time.monotonic() - started,
        "rows": prepared.splits["train"].rows,
    }
    Path(result).write_text(json.dumps(out))


def _wait_for_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_two_processes_one_encodes_the_other_waits_and_reuses(tmp_path):
    marker = tmp_path / "built"
    first = SPAWN.Process(
        target=_prepare_in_child, args=(str(tmp_path / "cache"), str(marker), 3.0, str(tmp_path / "a"))
    )
    first.start()
    _wait_for_file(marker)  # the first holds the lock and is encoding
    second = SPAWN.Process(
        target=_prepare_in_child, args=(str(tmp_path / "cache"), str(marker), 0.0, str(tmp_path / "b"))
    )
    second.start()
    first.join(60)
    second.join(60)
    assert first.exitcode == second.exitcode == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in "ab")
    assert len(marker.read_text().split()) == 1  # exactly one process encoded
    assert (a["reused"], b["reused"]) == (False, True) and a["rows"] == b["rows"] == [16, 16, 8]
    assert not list((tmp_path / "cache").glob(".*"))  # no lock, no staging left


def _lock(cache: Path, host: str, pid: int, age: float = 0.0) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    lock = cache / ".key.lock"
    lock.write_text(json.dumps({"host": host, "pid": pid}))
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def _dead_pid() -> int:
    child = SPAWN.Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    return child.pid


def test_a_stale_lock_is_broken(tmp_path, caplog):
    lock = _lock(tmp_path, "another-host", 1, age=cache_lock.STALE_LOCK_S + 60)  # not touched for minutes
    prepared = prepare(tmp_path, "key", functools.partial(_plan, 5), shard_rows=16)
    assert not prepared.reused and not lock.exists()
    assert "breaking the lock of another-host:1 on key (not touched for" in caplog.text


def test_a_lock_of_a_dead_process_on_this_host_is_broken_at_once(tmp_path):
    _lock(tmp_path, socket.gethostname(), _dead_pid())  # fresh mtime, but its holder is gone
    started = time.monotonic()
    assert not prepare(tmp_path, "key", functools.partial(_plan, 5), shard_rows=16).reused
    assert time.monotonic() - started < 10


def _crash(rows: pa.Table, *, first: int) -> tuple[pa.Table, SplitStats]:
    os._exit(3)  # killed mid-encoding: no finally runs


def _crashing_plan() -> Preparation:
    return Preparation([SplitPlan("train", pa.table({"x": [1, 2]}), _crash)], labels=None)


def _crash_in_child(cache: str) -> None:
    prepare(Path(cache), "key", _crashing_plan, shard_rows=16)


def test_a_crashed_preparer_leaves_a_lock_that_the_next_one_breaks(tmp_path):
    child = SPAWN.Process(target=_crash_in_child, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    assert (tmp_path / ".key.lock").exists() and list(tmp_path.glob(".key-*"))  # lock and staging left
    prepared = prepare(tmp_path, "key", functools.partial(_plan, 5), shard_rows=16)
    assert not prepared.reused and prepared.splits["train"].rows == [5]
    assert not list(tmp_path.glob(".*"))


def test_a_failing_preparer_releases_the_lock(tmp_path):
    def broken() -> Preparation:
        raise DataError("bad data")

    with pytest.raises(DataError, match="bad data"):
        prepare(tmp_path, "key", broken, shard_rows=16)
    assert not list(tmp_path.glob(".*"))
    assert not prepare(tmp_path, "key", functools.partial(_plan, 5), shard_rows=16).reused


def test_the_holder_touches_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_lock, "HEARTBEAT_S", 0.05)
    seen = []

    def slow() -> Preparation:
        lock = tmp_path / ".key.lock"
        seen.append(lock.stat().st_mtime_ns)
        time.sleep(0.5)
        seen.append(lock.stat().st_mtime_ns)
        return _plan(5)

    prepare(tmp_path, "key", slow, shard_rows=16)
    assert seen[1] > seen[0]


# --------------------------------------------------------------------------- no barrier
class _RecordingRank:
    """One rank of a 2-rank job: broadcasts hand out rank 0's value; a barrier fails the test."""

    world_size, local_rank = 2, 0

    def __init__(self, rank: int, box: list) -> None:
        self.rank, self.box, self.calls = rank, box, []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj):
        self.calls.append("broadcast_object")
        if self.rank == 0:
            self.box[:] = [obj]
        return self.box[0]

    def barrier(self) -> None:
        pytest.fail("prepare_data_once called a barrier")

    def all_gather_object(self, obj):
        pytest.fail("prepare_data_once gathered")


def test_prepare_data_once_broadcasts_the_key_and_never_waits_in_a_barrier(corpora, tmp_path, monkeypatch):
    task, tokenizer, splits = _task(corpora, "token_classification", tmp_path / "cache")
    keys: list = []
    cache_key = type(task).cache_key
    monkeypatch.setattr(
        type(task), "cache_key", lambda self, *a: keys.append(cache_key(self, *a)) or keys[-1]
    )
    box: list = []
    ranks = [_RecordingRank(0, box), _RecordingRank(1, box)]
    prepared = [prepare_data_once(task, tokenizer, splits, None, rank) for rank in ranks]
    assert len(keys) == 1  # rank 0 computed it; rank 1 got it by the broadcast
    assert prepared[0].directory.name == prepared[1].directory.name == keys[0]
    assert (prepared[0].reused, prepared[1].reused) == (False, True)
    assert [r.calls for r in ranks] == [["broadcast_object"], ["broadcast_object"]]


def test_rank_zeros_key_failure_is_raised_on_every_rank(corpora, tmp_path):
    task, tokenizer, splits = _task(corpora, "token_classification", tmp_path / "cache")
    splits = {**splits, "train": str(tmp_path / "missing.conll")}
    box: list = []
    for rank in (0, 1):
        with pytest.raises(DataError, match=r"missing\.conll: file not found"):
            prepare_data_once(task, tokenizer, splits, None, _RecordingRank(rank, box))


# --------------------------------------------------------------------------- streaming readers
def _with_bad_byte(path: Path, lines: list[str], bad_line: int) -> Path:
    data = [line.encode() for line in lines]
    data[bad_line - 1] = data[bad_line - 1].replace(b"X", b"\xfc")
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(data) + b"\n")  # with a BOM
    return path


def test_a_non_utf8_byte_mid_file_names_its_line(tmp_path):
    conll = ["John B-PER", "said O", "", *[f"w{i} O" for i in range(50)], "MaXry B-PER", "ok O"]
    path = _with_bad_byte(tmp_path / "bad.conll", conll, 54)
    with pytest.raises(DataError, match=r"bad\.conll:54: byte 0xfc at column 3 is not UTF-8.*iconv"):
        read_token_tags(path)
    records = [json.dumps({"text": f"t{i}", "label": "a"}) for i in range(30)]
    records[20] = '{"text": "aXb", "label": "a"}'
    path = _with_bad_byte(tmp_path / "bad.jsonl", records, 21)
    with pytest.raises(DataError, match=r"bad\.jsonl:21: byte 0xfc at column 12 is not UTF-8"):
        read_records(path)


def test_streaming_readers_strip_the_bom_and_keep_line_numbers(tmp_path):
    conll = tmp_path / "a.conll"
    conll.write_bytes(b"\xef\xbb\xbfJohn B-PER\r\nsaid O\r\n\r\nParis B-LOC\n")
    table = read_token_tags(conll)
    assert table.column("tokens").to_pylist() == [["John", "said"], ["Paris"]]
    assert table.column("line").to_pylist() == [1, 4]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    assert read_records(jsonl).column("line").to_pylist() == [1, 3]
    csv = tmp_path / "a.csv"
    csv.write_bytes(b'\xef\xbb\xbftext,label\r\n"two\nlines",x\r\nc,y\r\n')
    table = read_records(csv)
    assert table.column("text").to_pylist() == ["two\nlines", "c"]
    assert table.column("line").to_pylist() == [2, 4]
    array = tmp_path / "b.jsonl"
    array.write_text('\n  [{"text": "a", "label": "x"},\n {"text": "b", "label": "y"}]\n')
    assert read_records(array).column("line").to_pylist() == [1, 2]  # a JSON array: record numbers
