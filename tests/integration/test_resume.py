"""Exact resume and crash safety of checkpoints.

* ZeRO-2 on 2 processes: 8 steps straight == 8 steps where the job dies while writing the checkpoint of
  step 6 and is resumed by rerunning the same command (``run.resume=auto`` picks step 3): the same loss
  at every step (bitwise, fp32 on CPU) and the same final weights. Gradient accumulation 2 over 7
  batches per rank also puts a partial accumulation window at the end of every epoch.
* A crash inside ``engine.save`` leaves the previous checkpoint complete and ``latest`` pointing at it
  (unit-level, with a fake engine: no processes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import mp_helpers

from distributed_ft.runtime.context import LocalContext
from distributed_ft.train.checkpoint import CheckpointManager, RunState

RESUME_JOB = [
    "run.engine=deepspeed",
    "deepspeed.zero_stage=2",
    "train.grad_accum=2",
    "train.epochs=10",
    "train.save_every=3",
    "data.validation=null",
]


@pytest.mark.multiproc
def test_zero2_resume_after_a_crash_mid_checkpoint_is_exact(tmp_path, tiny_bert, tiny_conll):
    straight = mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path / "straight", *RESUME_JOB)
    done = mp_helpers.torchrun(["train", *straight])
    print(f"straight run took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)

    args = [
        "-q",
        "train",
        *mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path / "resumed", *RESUME_JOB),
    ]
    script = mp_helpers.SCRIPTS / "crash_in_save.py"
    done = mp_helpers.torchrun(args, script=script, env={"DFT_TEST_CRASH_AT_STEP": "6"})
    print(f"crashing run took {done.seconds:.1f} s")
    assert done.returncode != 0 and "simulated crash" in done.stderr, mp_helpers.describe(done)
    checkpoints = tmp_path / "resumed" / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-0000003"
    assert (checkpoints / ".tmp-step-0000006" / "engine").is_dir()  # the half-written one
    assert not (checkpoints / "step-0000006").exists()

    done = mp_helpers.torchrun(args, script=script)  # the same command again: run.resume=auto
    print(f"resumed run took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)
    assert "resumed from" in done.stderr and "step-0000003" in done.stderr

    expected = mp_helpers.train_records(tmp_path / "straight" / "run")
    got = mp_helpers.train_records(tmp_path / "resumed" / "run")
    assert sorted(expected) == sorted(got) == list(range(1, 9))
    for step in expected:
        for key in ("loss", "lr", "grad_norm", "epoch"):
            assert got[step][key] == expected[step][key], (step, key, got[step], expected[step])
    final_a = mp_helpers.load_tensors(tmp_path / "straight" / "run" / "export")
    final_b = mp_helpers.load_tensors(tmp_path / "resumed" / "run" / "export")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert not list(checkpoints.glob(".tmp-*"))  # the leftover was cleaned up by a later save


class FakeEngine:
    """Writes a tensor file; raises while writing when ``fail`` is set."""

    def __init__(self) -> None:
        self.value, self.fail = 0.0, False

    def save(self, directory: Path) -> None:
        torch.save(torch.tensor([self.value]), directory / "engine.pt")
        if self.fail:
            raise RuntimeError("disk full")

    def load(self, directory: Path, weights_only: bool = False) -> None:
        self.value = float(torch.load(directory / "engine.pt")[0])


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", LocalContext(), keep=2)
    engine = FakeEngine()
    engine.value = 1.0
    first = manager.save(engine, RunState(step=10, epoch=1, best_metric=0.5))
    engine.value, engine.fail = 2.0, True
    with pytest.raises(RuntimeError, match="disk full"):
        manager.save(engine, RunState(step=20, epoch=2))
    assert (tmp_path / "checkpoints" / ".tmp-step-0000020").is_dir()
    assert manager.latest == first
    assert manager.find_resume("auto") == first
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == first.name

    restored = FakeEngine()
    state = manager.load(restored, manager.find_resume("auto"))
    assert restored.value == 1.0 and state.step == 10 and state.best_metric == 0.5

    # A leftover staging directory without run state is never taken for a checkpoint, even with
    # the pointer gone (the scan fallback), and the next good save replaces it.
    (tmp_path / "checkpoints" / "latest").unlink()
    assert manager.latest == first
    engine.fail = False
    second = manager.save(engine, RunState(step=20, epoch=2))
    assert manager.latest == second and json.loads((second / "run_state.json").read_text())["step"] == 20
    assert not (tmp_path / "checkpoints" / ".tmp-step-0000020").exists()
