"""The GPU path's multi-process guarantees, on 2 CPU processes (gloo).

* One accumulation window on 2 DDP ranks (micro-batches of 4, unequal targets per rank) gives the
  gradients of one process taking all 16 examples as one batch.
* ZeRO-3 builds ``builtin:smollm2-135m`` partitioned: right after construction each rank holds about half
  of the parameters; an adapter export gathers no frozen parameter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import grad_equivalence
import mp_helpers

from distributed_ft.runtime.context import LocalContext


@pytest.mark.multiproc
def test_two_ranks_with_accumulation_give_the_gradients_of_one_big_batch(tiny_bert, tmp_path):
    script = mp_helpers.SCRIPTS / "grad_equivalence.py"
    done = mp_helpers.torchrun([str(tiny_bert), str(tmp_path)], script=script)
    assert done.returncode == 0, mp_helpers.describe(done)
    distributed = torch.load(tmp_path / "grads.pt")
    rows = grad_equivalence.examples(40)
    reference = grad_equivalence.window_gradients(str(tiny_bert), LocalContext(), [rows])
    assert distributed.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(distributed[name], grad, atol=1e-6, rtol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in reference.values())


def _builtin_smollm2() -> str:
    from distributed_ft.data import builtin

    try:
        builtin.resolve("builtin:smollm2-135m")
    except Exception as exc:  # pragma: no cover - the offline package is part of `make setup`
        pytest.fail(f"builtin:smollm2-135m is not installed ({exc}); run make setup")
    return "builtin:smollm2-135m"


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_builds_partitioned_and_adapter_export_gathers_no_frozen_parameter(tmp_path):
    model = _builtin_smollm2()
    script = mp_helpers.REPO / "benchmarks" / "zero3_load.py"  # the benchmark's worker, with --lora
    done = mp_helpers.torchrun([model, str(tmp_path), "--lora"], script=script)
    assert done.returncode == 0, mp_helpers.describe(done)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    total = ranks[0]["total_elements"]
    assert total > 100_000_000  # SmolLM2-135M (tied embeddings counted once)
    for rank in ranks:
        share = rank["held_elements"] / total
        assert 0.45 <= share <= 0.55, rank  # about half: no rank ever held the whole model
        assert rank["gathered"].get("frozen", 0) == 0, rank["gathered"]
        assert rank["gathered"]["trainable"] == rank["trainable_parameters"], rank
    adapter = tmp_path / "export" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(adapter)
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert any("lora_" in name for name in tensors), sorted(tensors)[:5]


@pytest.mark.slow
def test_bf16_deepspeed_export_holds_the_fp32_masters(tiny_bert, tiny_conll, tmp_path):
    """A bf16 ZeRO-2 run exports fp32 tensors that are not bf16 values upcast (the masters)."""
    args = mp_helpers.job_overrides(
        tiny_bert,
        tiny_conll,
        tmp_path,
        "run.engine=deepspeed",
        "deepspeed.zero_stage=2",
        "train.mixed_precision=bf16",
        "data.validation=null",
        "train.max_steps=4",
    )
    done = mp_helpers.run([sys.executable, "-m", "distributed_ft", "-q", "train", *args])
    assert done.returncode == 0, mp_helpers.describe(done)
    tensors = mp_helpers.load_tensors(tmp_path / "run" / "export")
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["dtype"] == "float32"
    trained = {n: t for n, t in tensors.items() if t.is_floating_point() and t.numel() > 100}
    assert trained and all(t.dtype == torch.float32 for t in trained.values())
    # 16-bit module weights upcast would round-trip through bf16 unchanged; masters do not
    changed = sum(not torch.equal(t, t.to(torch.bfloat16).float()) for t in trained.values())
    assert changed >= len(trained) // 2, (changed, len(trained))
