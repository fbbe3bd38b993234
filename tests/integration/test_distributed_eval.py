"""Evaluation on 2 processes scores every example exactly once: the same metrics as on 1 process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import mp_helpers

from distributed_ft.cli import main
from distributed_ft.runtime.context import LocalContext
from distributed_ft.train.predict import evaluate_model

# 60 test sentences in batches of 7: 9 batches, 5 on rank 0 and 4 on rank 1 (the uneven case).
EVAL = ["eval.batch_size=7", "run.progress=false"]


@pytest.mark.multiproc
def test_two_process_evaluation_equals_one_process(tmp_path, tiny_bert, tiny_conll):
    args = mp_helpers.job_overrides(tiny_bert, tiny_conll, tmp_path, "train.max_steps=20")
    assert main(["-q", "train", *args]) == 0  # one process, torch engine: weights to evaluate
    run_dir = tmp_path / "run"

    single = evaluate_model(str(run_dir), EVAL, LocalContext())
    done = mp_helpers.torchrun(["evaluate", str(run_dir), *EVAL, "--json"])
    print(f"2-process dft evaluate took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)
    double = json.loads(done.stdout[done.stdout.index("{") :])

    assert single["entities"] > 0 and single["f1"] > 0  # trained enough to predict some entities
    loss = double.pop("loss")
    assert loss == pytest.approx(single.pop("loss"), rel=1e-6)
    assert double == json.loads(json.dumps(single))  # every other metric identical, per type included
