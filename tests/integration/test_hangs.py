"""Hang detection end to end: one rank of two stalls (the watchdog's test-only hook), the watchdog reports it.

* torchrun, 2 gloo processes: the stalled rank writes ``hangs/rank-1.txt`` naming itself and its stuck
  frame, says so on stderr and exits with the hang code; the job ends non-zero, promptly; with
  ``--max-restarts=1`` torchrun restarts it and the job resumes from its checkpoint and completes.
* Ray, 2 workers, ``run.max_failures=1``: the stalled worker's report reaches storage, Ray restarts the
  worker group from the last checkpoint, the run completes and the driver names the rank that hung.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import mp_helpers

from distributed_ft.runtime import watchdog

TIMEOUT_S = 5
STALL = {watchdog.STALL_RANK_ENV: "1", watchdog.STALL_STEP_ENV: "3"}


def _overrides(tiny_bert, tiny_conll, root: Path, *extra: str) -> list[str]:
    return mp_helpers.job_overrides(
        tiny_bert,
        tiny_conll,
        root,
        "run.progress=false",
        "train.eval_each_epoch=false",
        f"run.hang_timeout_s={TIMEOUT_S}",
        *extra,
    )


def _check_report(text: str) -> dict[str, str]:
    fields = watchdog.parse_report(text)
    assert fields["rank"] == "1" and fields["world_size"] == "2" and fields["last_step"] == "3", fields
    assert fields["stuck_frame"].startswith("stall_for_test ("), fields
    assert TIMEOUT_S <= float(fields["seconds_since_beat"]) < TIMEOUT_S + 3, fields
    assert fields["last_collective"].startswith("all_reduce(sum) (left"), fields  # step 3's target count
    assert "all threads (faulthandler" in text and "stall_for_test" in text.split("faulthandler")[1]
    return fields


def test_an_honest_run_with_a_watchdog_finishes_and_leaves_no_thread(tiny_job, one_torch_thread, tmp_path):
    """Evaluations at each epoch end and checkpoints are long phases: beaten around, no false alarm."""
    import threading

    from distributed_ft.config.load import load_config
    from distributed_ft.runtime.context import LocalContext
    from distributed_ft.train.loop import train

    config, name = load_config(
        "ner-conll2003", [*tiny_job, "train.epochs=2", "train.save_every=5", "run.hang_timeout_s=30"]
    )
    results = train(config, LocalContext(use_gpu=False), name)
    assert results["steps"] == 30 and "dev" in results
    assert not (tmp_path / "run" / "hangs").exists()
    assert not [t for t in threading.enumerate() if t.name == "dft-watchdog"]


def _torchrun(args: list[str], env: dict[str, str], *launcher: str) -> subprocess.CompletedProcess:
    """``torchrun ... -m distributed_ft -q train ARGS``; on a timeout its workers are ended too (by PID).

    torchrun starts each worker in a session of its own: killing torchrun alone would orphan them.
    """
    command = [str(mp_helpers.BIN / "torchrun"), "--standalone", *launcher, "--nproc_per_node", "2"]
    command += ["-m", "distributed_ft", "-q", "train", *args]
    started = time.perf_counter()
    job = subprocess.Popen(
        command,
        cwd=mp_helpers.REPO,
        env=mp_helpers._env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = job.communicate(timeout=mp_helpers.LAUNCH_TIMEOUT_S)
    finally:
        if job.poll() is None:
            _stop_family(job)
    done = subprocess.CompletedProcess(command, job.returncode, out, err)
    done.seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return done


@pytest.mark.multiproc
def test_a_stalled_rank_under_torchrun_reports_its_stuck_frame_and_the_job_fails(
    tiny_bert, tiny_conll, tmp_path
):
    done = _torchrun(_overrides(tiny_bert, tiny_conll, tmp_path), STALL)
    assert done.returncode != 0, mp_helpers.describe(done)
    report = tmp_path / "run" / "hangs" / "rank-1.txt"
    assert report.is_file(), mp_helpers.describe(done)
    _check_report(report.read_text())
    assert f"rank 1: no step progress for {TIMEOUT_S}" in done.stderr, mp_helpers.describe(done)
    assert f"stacks in {report}" in done.stderr
    assert done.seconds < 150, mp_helpers.describe(done)  # the other rank did not wait out gloo's timeout


@pytest.mark.multiproc
def test_torchrun_max_restarts_resumes_a_hung_job_from_its_checkpoint(tiny_bert, tiny_conll, tmp_path):
    args = _overrides(tiny_bert, tiny_conll, tmp_path, "train.save_every=2")
    # torchrun's shared rendezvous store hands restarted gloo ranks stale peer addresses (pytorch#135712)
    env = {**STALL, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    done = _torchrun(args, env, "--max-restarts=1")
    assert done.returncode == 0, mp_helpers.describe(done)
    assert "rank 1: no step progress for" in done.stderr
    assert re.search(r"resumed from \S+step-0000002 \(step 2, ", done.stderr), mp_helpers.describe(done)
    assert sorted(mp_helpers.train_records(tmp_path / "run")) == list(range(1, 9))
    assert mp_helpers.results(tmp_path / "run")["steps"] == 8


def _stop_family(job: subprocess.Popen) -> None:
    """End what the job started (its local Ray) and the job itself, by PID."""
    with contextlib.suppress(psutil.Error):
        family = psutil.Process(job.pid).children(recursive=True)
        for process in [*family, psutil.Process(job.pid)]:
            with contextlib.suppress(psutil.Error):
                process.kill()


@pytest.mark.ray
@pytest.mark.slow
def test_a_stalled_ray_worker_is_restarted_from_its_checkpoint_and_the_driver_names_it(
    tiny_bert, tiny_conll, tmp_path
):
    args = _overrides(
        tiny_bert,
        tiny_conll,
        tmp_path,
        "run.backend=ray",
        "run.num_workers=2",
        "run.max_failures=1",
        "train.save_every=2",
        "train.batch_size=8",
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    job = subprocess.Popen(
        [sys.executable, "-m", "distributed_ft", "-q", "train", *args],
        env={**env, **STALL},
        cwd=mp_helpers.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            _stop_family(job)
    assert job.returncode == 0, out[-4000:]
    assert "hang watchdog: rank 1 hung at step 3 (phase train" in out, out[-4000:]
    assert "stuck in stall_for_test (" in out
    run_dir = tmp_path / "run"
    _check_report((run_dir / "hangs" / "rank-1.txt").read_text())  # the driver's copy, from storage
    assert re.search(r"resumed from \S+step-0000002 \(step 2, ", out), out[-4000:]  # before the stall
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "train"
    ]
    assert steps == list(range(1, 9))  # step 3 never finished before the restart: nothing logged twice
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 8
