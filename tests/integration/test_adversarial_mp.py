"""Adversarial training (train.adversarial) on 2 CPU processes (gloo): DDP and DeepSpeed ZeRO-2.

* FGM on 2 DDP ranks with accumulation gives the gradients of one process taking all examples as one
  batch (the perturbation is per example, and DDP reduces once per window: one backward per micro-batch).
* ``dft train`` with PGD under DDP and ZeRO-2 trains (finite, falling losses; the cost is logged), and
  ZeRO-2 follows DDP's losses and gradient norms step by step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import grad_equivalence
import mp_helpers

from distributed_ft.runtime.context import LocalContext

pytestmark = pytest.mark.multiproc


def test_fgm_on_two_ranks_gives_the_gradients_of_one_big_batch(tiny_bert, tmp_path):
    done = mp_helpers.torchrun(
        [str(tiny_bert), str(tmp_path), "fgm"], script=mp_helpers.SCRIPTS / "grad_equivalence.py"
    )
    assert done.returncode == 0, mp_helpers.describe(done)
    distributed = torch.load(tmp_path / "grads.pt")
    rows = grad_equivalence.examples(40)
    reference = grad_equivalence.window_gradients(str(tiny_bert), LocalContext(), [rows], "fgm")
    plain = grad_equivalence.window_gradients(str(tiny_bert), LocalContext(), [rows])
    assert distributed.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(distributed[name], grad, atol=1e-6, rtol=0, msg=name)
    assert max(float((reference[n] - plain[n]).abs().max()) for n in plain) > 1e-4


PGD = ["train.adversarial=pgd", "train.adversarial_steps=2", "train.grad_accum=2"]
RUNS = {
    "ddp": ["run.engine=torch", *PGD],
    "zero2": ["run.engine=deepspeed", "deepspeed.zero_stage=2", *PGD],
}
_runs: dict[str, tuple[Path, str]] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, tiny_conll):
    """``trained(name)``: the run directory and log of a 2-process ``dft train`` of ``RUNS[name]``."""

    def get(name: str) -> tuple[Path, str]:
        if name not in _runs:
            root = tmp_path_factory.mktemp(name)
            done = mp_helpers.torchrun(
                ["train", *mp_helpers.job_overrides(tiny_bert, tiny_conll, root, *RUNS[name])]
            )
            assert done.returncode == 0, mp_helpers.describe(done)
            _runs[name] = (root / "run", done.stdout + done.stderr)
        return _runs[name]

    return get


@pytest.mark.parametrize("name", list(RUNS))
def test_adversarial_runs_train_and_log_their_cost(trained, name):
    run_dir, output = trained(name)
    assert "adversarial training: pgd" in output and "3 forwards" in output
    losses = mp_helpers.assert_loss_falls(run_dir)
    assert all(math.isfinite(loss) for loss in losses)


def test_zero2_follows_ddp(trained):
    """The same adversarial steps under ZeRO-2 as under DDP: its partial backwards touch no reduction."""
    reference = mp_helpers.train_records(trained("ddp")[0])
    records = mp_helpers.train_records(trained("zero2")[0])
    assert sorted(records) == sorted(reference)
    for step, expected in reference.items():
        for key in ("loss", "grad_norm"):
            assert records[step][key] == pytest.approx(expected[key], rel=5e-4, abs=1e-5), (step, key)
