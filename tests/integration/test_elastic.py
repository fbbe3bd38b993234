"""Elastic resume: a checkpoint continues on another number of ranks or ZeRO stage, exactly.

A run trains 20 steps with a checkpoint at step 10; a second run resumes from that checkpoint on another
layout (ranks x ZeRO stage). Its per-step losses 11-20 and its final weights must equal the first run's
within 1e-5: the sample order, the global batch (``grad_accum`` adapts), the weights, AdamW's moments and
step and the schedule all survive the change. The source-level proof that no sample is seen twice or
skipped across a resize is ``tests/unit/test_shards.py::test_a_resize_continues_the_global_order``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import mp_helpers

pytestmark = pytest.mark.multiproc

STEPS, CHECKPOINT = 20, 10
LAYOUTS = {
    "ddp": ["run.engine=torch"],
    "zero2": ["run.engine=deepspeed", "deepspeed.zero_stage=2"],
    "zero3": ["run.engine=deepspeed", "deepspeed.zero_stage=3"],
}
_runs: dict[tuple[str, int], Path] = {}


def _overrides(bert: Path, conll: dict[str, Path], root: Path, layout: str, *extra: str) -> list[str]:
    return mp_helpers.job_overrides(
        bert,
        conll,
        root,
        *LAYOUTS[layout],
        "data.validation=null",
        "data.test=null",
        f"train.max_steps={STEPS}",
        f"train.save_every={CHECKPOINT}",
        "train.keep_checkpoints=5",
        "train.warmup_ratio=0.2",
        *extra,
    )


def _launch(args: list[str], ranks: int):
    if ranks == 1:
        return mp_helpers.run([sys.executable, "-m", "distributed_ft", "-q", "train", *args])
    return mp_helpers.torchrun(["train", *args], nproc=ranks)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert, tiny_conll):
    """``uninterrupted(layout, ranks, grad_accum)``: the run directory of the 20-step run (run once)."""

    def get(layout: str, ranks: int, grad_accum: int) -> Path:
        key = (layout, ranks)
        if key not in _runs:
            root = tmp_path_factory.mktemp(f"{layout}-{ranks}")
            args = _overrides(tiny_bert, tiny_conll, root, layout, f"train.grad_accum={grad_accum}")
            done = _launch(args, ranks)
            assert done.returncode == 0, mp_helpers.describe(done)
            _runs[key] = root / "run"
        return _runs[key]

    return get


def _modern_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LayerNorm ``gamma`` / ``beta`` as ``weight`` / ``bias``: a ZeRO-3 export writes BERT's legacy names
    (``from_pretrained`` reads both)."""
    renamed = {}
    for name, tensor in tensors.items():
        stem, _, leaf = name.rpartition(".")
        renamed[f"{stem}.{ {'gamma': 'weight', 'beta': 'bias'}.get(leaf, leaf) }"] = tensor
    return renamed


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (("ddp", 2, 1), ("ddp", 1)),
        (("ddp", 1, 2), ("ddp", 2)),
        (("zero2", 2, 1), ("zero3", 2)),
        (("zero2", 2, 1), ("zero2", 1)),
    ],
    ids=["ddp-2-to-1", "ddp-1-to-2", "zero2-to-zero3", "zero2-2-to-1"],
)
def test_resume_on_another_layout_continues_exactly(
    uninterrupted, tiny_bert, tiny_conll, tmp_path, before, after
):
    first = uninterrupted(*before)
    layout, ranks = after
    checkpoint = first / "checkpoints" / f"step-{CHECKPOINT:07d}"
    # the config as first given (grad_accum of the first layout): the checkpoint's global batch decides
    args = _overrides(
        tiny_bert, tiny_conll, tmp_path, layout, f"train.grad_accum={before[2]}", f"run.resume={checkpoint}"
    )
    done = _launch(args, ranks)
    assert done.returncode == 0, mp_helpers.describe(done)
    lanes = before[1] * before[2]
    if lanes // ranks != before[2]:  # the knob that moved is named
        assert f"train.grad_accum {before[2]} -> {lanes // ranks}" in done.stdout + done.stderr

    expected, resumed = mp_helpers.train_records(first), mp_helpers.train_records(tmp_path / "run")
    assert sorted(resumed) == list(range(CHECKPOINT + 1, STEPS + 1))  # no step before it is retrained
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert resumed[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-6), step
    assert mp_helpers.results(tmp_path / "run")["world_size"] == ranks

    want = _modern_names(mp_helpers.load_tensors(first / "export"))
    got = _modern_names(mp_helpers.load_tensors(tmp_path / "run" / "export"))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
