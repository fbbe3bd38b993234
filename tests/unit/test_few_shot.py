"""Few-shot selection (``data.shots_per_label``): exactly k per label, deterministic, training split only."""

import json
import re
from collections import Counter

import pyarrow as pa
import pytest

from distributed_ft.config import load_config
from distributed_ft.config.load import validate
from distributed_ft.data import readers
from distributed_ft.data.few_shot import entity_types, few_shot_examples, few_shot_sentences, select_shots
from distributed_ft.errors import ConfigError, DataError
from distributed_ft.tasks.sequence_classification import SequenceClassificationTask
from distributed_ft.tasks.token_classification import TokenClassificationTask
from distributed_ft.testing import make_tokenizer


@pytest.fixture(scope="module")
def sentences(tiny_conll_train) -> pa.Table:
    return tiny_conll_train


def _types_per_sentence(table: pa.Table) -> Counter:
    return Counter(kind for tags in table.column("tags").to_pylist() for kind in entity_types(tags))


def _class_table(counts: dict[str, int], multi: bool = False) -> pa.Table:
    labels = [[label] for label, n in counts.items() for _ in range(n)]
    texts = [f"text {i}" for i in range(len(labels))]
    return pa.table(
        {"text": texts, "labels": pa.array(labels, pa.list_(pa.string())), "line": range(1, len(texts) + 1)}
    )


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ner_selection_has_exactly_k_sentences_per_entity_type(sentences, k):
    chosen, note = few_shot_sentences(sentences, k, seed=42)
    assert _types_per_sentence(chosen) == dict.fromkeys(["LOC", "ORG", "PER"], k)
    assert all(entity_types(tags) for tags in chosen.column("tags").to_pylist())  # no entity-less sentence
    lines = chosen.column("line").to_pylist()
    assert lines == sorted(set(lines))  # distinct rows of the split, in the split's order
    assert set(lines) <= set(sentences.column("line").to_pylist())
    assert note == f"data.shots_per_label={k}: {chosen.num_rows} of 240 training sentences"


def test_classification_selection_has_exactly_k_examples_per_class():
    table = _class_table({"neg": 30, "pos": 9, "neutral": 4})
    chosen, note = few_shot_examples(table, 4, seed=7)
    assert Counter(label for labels in chosen.column("labels").to_pylist() for label in labels) == {
        "neg": 4,
        "pos": 4,
        "neutral": 4,
    }
    assert note == "data.shots_per_label=4: 12 of 43 training examples"


def test_co_occurrence_that_forces_a_label_past_k_is_reported():
    # every example carries two labels: after the first pick one of C's examples must overfill A or B
    selection = select_shots([["A", "B"], ["A", "C"], ["B", "C"]], 1, seed=0, unit="examples", what="class")
    assert all(n >= 1 for n in selection.counts.values())
    assert len(selection.over) == 1 and set(selection.over.values()) == {2}
    table = pa.table({"labels": [["A", "B"], ["A", "C"], ["B", "C"]]})
    assert re.search(r"co-occurrence put some labels past 1: [ABC] in 2\)", few_shot_examples(table, 1, 0)[1])


def test_too_few_examples_of_a_label_is_an_error_naming_it_and_its_count(sentences):
    with pytest.raises(DataError, match=r"class 'neutral' has only 4 training examples; lower"):
        few_shot_examples(_class_table({"neg": 30, "neutral": 4}), 5, seed=0)
    per_type = _types_per_sentence(sentences)
    rarest = min(per_type, key=per_type.get)
    with pytest.raises(
        DataError, match=rf"entity type '{rarest}' has only {per_type[rarest]} training sentences"
    ):
        few_shot_sentences(sentences, per_type[rarest] + 1, seed=0)


def test_selection_is_deterministic_by_seed(sentences):
    rows = {seed: few_shot_sentences(sentences, 3, seed)[0].column("line").to_pylist() for seed in (1, 2)}
    assert few_shot_sentences(sentences, 3, 1)[0].column("line").to_pylist() == rows[1]
    assert rows[1] != rows[2]
    table = _class_table({"neg": 30, "pos": 30})
    assert few_shot_examples(table, 5, 3)[0].equals(few_shot_examples(table, 5, 3)[0])
    assert not few_shot_examples(table, 5, 3)[0].equals(few_shot_examples(table, 5, 4)[0])


def _ner_task(tiny_conll, tmp_path, *overrides) -> tuple[TokenClassificationTask, dict[str, str]]:
    config, _ = load_config(
        "ner-conll2003",
        [
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_train_samples=null",
            "data.max_eval_samples=null",
            *overrides,
        ],
    )
    return TokenClassificationTask(config), {s: str(tiny_conll[s]) for s in ("train", "validation", "test")}


def test_ner_task_prepares_k_shot_training_split_only_and_keys_the_cache(tiny_conll, tmp_path):
    tokenizer = make_tokenizer()
    plain_task, splits = _ner_task(tiny_conll, tmp_path)
    plain = plain_task.prepare_data(tokenizer, splits)
    task, _ = _ner_task(tiny_conll, tmp_path, "data.shots_per_label=2")
    shots = task.prepare_data(tokenizer, splits)
    assert shots.directory != plain.directory and not shots.reused
    expected, note = few_shot_sentences(readers.read_token_tags(splits["train"]), 2, seed=42)
    assert shots.splits["train"].read().column("line").to_pylist() == expected.column("line").to_pylist()
    assert shots.meta["training_set"] == [note]
    for split in ("validation", "test"):  # untouched
        assert shots.splits[split].read().equals(plain.splits[split].read())
    assert shots.labels == plain.labels  # fixed from the whole training split
    again, _ = _ner_task(tiny_conll, tmp_path, "data.shots_per_label=2")
    assert again.prepare_data(tokenizer, splits).reused
    keys = {
        over: _ner_task(tiny_conll, tmp_path, *over)[0].cache_key(tokenizer, splits)
        for over in [
            (),
            ("data.shots_per_label=2",),
            ("data.shots_per_label=3",),
            ("data.shots_per_label=2", "train.seed=1"),
        ]
    }
    assert len(set(keys.values())) == 4
    # without few-shot/augmentation the seed is no part of the key (existing caches stay valid)
    assert _ner_task(tiny_conll, tmp_path, "train.seed=1")[0].cache_key(tokenizer, splits) == keys[()]


def test_classification_task_prepares_k_shot_training_split(tiny_bert, tmp_path):
    def write(name, n):
        path = tmp_path / name
        records = [{"text": f"word{i % 7} text {i}", "label": ["a", "b", "c"][i % 3]} for i in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    splits = {"train": write("train.jsonl", 60), "validation": write("dev.jsonl", 12)}
    raw = {
        "task": "sequence_classification",
        "model": {"name": str(tiny_bert)},
        "data": {"cache_dir": str(tmp_path / "cache"), "max_length": 32, "shots_per_label": 4},
    }
    task = SequenceClassificationTask(validate(raw))
    tokenizer = make_tokenizer()
    prepared = task.prepare_data(tokenizer, splits)
    train = prepared.splits["train"].read()
    assert Counter(ids[0] for ids in train.column("label_ids").to_pylist()) == {0: 4, 1: 4, 2: 4}
    assert prepared.splits["validation"].read().num_rows == 12
    assert prepared.meta["training_set"] == ["data.shots_per_label=4: 12 of 60 training examples"]


def test_shots_per_label_is_validated_and_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="shots_per_label"):
        load_config(None, ["data.shots_per_label=0"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["task=causal_lm", "data.shots_per_label=4"])
    assert str(info.value) == (
        "data.shots_per_label is a token_classification / sequence_classification key, but this job's "
        "task is causal_lm: drop it, or set task=token_classification or task=sequence_classification"
    )
    config, _ = load_config("text-classification", ["data.shots_per_label=4"])
    assert config.data.shots_per_label == 4
