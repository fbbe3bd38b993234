"""Gazetteer fusion (``data.gazetteer``): parsing, matching, sub-word alignment, the builder, a tiny run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed_ft.cli import main
from distributed_ft.config import load_config
from distributed_ft.data.gazetteer import COLUMN, align_features, collect_mentions, load_gazetteer
from distributed_ft.errors import ConfigError, DataError
from distributed_ft.modeling import crf, gazetteer
from distributed_ft.modeling.build import load_trained
from distributed_ft.tasks.token_classification import TokenClassificationTask, encode_sentences
from distributed_ft.testing import make_tokenizer

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def _write(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def places(tmp_path):
    return _write(
        tmp_path / "places.tsv",
        "# a comment",
        "new york\tLOC",
        "",
        "new york city\tLOC",
        "york\tLOC",
        "peter blackburn\tPER",
        "b c\tORG",
        "a b\tORG",
    )


# --------------------------------------------------------------------------- the file
def test_parsing_skips_comments_and_blank_lines_and_sorts_types(places):
    found = load_gazetteer(places)
    assert found.types == ("LOC", "ORG", "PER")
    assert found.num_features == 7
    assert found.feature_names() == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert found.entries[("new", "york", "city")] == 0
    assert found.entries[("peter", "blackburn")] == 2
    assert len(found.entries) == 6 and found.longest == 3
    assert len(found.digest) == 64


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["paris\tLOC", "london LOC"], r"bad\.tsv:2: expected 'surface<TAB>TYPE'"),
        (["paris\tLOC", "", "x\tLOC\tY"], r"bad\.tsv:3: expected"),
        (["\tLOC"], r"bad\.tsv:1: expected"),
        (["paris\tthe LOC"], r"bad\.tsv:1: expected"),
        (["paris\tLOC", "# x", "paris\tORG"], r"bad\.tsv:3: 'paris' is ORG here but LOC at line 1"),
        (["# only a comment", ""], r"no 'surface<TAB>TYPE' entries; build one with `dft data gazetteer`"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, expected):
    with pytest.raises(DataError, match=expected):
        load_gazetteer(_write(tmp_path / "bad.tsv", *lines))


def test_a_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read it"):
        load_gazetteer(tmp_path / "nope.tsv")


def test_lowercase_matching_and_case_variants(tmp_path):
    path = _write(tmp_path / "g.tsv", "Paris\tLOC", "PARIS\tORG", "Anna\tPER")
    with pytest.raises(DataError, match="keep one type per surface"):
        load_gazetteer(_write(tmp_path / "dup.tsv", "Paris\tLOC", "Paris\tORG"))
    exact = load_gazetteer(path)
    assert exact.word_features(["Paris", "paris", "PARIS"]) == [1, 0, 3]
    folded = load_gazetteer(path, lowercase=True)  # the first of the case variants wins
    assert folded.word_features(["Paris", "paris", "PARIS", "anna"]) == [1, 1, 1, 5]


# --------------------------------------------------------------------------- matching
def test_longest_match_first_non_overlapping_left_to_right(places):
    found = load_gazetteer(places)
    b_loc, i_loc, b_org, i_org, b_per, i_per = range(1, 7)
    words = ["in", "new", "york", "city", "and", "new", "york", "peter", "blackburn", "york"]
    assert found.word_features(words) == [0, b_loc, i_loc, i_loc, 0, b_loc, i_loc, b_per, i_per, b_loc]
    # "a b" and "b c" overlap on "a b c": the left one is taken, "c" alone matches nothing
    assert found.word_features(["a", "b", "c"]) == [b_org, i_org, 0]
    assert found.word_features(["x", "b", "c"]) == [0, b_org, i_org]
    assert found.word_features([]) == []
    assert found.word_features(["york", "york"]) == [b_loc, b_loc]  # adjacent matches both start with B


# --------------------------------------------------------------------------- sub-word alignment
def test_features_line_up_with_the_subword_alignment(places):
    tokenizer, found = make_tokenizer(), load_gazetteer(places)
    words = ["peter", "blackburn", "visited", "new", "york"]
    table = pa.table({"tokens": [words], "tags": [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]], "line": [1]})
    label2id = {label: i for i, label in enumerate(LABELS)}
    prepared, _ = encode_sentences(table, tokenizer, label2id, 64, gazetteer=found)
    row = prepared.to_pylist()[0]
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert tokens == ["[CLS]", "peter", "black", "##burn", "visited", "n", "##e", "##w", "york", "[SEP]"]
    b_loc, i_loc, b_per, i_per = 1, 2, 5, 6
    # every sub-token of a word carries the word's feature (##burn, ##e, ##w too); the specials 0
    assert row[COLUMN] == [0, b_per, i_per, i_per, 0, b_loc, b_loc, b_loc, i_loc, 0]
    assert [row[COLUMN][s] for s in row["word_starts"]] == found.word_features(words)
    assert len(row[COLUMN]) == len(row["labels"]) == len(row["input_ids"])


def test_truncation_cuts_features_exactly_where_it_cuts_labels(places):
    tokenizer, found = make_tokenizer(), load_gazetteer(places)
    words = ["visited", "peter", "blackburn", "in", "new", "york", "city"]
    table = pa.table({"tokens": [words], "line": [1]})
    for max_length in (3, 4, 5, 7, 9, 32):
        row = encode_sentences(table, tokenizer, None, max_length, gazetteer=found)[0].to_pylist()[0]
        encoding = tokenizer([words], is_split_into_words=True, truncation=True, max_length=max_length)
        assert len(row[COLUMN]) == len(row["input_ids"]) == len(row["labels"]) <= max_length
        assert row[COLUMN] == align_features(encoding.word_ids(0), found.word_features(words))
        assert row[COLUMN][0] == 0 and row[COLUMN][-1] == 0  # [CLS] and [SEP] survive truncation
        kept = [s for s in row["word_starts"] if s >= 0]
        assert [row[COLUMN][s] for s in kept] == found.word_features(words)[: len(kept)]


def test_the_collate_pads_features_with_zero_beside_the_inputs(tmp_path, places):
    config = load_config("ner-conll2003", [f"data.gazetteer={places}"])[0]
    task = TokenClassificationTask(config)
    rows = [
        {"input_ids": [2, 5, 6, 3], "labels": [-100, 1, 2, -100], COLUMN: [0, 1, 2, 0]},
        {"input_ids": [2, 5, 3], "labels": [-100, 0, -100], COLUMN: [0, 3, 0]},
    ]
    batch = task.collate(rows)
    assert batch[gazetteer.KWARG].tolist() == [[0, 1, 2, 0], [0, 3, 0, 0]]
    assert batch[gazetteer.KWARG].shape == batch["input_ids"].shape
    assert gazetteer.KWARG not in task.collate([{k: v for k, v in r.items() if k != COLUMN} for r in rows])


# --------------------------------------------------------------------------- config and cache key
def test_config_keys_are_token_classification_only(places):
    with pytest.raises(ConfigError, match=r"data\.gazetteer is a token_classification key"):
        load_config("text-classification", [f"data.gazetteer={places}"])
    with pytest.raises(ConfigError, match=r"data\.gazetteer_lowercase=true is for a gazetteer"):
        load_config("ner-conll2003", ["data.gazetteer_lowercase=true"])
    config = load_config("ner-conll2003", [f"data.gazetteer={places}", "data.gazetteer_lowercase=true"])[0]
    assert config.data.gazetteer == str(places) and config.data.gazetteer_lowercase


def test_cache_key_follows_the_file_content_and_options(tmp_path, tiny_conll, places):
    tokenizer = make_tokenizer()
    splits = {"train": str(tiny_conll["train"])}

    def key(*overrides: str) -> str:
        config = load_config("ner-conll2003", [f"data.train={tiny_conll['train']}", *overrides])[0]
        return TokenClassificationTask(config).cache_key(tokenizer, splits)

    plain, with_file = key(), key(f"data.gazetteer={places}")
    assert plain != with_file
    assert key(f"data.gazetteer={places}", "data.gazetteer_lowercase=true") != with_file
    copy = shutil.copy(places, tmp_path / "copy.tsv")  # same bytes elsewhere: the same features
    assert key(f"data.gazetteer={copy}") == with_file
    _write(places, "york\tLOC", "paris\tLOC")
    assert key(f"data.gazetteer={places}") not in (plain, with_file)


# --------------------------------------------------------------------------- the builder
def _conll(path, sentences):
    lines = []
    for sentence in sentences:
        lines += [f"{word} NN O {tag}" for word, tag in sentence] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_collect_mentions_takes_the_most_frequent_type_and_a_minimum_count():
    sentences = [
        (["new", "york", "is", "big"], ["B-LOC", "I-LOC", "O", "O"]),
        (["new", "york", "won"], ["B-ORG", "I-ORG", "O"]),
        (["in", "new", "york"], ["O", "B-LOC", "I-LOC"]),
        (["anna", "met", "bob"], ["B-PER", "O", "B-PER"]),
        (["anna"], ["B-PER"]),
    ]
    built = collect_mentions(sentences)
    assert built.entries == {"new york": ("LOC", 2), "anna": ("PER", 2), "bob": ("PER", 1)}
    assert built.mentions == 6 and built.counts() == {"LOC": 1, "PER": 2}
    assert set(collect_mentions(sentences, min_count=2).entries) == {"new york", "anna"}


def test_dft_data_gazetteer_reads_the_training_split_only(tmp_path, capsys):
    train = _conll(tmp_path / "train.conll", [[("zed", "B-PER"), ("visited", "O"), ("oslo", "B-LOC")]] * 2)
    test = _conll(tmp_path / "test.conll", [[("qux", "B-PER"), ("visited", "O"), ("rome", "B-LOC")]])
    out = tmp_path / "gaz" / "train.tsv"
    args = ["data", "gazetteer", "ner-conll2003", f"data.train={train}", f"data.validation={test}"]
    assert main([*args, f"data.test={test}", "--out", str(out)]) == 0
    assert "2 entries (LOC 1, PER 1) from 4 mentions" in capsys.readouterr().out
    found = load_gazetteer(out)
    assert set(found.entries) == {("zed",), ("oslo",)}  # nothing of validation/test
    assert found.types == ("LOC", "PER")
    assert main(["data", "gazetteer", "text-classification", "--out", str(tmp_path / "x.tsv")]) == 2
    assert "needs task=token_classification" in capsys.readouterr().err


# --------------------------------------------------------------------------- the model hook
def test_the_hook_adds_features_and_keeps_the_kwarg_from_transformers(tiny_bert, places):
    found = load_gazetteer(places)
    model = load_trained("token_classification", str(tiny_bert)).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    gazetteer.install(gazetteer.attach(model, list(found.types), False, found.digest))
    assert gazetteer.spec(model)["types"] == ["LOC", "ORG", "PER"]
    features = torch.tensor([[0, 1, 2, 0, 0]])
    with torch.no_grad():  # zero-initialised: the plain model's logits, with or without features
        assert torch.equal(model(input_ids=ids, attention_mask=mask, gazetteer=features).logits, before)
        model.gazetteer_embedding.weight[1:] = torch.randn(6, model.config.hidden_size)
        fused = model(input_ids=ids, attention_mask=mask, gazetteer=features).logits
        assert not torch.allclose(fused, before)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)  # no kwarg: none added
        zeros = model(input_ids=ids, attention_mask=mask, gazetteer=torch.zeros_like(ids)).logits
        assert torch.equal(zeros, before)  # id 0 is the padding row: always zero


# --------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def gazetteer_run(tiny_bert, tiny_conll, tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("gazetteer-run")
    built = tmp / "train.tsv"
    job = [
        f"model.name={tiny_bert}",
        *[f"data.{split}={path}" for split, path in tiny_conll.items()],
        f"data.cache_dir={tmp / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        "run.progress=false",
        "track.report=false",
        "train.epochs=2",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.log_every=1",
        "model.crf=false",  # the plain head (the recipe's is the CRF): the crf case below turns it on
    ]
    assert main(["-q", "data", "gazetteer", "ner-conll2003", *job, "--out", str(built)]) == 0
    job += [f"data.gazetteer={built}"]
    assert main(["-q", "train", "ner-conll2003", *job, f"run.output_dir={tmp / 'run'}"]) == 0
    return tmp / "run", tiny_conll, built, job


def test_the_run_trains_and_exports_the_gazetteer(gazetteer_run):
    run_dir, _, built, _ = gazetteer_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["f1"] > 0.5
    export = run_dir / "export"
    record = json.loads((export / "config.json").read_text())[gazetteer.CONFIG_KEY]
    assert record["file"] == gazetteer.FILE and record["types"] == ["LOC", "ORG", "PER"]
    assert (export / gazetteer.FILE).read_bytes() == built.read_bytes()
    weight = load_file(str(export / "model.safetensors"))["gazetteer_embedding.weight"]
    assert weight.shape == (7, 64)
    assert weight[1:].abs().sum() > 0 and not weight[0].any()  # trained; the no-match row stays zero
    from transformers import AutoModelForTokenClassification

    plain = AutoModelForTokenClassification.from_pretrained(str(export))  # the model without features
    assert not hasattr(plain, gazetteer.MODULE)
    ours = load_trained("token_classification", str(export))
    assert torch.equal(ours.gazetteer_embedding.weight, weight)


def _predict(model_dir, conll, out, *overrides):
    args = ["-q", "predict", str(model_dir), "--input", str(conll["test"]), "--format", "conll"]
    assert main([*args, "--output", str(out), *overrides]) == 0
    return [line.split()[-1] for line in out.read_text().splitlines() if line.strip()]


def test_predict_from_the_export_recomputes_the_features(gazetteer_run, tmp_path):
    """Other gazetteer weights change the predictions; with a file that matches nothing they do not."""
    run_dir, conll, _, _ = gazetteer_run
    baseline = _predict(run_dir / "export", conll, tmp_path / "baseline.conll")
    forced = tmp_path / "forced"
    shutil.copytree(run_dir / "export", forced)
    weights = load_file(str(forced / "model.safetensors"))
    classifier = weights["classifier.weight"]  # [labels, hidden]
    label2id = json.loads((forced / "config.json").read_text())["label2id"]
    b_loc_feature = 1  # LOC is the first type: its B- feature is pushed towards B-ORG
    weights["gazetteer_embedding.weight"][b_loc_feature] = 50.0 * classifier[label2id["B-ORG"]]
    save_file(weights, str(forced / "model.safetensors"), metadata={"format": "pt"})
    tags = _predict(forced, conll, tmp_path / "forced.conll")
    assert len(tags) == len(baseline) and tags != baseline
    changed = [i for i, (a, b) in enumerate(zip(tags, baseline, strict=True)) if a != b]
    locations = {words[0] for words in load_gazetteer(forced / gazetteer.FILE).entries}
    words = [line.split()[0] for line in (tmp_path / "forced.conll").read_text().splitlines() if line.strip()]
    assert sum(words[i] in locations for i in changed) >= len(changed) / 2  # mostly the matched words
    # the same types, but no word matches: every feature is 0, so the forced row is never used
    plain = tmp_path / "plain"
    shutil.copytree(run_dir / "export", plain)
    for model_dir in (plain, forced):
        _write(model_dir / gazetteer.FILE, "zz-loc\tLOC", "zz-org\tORG", "zz-per\tPER")
    unmatched = _predict(forced, conll, tmp_path / "unmatched.conll")
    assert unmatched == _predict(plain, conll, tmp_path / "plain.conll")


def test_evaluate_from_the_run_matches_its_results(gazetteer_run, capsys):
    run_dir, conll, _, _ = gazetteer_run
    capsys.readouterr()
    assert main(["-q", "evaluate", str(run_dir), f"data.test={conll['test']}", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["f1"] == pytest.approx(json.loads((run_dir / "results.json").read_text())["test"]["f1"])


def test_an_export_without_its_gazetteer_file_is_refused(gazetteer_run, tmp_path, capsys):
    run_dir, conll, _, _ = gazetteer_run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "export", broken)
    (broken / gazetteer.FILE).unlink()
    args = ["-q", "predict", str(broken), "--input", str(conll["test"]), "--format", "conll"]
    capsys.readouterr()
    assert main(args) == 2
    assert "gazetteer.tsv is missing there: copy the gazetteer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"gazetteer\.tsv is missing"):
        gazetteer.recorded_file(broken)
    _write(broken / gazetteer.FILE, "paris\tLOC")  # another file with other types
    assert main(args) == 2
    assert "put back the file it was trained with" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["model.crf=true"], id="crf"),
        pytest.param(["peft.method=lora", "peft.r=4"], id="lora"),
        pytest.param(["train.adversarial=fgm"], id="fgm"),
        pytest.param(["run.engine=deepspeed", "deepspeed.zero_stage=2"], id="zero2"),
    ],
)
def test_gazetteer_with_crf_and_lora(gazetteer_run, tmp_path, extra):
    """The embedding is a head beside the CRF, trained in full under LoRA, with FGM and by ZeRO-2."""
    _, conll, _, job = gazetteer_run
    run = tmp_path / "run"
    short = ["train.max_steps=4", "data.validation=null", f"run.output_dir={run}"]
    if "run.engine=deepspeed" in extra:  # a fresh process: DeepSpeed keeps its groups in globals
        pytest.importorskip("deepspeed")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        command = [sys.executable, "-m", "distributed_ft", "-q", "train", "ner-conll2003"]
        command += [*job, *short, *extra]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert main(["-q", "train", "ner-conll2003", *job, *short, *extra]) == 0
    export = run / "export"
    assert (export / gazetteer.FILE).is_file()
    model = load_trained("token_classification", str(export)).eval()
    assert gazetteer.owner(model) is not None
    assert (crf.owner(model) is not None) == ("model.crf=true" in extra)
    ids = torch.tensor([[2, 10, 11, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask, gazetteer=torch.tensor([[0, 1, 3, 0]]))
        plain = model(input_ids=ids, attention_mask=mask)
    assert not torch.allclose(fused.logits, plain.logits)  # the trained embedding came back with the export
    assert (crf.MODULE in fused) == ("model.crf=true" in extra)
    assert len(_predict(export, conll, tmp_path / "predicted.conll")) > 0
