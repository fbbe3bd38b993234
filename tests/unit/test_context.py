"""Runtime contexts: the world-size rules and launch mistakes refused before any work is done."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distributed_ft.errors import LaunchError
from distributed_ft.runtime.context import (
    LocalContext,
    check_single_process_launch,
    check_world_size,
    create_context,
)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*LAUNCH_VARS, "ACCELERATE_MIXED_PRECISION", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_local_context_is_safe_at_world_size_one():
    context = LocalContext()
    assert (context.rank, context.world_size, context.is_main, context.device) == (
        0,
        1,
        True,
        torch.device("cpu"),
    )
    assert context.all_gather_object({"a": 1}) == [{"a": 1}]
    assert context.broadcast_object(3) == 3
    context.barrier()


@pytest.mark.parametrize("expected", [None, 1, 4])
def test_launcher_world_size_is_accepted_by_default_or_when_equal(expected):
    check_world_size(expected, world_size=4)


def test_explicit_num_workers_different_from_the_launcher_is_refused():
    with pytest.raises(LaunchError) as error:
        check_world_size(2, world_size=4)
    assert "run.num_workers=2 but the launcher started WORLD_SIZE=4" in str(error.value)
    assert "torchrun --nproc_per_node 2" in str(error.value)


def test_single_process_with_num_workers_above_one_is_refused(clean_env):
    with pytest.raises(LaunchError, match=r"run\.num_workers=2 but this is a single process"):
        create_context(expected_world_size=2)
    assert isinstance(create_context(expected_world_size=1), LocalContext)


def test_accelerate_starting_one_process_for_several_is_refused():
    env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}
    with pytest.raises(LaunchError, match="accelerate launch was asked for several processes"):
        check_single_process_launch(None, env)
    check_single_process_launch(None, {"ACCELERATE_MIXED_PRECISION": "no"})  # num_processes: 1


@pytest.mark.parametrize("variable", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_mpi_copies_that_would_train_independently_are_refused(variable):
    with pytest.raises(LaunchError, match="2 copies of this process were started by MPI"):
        check_single_process_launch(None, {variable: "2"})
    check_single_process_launch(None, {variable: "1"})


def test_create_context_refuses_the_accelerate_case_from_the_environment(clean_env):
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(LaunchError):
        create_context()


def test_torchrun_context_from_env_vars_in_a_fresh_process(tmp_path):
    """A world-size-1 launcher environment builds a TorchrunContext; a mismatch fails before gloo starts."""
    code = (
        "import os;"
        "from distributed_ft.runtime.context import create_context, ensure_process_group;"
        "import torch.distributed as dist;"
        "c = create_context(expected_world_size=None);"
        "print(type(c).__name__, c.rank, c.world_size, c.local_rank, c.device);"
        "ensure_process_group(c); print(dist.get_world_size())"
    )
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["TorchrunContext", "0", "1", "0", "cpu", "1"]


def test_each_local_process_takes_its_share_of_the_cores(monkeypatch):
    from distributed_ft.runtime.context import local_world_size, share_of_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert share_of_cores(2, env={}) == (4, "8 cores / 2 local processes")
    assert share_of_cores(16, env={})[0] == 1  # never zero
    assert share_of_cores(2, env={"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")  # the user's (or Ray's)
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4 and local_world_size({}) == 1


def test_a_ray_worker_reads_the_preemption_notice_without_a_barrier(monkeypatch):
    """Ray's public ``get_preemption_info`` is a barrier per call; the worker's own copy is read instead."""
    from types import SimpleNamespace

    pytest.importorskip("ray")
    import ray.train
    from ray.train.v2._internal.execution import context as ray_context

    from distributed_ft.backends.ray_train import preemption_noticed

    def barrier() -> None:
        raise AssertionError("the public API (a barrier) was called")

    monkeypatch.setattr(ray.train, "get_preemption_info", barrier)
    for info, expected in ((None, False), (object(), True)):
        notice = SimpleNamespace(preemption_context=SimpleNamespace(preemption_info=info))
        monkeypatch.setattr(ray_context, "get_train_context", lambda notice=notice: notice)
        assert preemption_noticed() is expected
    # a Ray that keeps the notice elsewhere: the public API answers
    monkeypatch.setattr(ray_context, "get_train_context", lambda: SimpleNamespace())
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: object())
    assert preemption_noticed() is True
