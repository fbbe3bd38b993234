"""The step layout: lanes fixed at the start of a run, grad_accum adapted to the world size it resumes on."""

from __future__ import annotations

import logging

import pytest

from distributed_ft.config.load import validate
from distributed_ft.errors import CheckpointError, ConfigError, LaunchError
from distributed_ft.runtime.context import check_single_process_launch, check_world_size
from distributed_ft.train.layout import StepLayout, step_layout


def _config(**run):
    grad_accum = run.pop("grad_accum", 1)
    return validate({"run": run, "train": {"grad_accum": grad_accum, "batch_size": 8}})


def test_a_fresh_run_takes_its_lanes_from_the_launch():
    assert step_layout(_config(grad_accum=2), world_size=4) == StepLayout(lanes=8, grad_accum=2)


def test_an_elastic_run_fixes_the_global_batch_at_max_workers(caplog):
    config = _config(num_workers=[2, 4], grad_accum=3)
    assert step_layout(config, world_size=4) == StepLayout(lanes=12, grad_accum=3)
    with caplog.at_level(logging.WARNING, logger="distributed_ft"):
        assert step_layout(config, world_size=3) == StepLayout(lanes=12, grad_accum=4)
    assert "train.grad_accum 3 -> 4: 3 ranks keep the global batch of 12 micro-batches x 8" in caplog.text


@pytest.mark.parametrize(("world_size", "grad_accum"), [(1, 4), (2, 2), (4, 1)])
def test_a_resume_keeps_the_checkpoints_lanes(world_size, grad_accum):
    saved = {"epoch": 0, "position": 6, "steps": 3, "lanes": 4, "batch_size": 8}
    assert step_layout(_config(grad_accum=3), world_size, saved) == StepLayout(4, grad_accum)


def test_a_world_size_that_cannot_split_the_batch_is_refused():
    saved = {"epoch": 0, "position": 0, "steps": 0, "lanes": 4, "batch_size": 8}
    with pytest.raises(CheckpointError, match="which 3 ranks cannot split evenly; resume on 1, 2, 4 ranks"):
        step_layout(_config(), 3, saved)


def test_another_micro_batch_size_is_refused():
    saved = {"epoch": 0, "position": 0, "steps": 0, "lanes": 2, "batch_size": 16}
    with pytest.raises(CheckpointError, match=r"train\.batch_size=16"):
        step_layout(_config(), 2, saved)


def test_an_elastic_range_must_divide_the_global_batch():
    with pytest.raises(
        ConfigError, match=r"3 workers cannot split evenly; set train\.grad_accum to a multiple of 3"
    ):
        _config(num_workers=[2, 4])
    assert _config(num_workers=[2, 4], grad_accum=3).run.worker_range == (2, 4)
    with pytest.raises(ConfigError, match="1 <= min <= max"):
        _config(num_workers=[3, 2])


def test_launches_are_checked_against_an_elastic_range():
    check_world_size((1, 2), 2)
    with pytest.raises(LaunchError, match=r"run.num_workers=\[2, 4\] but the launcher started WORLD_SIZE=5"):
        check_world_size((2, 4), 5)
    check_single_process_launch((1, 2), env={})
    with pytest.raises(LaunchError, match="single process"):
        check_single_process_launch((2, 4), env={})
