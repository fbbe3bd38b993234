"""The launcher scripts start real 2-process jobs on CPU; wrong launches fail fast with a clear message."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import mp_helpers

from distributed_ft.cli import main

LAUNCHERS = mp_helpers.REPO / "launchers"


def _launch(script: str, args: list[str], **env: str):
    path = f"{mp_helpers.BIN}:{os.environ['PATH']}"
    done = mp_helpers.run(["bash", str(LAUNCHERS / script), *args], env={"PATH": path, **env})
    print(f"{script} took {done.seconds:.1f} s")
    return done


@pytest.mark.multiproc
def test_accelerate_launch_runs_two_processes_zero2(tmp_path, tiny_bert, tiny_conll):
    extra = ["run.engine=deepspeed", "deepspeed.zero_stage=2", "run.num_workers=2", "run.progress=false"]
    args = mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path, *extra)
    done = _launch("accelerate.sh", args, MAIN_PROCESS_PORT=str(mp_helpers.free_port()))
    assert done.returncode == 0, mp_helpers.describe(done)
    assert mp_helpers.results(tmp_path / "run")["world_size"] == 2
    mp_helpers.assert_loss_falls(tmp_path / "run")


@pytest.mark.multiproc
def test_deepspeed_launcher_runs_two_processes_zero0(tmp_path, tiny_bert, tiny_conll):
    extra = ["run.engine=deepspeed", "deepspeed.zero_stage=0", "run.progress=false"]
    args = mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path, *extra)
    port = mp_helpers.free_port()
    done = _launch("deepspeed.sh", args, NUM_ACCELERATORS="2", MASTER_PORT=str(port))
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink()  # DeepSpeed's CPU shared-memory op leaves ~66 MB per rank behind
    assert done.returncode == 0, mp_helpers.describe(done)
    assert mp_helpers.results(tmp_path / "run")["world_size"] == 2
    mp_helpers.assert_loss_falls(tmp_path / "run")


@pytest.mark.multiproc
def test_torchrun_launcher_refuses_a_world_size_mismatch(tmp_path, tiny_bert, tiny_conll):
    args = mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path, "run.num_workers=3")
    done = _launch("torchrun.sh", args, NPROC_PER_NODE="2", MASTER_PORT=str(mp_helpers.free_port()))
    assert done.returncode != 0
    assert "run.num_workers=3 but the launcher started WORLD_SIZE=2" in done.stderr
    assert "torchrun --nproc_per_node 3" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.multiproc
def test_accelerate_multi_cpu_config_starting_one_process_is_refused(tmp_path, tiny_bert, tiny_conll):
    """Accelerate's MULTI_CPU config on one machine starts 1 process for num_processes: 2."""
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_machines: 1\n"
        "num_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n"
    )
    args = mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path)
    done = _launch("accelerate.sh", args, ACCELERATE_CONFIG=str(config))
    assert done.returncode != 0
    assert "accelerate launch was asked for several processes but started one" in done.stderr
    assert "cluster_configs/accelerate/cpu_2proc.yaml" in done.stderr
    assert not (tmp_path / "run").exists()


def test_conflicting_deepspeed_json_fails_before_the_model_is_built(tmp_path, tiny_bert, tiny_conll, capsys):
    config = tmp_path / "ds.json"
    config.write_text('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}')
    args = mp_helpers.job_overrides(
        tiny_bert, tiny_conll, tmp_path, "run.engine=deepspeed", f"deepspeed.config={config}"
    )
    assert main(["-q", "train", *args]) == 2
    message = capsys.readouterr().err
    assert f"{config}: train_micro_batch_size_per_gpu=8 conflicts with train.batch_size=16" in message
    assert not (tmp_path / "run" / "checkpoints").exists()
