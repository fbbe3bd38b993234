"""ZeRO 0-3 (and CPU offload) train under ``torchrun`` with 2 CPU processes; ZeRO-3 export is exact.

"ZeRO 0" here is ``run.engine=torch`` (DistributedDataParallel); DeepSpeed's own stage 0 runs in
``test_launchers.py`` under the ``deepspeed`` launcher. Stages 1-3 start from the JSON files in
``cluster_configs/deepspeed/`` (so those files are exercised too) with the matching typed keys.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import mp_helpers

pytestmark = pytest.mark.multiproc

CONFIGS = mp_helpers.REPO / "cluster_configs" / "deepspeed"


def _deepspeed(stage: int, file: str, *extra: str) -> list[str]:
    return [
        "run.engine=deepspeed",
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.config={CONFIGS / file}",
        *extra,
    ]


STAGES = {
    "ddp": ["run.engine=torch"],
    "zero1": _deepspeed(1, "zero1.json", "model.gradient_checkpointing=true"),
    "zero2": _deepspeed(2, "zero2.json"),
    "zero3": _deepspeed(3, "zero3.json"),
    "zero2_offload": _deepspeed(2, "zero2_offload.json", "deepspeed.offload_optimizer=true"),
    "zero3_offload": _deepspeed(
        3,
        "zero3_offload.json",
        "deepspeed.offload_optimizer=true",
        "deepspeed.offload_param=true",
        "model.gradient_checkpointing=true",
    ),
}
ACCUMULATE = "train.grad_accum=2"
"""7 batches per rank and epoch: every epoch ends on a partial accumulation window."""
_runs: dict[str, Path] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, tiny_conll):
    """``trained(stage)``: the run directory of a 2-process training with that stage (run once)."""

    def get(stage: str) -> Path:
        if stage not in _runs:
            root = tmp_path_factory.mktemp(stage)
            args = mp_helpers.job_overrides(tiny_bert, tiny_conll, root, ACCUMULATE, *STAGES[stage])
            done = mp_helpers.torchrun(["train", *args])
            print(f"{stage}: torchrun train took {done.seconds:.1f} s")
            assert done.returncode == 0, mp_helpers.describe(done)
            _runs[stage] = root / "run"
        return _runs[stage]

    return get


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_trains_on_two_processes(trained, stage):
    run_dir = trained(stage)
    mp_helpers.assert_loss_falls(run_dir)
    results = mp_helpers.results(run_dir)
    assert results["world_size"] == 2
    assert results["steps"] == 8
    assert (run_dir / "export" / "model.safetensors").is_file()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "run_state.json").is_file()
    if stage != "ddp":
        meta = json.loads((run_dir / "checkpoints" / latest / "engine" / "dft_engine.json").read_text())
        assert meta == {"world_size": 2, "zero_stage": int(stage[4])}


def test_stages_agree_with_each_other(trained):
    """Same data, seed and fp32 math: every ZeRO stage follows DDP's loss and gradient norm closely.

    This pins down the accumulation contract: the loop normalises each window's loss by its global
    target count, DeepSpeed does not rescale it (``scale_wrt_gas=False``) and clips once, and the loop's
    boundaries (partial windows included) are DeepSpeed's. A broken contract shows as factors (x2, x1/2);
    ZeRO's reduce-scatter sums in another order than DDP's all-reduce, and AdamW amplifies that rounding
    over the steps (~1e-4 by step 5), hence the tolerance.
    """
    reference = mp_helpers.train_records(trained("ddp"))
    for stage in STAGES:
        records = mp_helpers.train_records(trained(stage))
        assert sorted(records) == sorted(reference), stage
        for step, expected in reference.items():
            for key in ("loss", "grad_norm", "lr"):
                assert records[step][key] == pytest.approx(expected[key], rel=5e-4, abs=1e-5), (
                    stage,
                    step,
                    key,
                )


def test_zero3_export_reloads_in_transformers_and_predicts_like_the_engine(trained, tmp_path):
    """ZeRO-3 on 2 ranks: the engine's logits == plain transformers on ``export/``; all exports agree."""
    from transformers import AutoModelForTokenClassification

    run_dir = trained("zero3")
    script = mp_helpers.SCRIPTS / "engine_predict.py"
    done = mp_helpers.torchrun([str(run_dir), str(tmp_path)], script=script)
    print(f"engine_predict under torchrun took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)

    model = AutoModelForTokenClassification.from_pretrained(run_dir / "export").eval()
    records = torch.load(tmp_path / "predictions.pt")
    assert sum(len(r["input_ids"]) for r in records) == 60
    with torch.no_grad():
        for record in records:
            plain = model(input_ids=record["input_ids"], attention_mask=record["attention_mask"]).logits
            mask = record["attention_mask"].bool()
            assert torch.equal(plain.argmax(-1)[mask], record["logits"].argmax(-1)[mask])
            torch.testing.assert_close(plain[mask], record["logits"][mask], rtol=1e-5, atol=1e-5)

    exported = mp_helpers.load_tensors(run_dir / "export")
    under_torchrun = mp_helpers.load_tensors(tmp_path / "export")  # dft export, 2 ranks
    single = tmp_path / "single"  # dft export in one process: consolidates the 2-rank ZeRO-3 shards
    done = mp_helpers.run(
        [sys.executable, "-m", "distributed_ft", "-q", "export", str(run_dir), "--out", str(single)]
    )
    print(f"single-process dft export took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)
    consolidated = mp_helpers.load_tensors(single)
    assert exported.keys() == under_torchrun.keys() == consolidated.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, under_torchrun[name]), name
        assert torch.equal(tensor, consolidated[name]), name

    full = sum(t.numel() * t.element_size() for t in exported.values())
    for rank in (0, 1):
        sizes = json.loads((tmp_path / f"state_bytes-rank{rank}.json").read_text())
        # fp32 AdamW moments of this rank's half of the parameters (+ the fp32 master partition)
        assert full <= sizes["optimizer_states"] <= 1.6 * full, sizes
        assert sizes["parameters"] > 0
