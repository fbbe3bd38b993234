"""Honest throughput on 2 processes: the logged tokens and samples are both ranks' sums, MFU is reported."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import mp_helpers

from distributed_ft.config.load import load_config
from distributed_ft.train.job import data_splits, load_task
from distributed_ft.train.loop import training_source

STEPS = 4


def _rank_batches(run_dir: Path, world_size: int) -> list[list[tuple[int, int]]]:
    """``(tokens, samples)`` of each rank's first ``STEPS`` batches, from the library's own batch plan."""
    config = load_config(str(run_dir / "config.yaml"))[0]
    tokenizer, task = load_task(config)
    split = task.prepare_data(tokenizer, data_splits(config)).splits["train"]  # the run's cache
    ranks = []
    for rank in range(world_size):
        source = training_source(config, task, split, rank, world_size)
        source.set_epoch(0)
        batches = itertools.islice(iter(source), STEPS)
        ranks.append([(int(b["attention_mask"].sum()), len(b["input_ids"])) for b in batches])
    return ranks


@pytest.mark.multiproc
def test_logged_tokens_and_samples_are_the_sums_of_both_ranks(
    tiny_bert, tiny_conll, tmp_path, one_torch_thread
):
    extra = (f"train.max_steps={STEPS}", "train.batch_size=5", "data.validation=null", "data.test=null")
    done = mp_helpers.torchrun(["train", *mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path, *extra)])
    assert done.returncode == 0, mp_helpers.describe(done)
    run_dir = tmp_path / "run"
    records = mp_helpers.train_records(run_dir)
    ranks = _rank_batches(run_dir, 2)
    assert [t for t, _ in ranks[0]] != [t for t, _ in ranks[1]]  # the ranks' token counts differ
    for step in range(1, STEPS + 1):
        (tokens0, samples0), (tokens1, samples1) = ranks[0][step - 1], ranks[1][step - 1]
        record = records[step]
        assert (record["tokens"], record["samples"]) == (tokens0 + tokens1, samples0 + samples1), record
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1
    throughput = mp_helpers.results(run_dir)["throughput"]
    assert len(throughput["peak_memory_bytes_per_rank"]) == 2
    assert all(b > 100 * 2**20 for b in throughput["peak_memory_bytes_per_rank"])  # torch alone is more
    assert 0 < throughput["mfu"] < 1 and "matmul probe" in throughput["peak_source"]
    total = sum(t for rank in ranks for t, _ in rank)
    assert throughput["tokens_per_s"] * throughput["train_step_seconds"] == pytest.approx(total, rel=0.05)
