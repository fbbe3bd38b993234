"""Augmentation (``data.augment.*``): deterministic, label-preserving, valid IOB2, training split only."""

import json
import logging
from collections import Counter

import pyarrow as pa
import pytest

from distributed_ft.cli import main
from distributed_ft.config import load_config
from distributed_ft.config.schema import TextAugmentConfig, TokenAugmentConfig
from distributed_ft.data import readers
from distributed_ft.data.augment import augment_sentences, augment_texts, mentions
from distributed_ft.errors import ConfigError
from distributed_ft.runtime.context import LocalContext
from distributed_ft.tasks.classification_data import DEFAULT_MARKERS, check_markers
from distributed_ft.tasks.token_classification import TokenClassificationTask
from distributed_ft.testing import make_tokenizer
from distributed_ft.train.job import prepare_data_once


@pytest.fixture(scope="module")
def sentences(tiny_conll_train) -> pa.Table:
    return tiny_conll_train


def _rows(table: pa.Table) -> list[tuple[list[str], list[str]]]:
    return list(zip(table.column("tokens").to_pylist(), table.column("tags").to_pylist(), strict=True))


def _valid_iob2(tags: list[str], labels: set[str]) -> bool:
    previous = "O"
    for tag in tags:
        if tag not in labels:
            return False
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            return False
        previous = tag
    return True


def _mentions_of(table: pa.Table) -> set[tuple[str, tuple[str, ...]]]:
    return {(kind, tuple(words[s:e])) for words, tags in _rows(table) for kind, s, e in mentions(tags)}


def test_every_augmented_ner_example_is_valid_iob2_and_label_preserving(sentences):
    config = TokenAugmentConfig(multiplier=2, mention_replace=0.5, token_substitute=0.3)
    out, stats = augment_sentences(sentences, config, seed=42)
    n = sentences.num_rows
    assert out.num_rows == 3 * n and stats.augmented == 2 * n
    assert out.slice(0, n).equals(sentences)  # the originals first, unchanged
    labels = set(readers.label_list(sentences))
    original = _rows(sentences)
    for row, (words, tags) in enumerate(_rows(out.slice(n))):
        assert len(words) == len(tags) and _valid_iob2(tags, labels)
        _, source_tags = original[row % n]
        # the same entity types in the same order: mentions are replaced within their type only
        assert [m[0] for m in mentions(tags)] == [m[0] for m in mentions(source_tags)]
    assert out.slice(n).column("line").to_pylist() == sentences.column("line").to_pylist() * 2
    assert stats.operations["mention_replacements"] > 0 and stats.operations["token_substitutions"] > 0
    changed = sum(a != b for a, b in zip(_rows(out.slice(n)), original * 2, strict=True))
    assert changed > n  # most copies differ from their original


def test_mention_replacement_uses_only_mentions_of_the_same_type_from_the_training_split(sentences):
    out, stats = augment_sentences(
        sentences, TokenAugmentConfig(multiplier=1, mention_replace=1.0, token_substitute=0.0), seed=3
    )
    known = _mentions_of(sentences)
    n = sentences.num_rows
    replaced = 0
    for (words, tags), (old_words, old_tags) in zip(_rows(out.slice(n)), _rows(sentences), strict=True):
        new_mentions = [(k, tuple(words[s:e])) for k, s, e in mentions(tags)]
        old_mentions = [(k, tuple(old_words[s:e])) for k, s, e in mentions(old_tags)]
        assert set(new_mentions) <= known
        # each mention was swapped for another of its type (every type has several distinct mentions)
        assert all(new != old for new, old in zip(new_mentions, old_mentions, strict=True))
        replaced += len(new_mentions)
        outside = [(w, t) for w, t in zip(words, tags, strict=True) if t == "O"]
        assert outside == [(w, t) for w, t in zip(old_words, old_tags, strict=True) if t == "O"]
    assert stats.operations == {"mention_replacements": replaced, "token_substitutions": 0}


def test_token_substitution_keeps_every_tag_and_uses_words_seen_with_it(sentences):
    out, stats = augment_sentences(
        sentences, TokenAugmentConfig(multiplier=1, mention_replace=0.0, token_substitute=1.0), seed=5
    )
    seen = {(w, t) for words, tags in _rows(sentences) for w, t in zip(words, tags, strict=True)}
    n = sentences.num_rows
    assert out.slice(n).column("tags").equals(sentences.column("tags"))
    pairs = [(w, t) for words, tags in _rows(out.slice(n)) for w, t in zip(words, tags, strict=True)]
    assert set(pairs) <= seen
    assert stats.operations["token_substitutions"] == len(pairs)  # every tag has several distinct words


def test_augmentation_is_deterministic_by_seed(sentences):
    config = TokenAugmentConfig(multiplier=1)
    assert augment_sentences(sentences, config, 1)[0].equals(augment_sentences(sentences, config, 1)[0])
    assert not augment_sentences(sentences, config, 1)[0].equals(augment_sentences(sentences, config, 2)[0])
    texts = _texts(30)
    noise = TextAugmentConfig(multiplier=2, token_noise=0.3)
    assert augment_texts(texts, noise, 1)[0].equals(augment_texts(texts, noise, 1)[0])
    assert not augment_texts(texts, noise, 1)[0].equals(augment_texts(texts, noise, 2)[0])


def _texts(n: int, markers: bool = False) -> pa.Table:
    words = ["good", "bad", "movie", "plot", "actors", "really", "quite", "the", "was", "and"]
    texts = []
    for i in range(n):
        body = [words[(i * 3 + j) % len(words)] for j in range(4 + i % 5)]
        if markers:
            body = ["[E1]", body[0], "[/E1]", *body[1:-1], "[E2]", body[-1], "[/E2]"]
        texts.append(" ".join(body))
    labels = [["pos" if i % 2 else "neg"] for i in range(n)]
    return pa.table(
        {"text": texts, "labels": pa.array(labels, pa.list_(pa.string())), "line": range(1, n + 1)}
    )


def test_text_noise_keeps_labels_and_markers_and_draws_words_from_the_training_texts():
    table = _texts(40, markers=True)
    out, stats = augment_texts(table, TextAugmentConfig(multiplier=2, token_noise=0.4), 0, DEFAULT_MARKERS)
    n = table.num_rows
    assert out.num_rows == 3 * n and out.slice(0, n).equals(table)
    assert out.slice(n).column("labels").to_pylist() == table.column("labels").to_pylist() * 2
    vocabulary = {w for text in table.column("text").to_pylist() for w in text.split()}
    for text in out.slice(n).column("text").to_pylist():
        check_markers(text, list(DEFAULT_MARKERS), "augmented")  # each marker once, in order
        assert set(text.split()) <= vocabulary
    assert all(stats.operations[op] > 0 for op in ("swaps", "deletions", "substitutions"))
    assert stats.describe("examples").startswith(f"augment: {n} -> {3 * n} training examples")


def _ner_task(tiny_conll, tmp_path, *overrides):
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


def test_prepared_augmentation_is_cached_keyed_logged_and_leaves_dev_test_alone(tiny_conll, tmp_path, caplog):
    tokenizer = make_tokenizer()
    plain_task, splits = _ner_task(tiny_conll, tmp_path)
    plain = plain_task.prepare_data(tokenizer, splits)
    keys = ["data.shots_per_label=3", "data.augment.multiplier=2"]
    task, _ = _ner_task(tiny_conll, tmp_path, *keys)
    with caplog.at_level(logging.INFO, logger="distributed_ft"):
        prepared = prepare_data_once(task, tokenizer, splits, None, LocalContext())
    train = prepared.splits["train"].read()
    shots = prepared.meta["training_set"][0]
    selected = int(shots.split(": ")[1].split(" of ")[0])
    assert train.num_rows == 3 * selected == prepared.splits["train"].stats.examples
    for split in ("validation", "test"):
        assert prepared.splits[split].read().equals(plain.splits[split].read())
    augmented = prepared.meta["training_set"][1]
    assert augmented.startswith(f"augment: {selected} -> {3 * selected} training sentences")
    assert "mention replacements" in augmented and "token substitutions" in augmented
    assert f"train: {shots}" in caplog.text and f"train: {augmented}" in caplog.text
    again, _ = _ner_task(tiny_conll, tmp_path, *keys)
    cached = again.prepare_data(tokenizer, splits)
    assert cached.reused and cached.directory == prepared.directory
    variants = [
        (),
        ("data.augment.multiplier=1",),
        ("data.augment.multiplier=1", "data.augment.mention_replace=0.2"),
        ("data.augment.multiplier=1", "data.augment.token_substitute=0.3"),
        ("data.augment.multiplier=1", "train.seed=7"),
    ]
    found = {_ner_task(tiny_conll, tmp_path, *over)[0].cache_key(tokenizer, splits) for over in variants}
    assert len(found) == len(variants)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.augment.token_noise=0.2"], "data.augment.token_noise does not apply to this task"),
        (["data.augment.multiplier=-1"], "data.augment.multiplier"),
        (["data.augment.mention_replace=1.5"], "data.augment.mention_replace"),
        (
            [
                "data.augment.multiplier=1",
                "data.augment.mention_replace=0",
                "data.augment.token_substitute=0",
            ],
            "with every operation at 0 would only copy examples",
        ),
        (["data.augment.colour=1"], "unknown config key 'data.augment.colour'"),
    ],
)
def test_ner_augment_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_classification_augment_keys_refuse_ner_ones_and_round_trip():
    with pytest.raises(
        ConfigError, match=r"data\.augment\.mention_replace does not apply to this task: it is "
    ):
        load_config("text-classification", ["data.augment.mention_replace=0.2"])
    with pytest.raises(
        ConfigError, match=r"data\.augment is a token_classification / sequence_classification"
    ):
        load_config(None, ["task=causal_lm", "data.augment.multiplier=1"])
    config, _ = load_config(
        "text-classification", ["data.augment.multiplier=2", "data.augment.token_noise=0.2"]
    )
    assert (config.data.augment.multiplier, config.data.augment.token_noise) == (2, 0.2)
    assert type(config).model_validate(config.model_dump()).data.augment == config.data.augment


def test_a_tiny_train_run_with_few_shot_and_augmentation(tiny_job, tmp_path, one_torch_thread):
    overrides = [*tiny_job, "data.shots_per_label=3", "data.augment.multiplier=1", "train.epochs=2"]
    assert main(["-q", "train", "ner-conll2003", *overrides]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"dev", "test"} <= set(results) and "f1" in results["test"]
    (manifest,) = (tmp_path / "cache").glob("*/manifest.json")
    manifest = json.loads(manifest.read_text())
    shots, augmented = manifest["meta"]["training_set"]
    selected = int(shots.split(": ")[1].split(" of ")[0])
    assert manifest["splits"]["train"]["stats"]["examples"] == 2 * selected
    assert augmented.startswith(f"augment: {selected} -> {2 * selected} training sentences")
    assert manifest["splits"]["test"]["stats"]["examples"] == 60
    steps = [e for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert Counter("loss" in e for e in steps)[True] >= 1


def test_classification_task_prepares_noised_copies_of_the_training_split_only(tiny_bert, tmp_path):
    from distributed_ft.config.load import validate
    from distributed_ft.tasks.sequence_classification import SequenceClassificationTask

    table = _texts(24, markers=True)
    paths = {}
    for split, n in (("train", 24), ("validation", 8)):
        rows = table.slice(0, n)
        texts, labels = rows.column("text").to_pylist(), rows.column("labels").to_pylist()
        records = [{"text": t, "label": ls[0]} for t, ls in zip(texts, labels, strict=True)]
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {
        "task": "sequence_classification",
        "model": {"name": str(tiny_bert)},
        "data": {
            "cache_dir": str(tmp_path / "cache"),
            "max_length": 32,
            "entity_markers": True,
            "augment": {"multiplier": 2, "token_noise": 0.3},
        },
    }
    prepared = SequenceClassificationTask(validate(raw)).prepare_data(
        make_tokenizer(), {s: str(p) for s, p in paths.items()}
    )
    train = prepared.splits["train"].read()
    assert train.num_rows == 72 and prepared.splits["validation"].read().num_rows == 8
    labels = train.column("label_ids").to_pylist()
    assert labels[24:48] == labels[:24] and labels[48:] == labels[:24]  # copies keep their labels
    assert prepared.meta["training_set"][0].startswith("augment: 24 -> 72 training examples")
