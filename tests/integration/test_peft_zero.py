"""LoRA end to end: TorchEngine in one process, DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes.

Each run must train (loss falls), write adapter-only checkpoints and an adapter ``export/`` whose tensors
are complete (the ZeRO-3 trap: an ungathered save writes empty tensors), reload from that export to the
exact predictions of the live model, and merge (``dft export --merge-lora``) into a full model that plain
transformers loads and that predicts the same within fp32 rounding.

ZeRO-3 runs with ``stage3_param_persistence_threshold: 0`` so that every tensor of the tiny model,
adapters included, is partitioned; otherwise tensors this small stay whole on every rank and the test
could not catch an ungathered save.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_ft.cli import main
from distributed_ft.modeling.build import load_trained

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import mp_helpers

H, LAYERS, R = 64, 2, 8
LABELS = 5  # O, B-LOC, B-ORG, B-PER, I-PER in the tiny corpus
LORA = LAYERS * 2 * R * (H + H)  # query, value: A is r x H, B is H x r
HEAD = H * LABELS + LABELS
CRF = LABELS * LABELS + 2 * LABELS  # the recipe's CRF head: transitions, start and end scores
LORA_ARGS = ["peft.method=lora", f"peft.r={R}", "train.lr=1e-2"]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _check_adapter_export(run_dir: Path) -> None:
    """The export is an adapter whose every tensor is complete (never the empty ZeRO-3 placeholders)."""
    export = run_dir / "export"
    assert (export / "adapter_config.json").is_file() and not (export / "model.safetensors").exists()
    assert (export / "tokenizer.json").is_file() and (export / "base_model_kwargs.json").is_file()
    tensors = load_file(export / "adapter_model.safetensors")
    lora = {k: t for k, t in tensors.items() if "lora_" in k}
    head = {k: t for k, t in tensors.items() if "classifier" in k}
    assert len(lora) == LAYERS * 2 * 2 and len(head) == 2, sorted(tensors)
    assert sum(t.numel() for t in lora.values()) == LORA
    assert sum(t.numel() for t in head.values()) == HEAD
    assert sum(t.numel() for k, t in tensors.items() if ".crf." in k) == CRF
    assert all(t.numel() and t.abs().sum() > 0 for t in tensors.values())  # trained B is no longer zero
    parameters = _results(run_dir)["parameters"]
    assert parameters["trainable"] == LORA + HEAD + CRF
    assert parameters["by_module_type"]["lora"] == {"trainable": LORA, "total": LORA}


def _evaluate_json(path: Path, capsys, *overrides: str) -> dict:
    capsys.readouterr()
    assert main(["-q", "evaluate", str(path), *overrides, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_lora_with_the_torch_engine(tiny_job, tmp_path, capsys, tiny_conll):
    """One process: trains, adapter-only checkpoints, exact reload, merged export."""
    assert main(["-q", "train", "ner-conll2003", *tiny_job, *LORA_ARGS, "train.epochs=2"]) == 0
    run_dir = tmp_path / "run"
    mp_helpers.assert_loss_falls(run_dir)
    _check_adapter_export(run_dir)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = load_file(run_dir / "checkpoints" / latest / "model.safetensors")
    assert sum(t.numel() for t in state.values()) == LORA + HEAD + CRF  # adapter-only checkpoint

    results = _results(run_dir)
    assert _evaluate_json(run_dir, capsys)["f1"] == results["test"]["f1"]  # reload == live, exactly
    direct = _evaluate_json(run_dir / "export", capsys, f"data.test={tiny_conll['test']}")
    assert direct["f1"] == results["test"]["f1"]  # the export alone (base resolved from its config)

    assert main(["-q", "export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    _assert_merged_matches_adapter(run_dir / "export", tmp_path / "merged")


def _assert_merged_matches_adapter(adapter: Path, merged_dir: Path, records=None) -> None:
    from transformers import AutoModelForTokenClassification

    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForTokenClassification.from_pretrained(merged_dir).eval()
    reloaded = load_trained("token_classification", str(adapter))
    ids = torch.randint(5, 60, (6, 12), generator=torch.Generator().manual_seed(0))
    batches = records or [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with torch.no_grad():
        for batch in batches:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            expected = reloaded(**inputs).logits
            mask = inputs["attention_mask"].bool()
            torch.testing.assert_close(merged(**inputs).logits[mask], expected[mask], rtol=1e-5, atol=1e-5)


def _zero_config(tmp_path: Path, stage: int) -> Path:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every tensor, adapters included
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    return path


def _train_zero(stage: int, tiny_bert, tiny_conll, tmp_path: Path) -> Path:
    extra = [
        "run.engine=deepspeed",
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.config={_zero_config(tmp_path, stage)}",
        *LORA_ARGS,
    ]
    args = mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path, *extra)
    done = mp_helpers.torchrun(["train", *args])
    print(f"ZeRO-{stage} LoRA: torchrun train took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)
    run_dir = tmp_path / "run"
    mp_helpers.assert_loss_falls(run_dir)
    assert _results(run_dir)["world_size"] == 2
    _check_adapter_export(run_dir)
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "engine"
    written = sum(f.stat().st_size for f in latest.iterdir())
    full = _results(run_dir)["parameters"]["total"] * 4
    assert written < 0.5 * full, (written, full)  # adapter-only: frozen base weights are left out
    return run_dir


@pytest.mark.multiproc
def test_lora_under_zero2_on_two_processes(tiny_bert, tiny_conll, tmp_path, capsys):
    run_dir = _train_zero(2, tiny_bert, tiny_conll, tmp_path)
    results = _results(run_dir)
    assert _evaluate_json(run_dir, capsys)["f1"] == results["test"]["f1"]
    # one process reads the 2-rank ZeRO-2 checkpoint (consolidated), merges and writes a full model
    merged = tmp_path / "merged"
    done = mp_helpers.run(
        [
            sys.executable,
            "-m",
            "distributed_ft",
            "-q",
            "export",
            str(run_dir),
            "--out",
            str(merged),
            "--merge-lora",
        ]
    )
    print(f"ZeRO-2 LoRA: single-process dft export --merge-lora took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)
    _assert_merged_matches_adapter(run_dir / "export", merged)


@pytest.mark.multiproc
def test_lora_under_zero3_on_two_processes(tiny_bert, tiny_conll, tmp_path, capsys):
    run_dir = _train_zero(3, tiny_bert, tiny_conll, tmp_path)
    results = _results(run_dir)
    assert _evaluate_json(run_dir, capsys)["f1"] == results["test"]["f1"]

    # the ZeRO-3 engine (2 ranks, every tensor partitioned) reloads the best checkpoint and predicts;
    # the adapter export reloaded with peft must predict the same; the merged export within fp32 rounding
    out = tmp_path / "engine"
    out.mkdir()
    done = mp_helpers.torchrun(
        [str(run_dir), str(out), "--merge-lora"], script=mp_helpers.SCRIPTS / "engine_predict.py"
    )
    print(f"ZeRO-3 LoRA: engine reload + merged export under torchrun took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)
    records = torch.load(out / "predictions.pt")
    assert sum(len(r["input_ids"]) for r in records) == 60
    reloaded = load_trained("token_classification", str(run_dir / "export"))
    with torch.no_grad():
        for record in records:
            logits = reloaded(input_ids=record["input_ids"], attention_mask=record["attention_mask"]).logits
            mask = record["attention_mask"].bool()
            assert torch.equal(logits.argmax(-1)[mask], record["logits"].argmax(-1)[mask])
            torch.testing.assert_close(logits[mask], record["logits"][mask], rtol=1e-6, atol=1e-6)
    _assert_merged_matches_adapter(run_dir / "export", out / "merged", records)
    for rank in (0, 1):  # the frozen base is partitioned too: each rank holds about half the weights
        sizes = json.loads((out / f"state_bytes-rank{rank}.json").read_text())
        full = sum(p.numel() * 4 for p in reloaded.get_base_model().parameters())
        assert 0 < sizes["parameters"] < 0.75 * full, sizes
