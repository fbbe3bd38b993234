"""``dft export`` of a run on storage (moto's S3 server): the same model as exporting the local run.

A tiny NER run trains locally and is uploaded twice: as a run directory (``checkpoints/`` inside) and in
the layout of a Ray run (checkpoints at the top of the run's storage directory). Exporting either from
``s3://`` gives the weights of the local run's own export: plain transformers loads them, same logits.
"""

from __future__ import annotations

import pytest
import torch

from distributed_ft.cli import main
from distributed_ft.runtime import storage


@pytest.fixture
def s3_env(s3_server, tmp_path, monkeypatch):
    """The S3 server's environment in this process, and a storage cache of this test's own."""
    env, client, bucket = s3_server
    for key, value in {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}.items():
        monkeypatch.setenv(key, value)
    return client, bucket


def _logits(model_dir, text: str = "john smith visited paris with nato") -> torch.Tensor:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForTokenClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_export_reads_a_run_straight_from_the_bucket(s3_env, tiny_job, tmp_path, capsys):
    _, bucket = s3_env
    assert main(["-q", "train", "ner-conll2003", *tiny_job, "train.epochs=1", "train.max_steps=8"]) == 0
    run_dir = tmp_path / "run"
    expected = _logits(run_dir / "export")

    as_run = f"s3://{bucket}/runs/local"
    storage.upload(run_dir, as_run)
    assert main(["-q", "export", as_run, "--out", str(tmp_path / "from-s3")]) == 0
    torch.testing.assert_close(_logits(tmp_path / "from-s3"), expected, rtol=0, atol=0)

    as_ray = f"s3://{bucket}/runs/ray"  # Ray's layout: STORAGE/<run>/step-*, no checkpoints/
    for name in ("config.yaml", "labels.json", "export"):
        storage.upload(run_dir / name, storage.join(as_ray, name))
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        storage.upload(checkpoint, storage.join(as_ray, checkpoint.name))
    out = tmp_path / "from-ray-layout"
    assert main(["-q", "export", as_ray, "--out", str(out), "--checkpoint", "latest"]) == 0
    torch.testing.assert_close(_logits(out), expected, rtol=0, atol=0)

    missing = f"s3://{bucket}/runs/missing"
    assert main(["-q", "export", missing, "--out", str(tmp_path / "none")]) == 2
    assert f"{missing!r} is not a run directory" in capsys.readouterr().err
