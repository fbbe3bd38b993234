"""What a new user types in their first hour, on tiny local models and data, through ``dft`` in-process.

A sequence classification job on the default recipe with no metric given, a fine-tuned NER model moved to
another label set, and a DeepSpeed key beside an explicit torch engine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from distributed_ft.cli import main
from distributed_ft.testing import ENTITY_WORDS, FILLER

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _csv(path: Path, rows: int, seed: int) -> Path:
    """``text,label``: the label is the kind of the entity word in the text."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(rows):
        label = rng.choice(["LOC", "ORG", "PER"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words.insert(0, rng.choice(ENTITY_WORDS[label]))
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _sizing(tmp: Path) -> list[str]:
    return [
        f"data.cache_dir={tmp / 'cache'}",
        f"run.output_dir={tmp / 'run'}",
        "data.max_length=32",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "train.lr=3e-3",
        "train.batch_size=16",
        "train.log_every=5",
    ]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_the_readme_sequence_classification_command_needs_no_metric(tiny_bert, tmp_path, capsys):
    """``dft train task=sequence_classification ... data.text_column=text data.label_column=label``."""
    files = {split: _csv(tmp_path / f"{split}.csv", n, i) for i, (split, n) in enumerate(
        [("train", 240), ("dev", 45), ("test", 45)]
    )}  # fmt: skip
    command = [
        "-q",
        "train",
        "task=sequence_classification",
        f"model.name={tiny_bert}",
        f"data.train={files['train']}",
        f"data.validation={files['dev']}",
        f"data.test={files['test']}",
        "data.text_column=text",
        "data.label_column=label",
        *_sizing(tmp_path),
        "train.epochs=4",
    ]
    assert main(command) == 0
    run_dir = tmp_path / "run"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["metric"] == "macro_f1"
    results = _results(run_dir)
    for split in ("dev", "test"):
        assert {"accuracy", "macro_f1"} <= set(results[split])
        assert set(results[split]["per_class"]) == {"LOC", "ORG", "PER"}
    assert results["dev"]["macro_f1"] > 0.6
    out = capsys.readouterr().out
    assert "test set:" in out and "accuracy" in out


@pytest.fixture
def ner9(tiny_bert, tmp_path) -> Path:
    """A tiny BERT fine-tuned elsewhere with a 9-label head (CoNLL-2003's label set)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    labels = ["O", *(f"{p}-{t}" for t in ("PER", "LOC", "ORG", "MISC") for p in "BI")]
    model = AutoModelForTokenClassification.from_pretrained(
        str(tiny_bert),
        num_labels=9,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model.save_pretrained(tmp_path / "ner9")
    AutoTokenizer.from_pretrained(str(tiny_bert)).save_pretrained(tmp_path / "ner9")
    return tmp_path / "ner9"


def test_a_fine_tuned_ner_model_moves_to_a_new_label_set(ner9, tiny_conll, tmp_path, capsys):
    job = [
        "-q",
        "train",
        "ner-conll2003",
        f"model.name={ner9}",
        f"data.train={tiny_conll['train']}",
        f"data.validation={tiny_conll['validation']}",
        *_sizing(tmp_path),
        "train.max_steps=4",
    ]
    assert main([*job, "model.reset_head=false"]) == 2
    err = capsys.readouterr().err
    assert f"model {ner9} has a 9-label token-classification head; this job has" in err
    assert "set model.reset_head=auto to replace it" in err and "ignore_mismatched_sizes" not in err
    assert main(job) == 0  # auto: the head is replaced
    results = _results(tmp_path / "run")
    assert "test" not in results  # the recipe's CoNLL-2003 test file went with its training file
    exported = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert len(exported["id2label"]) == len(json.loads((tmp_path / "run" / "labels.json").read_text())) < 9


def test_a_deepspeed_key_beside_run_engine_torch_stops_before_training(capsys):
    assert main(["-q", "train", "deepspeed.zero_stage=3", "run.engine=torch"]) == 2
    err = capsys.readouterr().err
    assert "deepspeed.zero_stage=3 is set but run.engine=torch: drop one, or set run.engine=deepspeed" in err


def test_rerunning_into_a_finished_run_is_refused_and_keeps_its_results(tiny_job, capsys):
    assert main(["-q", "train", *tiny_job, "train.epochs=1"]) == 0
    run_dir = Path(next(o for o in tiny_job if o.startswith("run.output_dir=")).split("=", 1)[1])
    kept = {p: p.read_bytes() for p in (run_dir / "results.json", run_dir / "config.yaml")}
    capsys.readouterr()
    assert main(["-q", "train", *tiny_job, "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run (results.json)" in err and "Traceback" not in err
    assert all(path.read_bytes() == data for path, data in kept.items())
