"""Shared fixtures: a tiny BERT, a tiny Llama and a tiny CoNLL corpus, built by ``distributed_ft.testing``."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed_ft.testing import make_conll, make_tiny_bert, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_conll(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conll")
    return {
        "train": make_conll(root / "train.conll", 240, seed=1),
        "validation": make_conll(root / "valid.conll", 60, seed=2),
        "test": make_conll(root / "test.conll", 60, seed=3),
    }


@pytest.fixture
def tiny_job(tiny_bert, tiny_conll, tmp_path) -> list[str]:
    """Overrides for a fast NER job on the tiny model and corpus (a packaged recipe underneath)."""
    return [
        f"model.name={tiny_bert}",
        f"data.train={tiny_conll['train']}",
        f"data.validation={tiny_conll['validation']}",
        f"data.test={tiny_conll['test']}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        f"run.output_dir={tmp_path / 'run'}",
        "run.progress=false",
        "train.epochs=3",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.log_every=1",
    ]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
