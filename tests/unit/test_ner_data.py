"""Label alignment, prepare/caching, batch sources and word-level scoring for token classification."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from seqeval.metrics import f1_score

from distributed_ft.config import load_config
from distributed_ft.data.sources import ArrowBatchSource
from distributed_ft.tasks.token_classification import (
    IGNORE,
    TokenClassificationTask,
    align_labels,
    continuation_labels,
    encode_sentences,
    entity_metrics,
    word_tags,
)
from distributed_ft.testing import make_conll, make_tokenizer

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_hand_checked_alignment_first_subtoken(tokenizer):
    words = ["Peter", "Blackburn", "visited", "Brussels"]
    encoding = tokenizer([words], is_split_into_words=True)
    # blackburn -> black ##burn, brussels -> bru ##ss ##els
    assert encoding.tokens(0) == [
        "[CLS]",
        "peter",
        "black",
        "##burn",
        "visited",
        "bru",
        "##ss",
        "##els",
        "[SEP]",
    ]
    labels, starts = align_labels(encoding.word_ids(0), [3, 4, 0, 1], None)
    assert labels == [IGNORE, 3, 4, IGNORE, 0, 1, IGNORE, IGNORE, IGNORE]
    assert starts == [1, 2, 4, 5]


def test_hand_checked_alignment_all_subtokens(tokenizer):
    words = ["Brussels", "Blackburn"]
    encoding = tokenizer([words], is_split_into_words=True)
    labels, starts = align_labels(encoding.word_ids(0), [1, 3], continuation_labels(LABELS))
    # B-LOC continues as I-LOC, B-PER as I-PER; specials stay ignored
    assert labels == [IGNORE, 1, 2, 2, 3, 4, IGNORE]
    assert starts == [1, 4]


def test_truncation_is_counted_and_cut_words_have_no_start(tokenizer):
    table = pa.table(
        {
            "tokens": [["peter", "blackburn", "visited", "brussels"]],
            "tags": [["B-PER", "I-PER", "O", "B-LOC"]],
            "line": [7],
        }
    )
    encoded, stats = encode_sentences(
        table, tokenizer, {label: i for i, label in enumerate(LABELS)}, max_length=5
    )
    row = encoded.to_pylist()[0]
    assert row["word_starts"] == [1, 2, -1, -1]  # [CLS] peter black ##burn [SEP]
    assert row["word_labels"] == [3, 4, 0, 1]  # gold words are all kept for scoring
    assert (stats.truncated_examples, stats.truncated_words) == (1, 2)
    assert "2 words past data.max_length" in stats.describe("train")


def test_words_cut_off_are_scored_as_O():
    assert word_tags(np.array([3, 4, -1]), LABELS) == ["B-PER", "I-PER", "O"]


def _task(tmp_path, *overrides):
    config, _ = load_config(
        "ner-conll2003",
        [
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_train_samples=null",
            "data.max_eval_samples=null",
            *overrides,
        ],
    )
    return TokenClassificationTask(config)


def test_prepare_is_cached_and_fingerprint_covers_inputs(tmp_path, tokenizer):
    train = make_conll(tmp_path / "train.conll", 50, seed=1)
    valid = make_conll(tmp_path / "valid.conll", 20, seed=2)
    splits = {"train": str(train), "validation": str(valid)}
    first = _task(tmp_path).prepare_data(tokenizer, splits)
    assert not first.reused
    again = _task(tmp_path).prepare_data(tokenizer, splits)
    assert again.reused and again.directory == first.directory
    longer = _task(tmp_path, "data.max_length=32").prepare_data(tokenizer, splits)
    assert longer.directory != first.directory
    make_conll(train, 50, seed=9)  # same name, new content
    edited = _task(tmp_path).prepare_data(tokenizer, splits)
    assert edited.directory not in (first.directory, longer.directory)
    manifest = (first.directory / "manifest.json").read_text()
    assert '"labels"' in manifest and "train-00000.parquet" in manifest
    assert first.splits["train"].read().num_rows == 50


def test_validation_tag_outside_train_labels_names_file_and_line(tmp_path, tokenizer):
    train = tmp_path / "train.conll"
    train.write_text("John B-PER\nsaid O\n")
    valid = tmp_path / "valid.conll"
    valid.write_text("Paris B-LOC\n")
    with pytest.raises(Exception, match=r"valid.conll:1.*B-LOC"):
        _task(tmp_path).prepare_data(tokenizer, {"train": str(train), "validation": str(valid)})


def _lengths_table(n: int, seed: int = 0) -> pa.Table:
    lengths = np.random.default_rng(seed).integers(3, 60, n)
    return pa.table({"example_id": np.arange(n), "length": lengths.astype(np.int32)})


def _ids(rows):
    return {"ids": [int(r["example_id"]) for r in rows], "lengths": [int(r["length"]) for r in rows]}


def test_length_grouping_cuts_padding():
    table = _lengths_table(2000)

    def padding(group: bool) -> float:
        source = ArrowBatchSource(table, _ids, 16, shuffle=True, group_by_length=group, seed=3)
        padded = real = 0
        for batch in source:
            padded += max(batch["lengths"]) * len(batch["lengths"])
            real += sum(batch["lengths"])
        return real / padded

    assert padding(True) > 0.9 > 0.7 > padding(False)


def test_epoch_order_is_deterministic_and_changes_per_epoch():
    table = _lengths_table(300)
    a = ArrowBatchSource(table, _ids, 8, shuffle=True, seed=1)
    b = ArrowBatchSource(table, _ids, 8, shuffle=True, seed=1)
    assert [x["ids"] for x in a] == [x["ids"] for x in b]
    a.set_epoch(1)
    b.set_epoch(0)
    b.load_state_dict({"epoch": 0, "position": 0})
    assert [x["ids"] for x in a] != [x["ids"] for x in b]


def test_resume_skips_exactly_the_consumed_batches():
    table = _lengths_table(300)
    straight = ArrowBatchSource(table, _ids, 8, shuffle=True, seed=5)
    straight.set_epoch(2)
    expected = [x["ids"] for x in straight]
    first = ArrowBatchSource(table, _ids, 8, shuffle=True, seed=5)
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it)["ids"] for _ in range(7)]
    resumed = ArrowBatchSource(table, _ids, 8, shuffle=True, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert seen + [x["ids"] for x in resumed] == expected


@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_take_disjoint_batches(shuffle):
    table = _lengths_table(203)
    world = 2
    per_rank = [
        [
            i
            for batch in ArrowBatchSource(
                table, _ids, 8, shuffle=shuffle, rank=r, world_size=world, even_batches=shuffle
            )
            for i in batch["ids"]
        ]
        for r in range(world)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    covered = set(per_rank[0]) | set(per_rank[1])
    if shuffle:  # training: equal batch counts, the remainder batch is left out and reported
        source = ArrowBatchSource(table, _ids, 8, shuffle=True, rank=0, world_size=world)
        assert len(covered) + source.dropped_examples == 203
    else:  # evaluation: every example exactly once
        assert covered == set(range(203))


def test_entity_metrics_match_seqeval_and_strict_mode_differs():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    y_pred = [["B-PER", "I-PER", "O", "O"], ["O", "I-ORG", "I-ORG"]]
    default = entity_metrics(y_true, y_pred)
    assert default["f1"] == pytest.approx(f1_score(y_true, y_pred))
    assert default["per_type"]["LOC"]["recall"] == 0.0
    assert default["token_accuracy"] == pytest.approx(5 / 7)
    strict = entity_metrics(y_true, y_pred, "strict")
    assert strict["f1"] < default["f1"]  # "I-ORG I-ORG" is an entity only in default (conlleval) mode


def test_collate_pads_dynamically(tmp_path):
    task = _task(tmp_path)
    rows = [
        {
            "input_ids": np.array([2, 5, 3]),
            "labels": np.array([-100, 1, -100]),
            "example_id": 0,
            "word_starts": np.array([1]),
        },
        {
            "input_ids": np.array([2, 5, 6, 7, 3]),
            "labels": np.array([-100, 1, 0, 0, -100]),
            "example_id": 1,
            "word_starts": np.array([1, 2, 3]),
        },
    ]
    batch = task.collate(rows)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [-100, 1, -100, -100, -100]
    assert batch["labels"].is_contiguous()


def test_prefetching_counts_only_the_batches_handed_out():
    table = _lengths_table(300)
    plain = ArrowBatchSource(table, _ids, 8, shuffle=True, seed=5)
    expected = [x["ids"] for x in plain]
    ahead = ArrowBatchSource(table, _ids, 8, shuffle=True, seed=5, prefetch=2)
    it = iter(ahead)
    seen = [next(it)["ids"] for _ in range(5)]
    assert ahead.state_dict()["position"] == 5  # the two batches waiting in the queue do not count
    it.close()  # an epoch left early: the producer thread stops
    resumed = ArrowBatchSource(table, _ids, 8, shuffle=True, seed=5, prefetch=2)
    resumed.load_state_dict(ahead.state_dict())
    assert seen + [x["ids"] for x in resumed] == expected
    import threading

    assert not [t for t in threading.enumerate() if t.name == "dft-prefetch" and t.is_alive()]


def test_prefetching_reraises_a_collate_error_in_the_consumer():
    def broken(rows):
        raise ValueError("bad row")

    source = ArrowBatchSource(_lengths_table(40), broken, 8, shuffle=False, prefetch=2)
    with pytest.raises(ValueError, match="bad row"):
        list(source)


def test_a_late_publisher_of_the_same_key_keeps_the_complete_cache(tmp_path):
    """A preparer whose lock was broken (presumed dead) may still publish: a complete cache survives it."""
    import json

    import pyarrow.parquet as pq

    from distributed_ft.data.prepare import MANIFEST, _publish, load_manifest

    def staged(name: str) -> Path:
        staging = tmp_path / f".key-{name}"
        staging.mkdir()
        pq.write_table(pa.table({"example_id": np.arange(10)}), staging / "train-00000.parquet")
        split = {"shards": ["train-00000.parquet"], "rows": [10], "stats": {"examples": 10}}
        (staging / MANIFEST).write_text(json.dumps({"labels": ["O"], "splits": {"train": split}}))
        return staging

    (tmp_path / "key").mkdir()  # an incomplete leftover of a killed run is replaced
    _publish(staged("a"), tmp_path / "key")
    first = [p.stat().st_ino for p in load_manifest(tmp_path / "key").splits["train"].shards]
    _publish(staged("b"), tmp_path / "key")
    survivor = load_manifest(tmp_path / "key")
    assert [p.stat().st_ino for p in survivor.splits["train"].shards] == first
    assert survivor.splits["train"].rows == [10]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".key-stale")]
