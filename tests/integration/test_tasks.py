"""Sequence classification and causal LM end to end through the ``dft`` CLI on tiny local models.

Each run trains, evaluates, exports (loaded back with plain transformers) and predicts: a single-label
text-pair job with class weights (JSONL), a multi-label job (CSV, ``|``-delimited labels), relation
classification with entity markers (folder-per-class layout) and instruction tuning of a tiny Llama on
the shipped sample set (packing on).
"""

import json
import random

import pytest
import torch

from distributed_ft.cli import main

PER, LOC, ORG = (
    ["john", "mary", "peter", "anna"],
    ["paris", "london", "berlin", "york"],
    ["eu", "nato", "fifa"],
)
FILLER = ["the", "said", "in", "on", "a", "with", "from", "to", "and", "of"]
KINDS = {"PER": PER, "LOC": LOC, "ORG": ORG}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sentence(rng, kinds, first=False):
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    for kind in kinds:
        words.insert(0 if first else rng.randint(0, len(words)), rng.choice(KINDS[kind]))
    return " ".join(words)


def _single_label(path, n, seed):
    """Label: the entity type in the text (PER rare); the pair is filler (it flows, it does not decide)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            kind = rng.choices(["PER", "LOC", "ORG"], weights=[1, 3, 3])[0]
            record = {"text": _sentence(rng, [kind], first=True), "pair": _sentence(rng, []), "label": kind}
            handle.write(json.dumps(record) + "\n")
    return path


def _multi_label(path, n, seed):
    rng = random.Random(seed)
    lines = ["text,labels"]
    for _ in range(n):
        kinds = sorted(rng.sample(sorted(KINDS), rng.randint(0, 2)))
        lines.append(f"{_sentence(rng, kinds, first=True)},{'|'.join(kinds)}")
    path.write_text("\n".join(lines) + "\n")
    return path


RELATIONS = {
    "visited": (
        "[E1] {per} [/E1] visited [E2] {loc} [/E2]",
        "[E2] {loc} [/E2] said [E1] {per} [/E1] visited",
    ),
    "met": (
        "[E1] {per} [/E1] met [E2] {per2} [/E2] in {loc}",
        "in {loc} [E1] {per} [/E1] met [E2] {per2} [/E2]",
    ),
    "member_of": ("[E1] {loc} [/E1] and the [E2] {org} [/E2]", "the [E2] {org} [/E2] with [E1] {loc} [/E1]"),
}


def _relations(root, n, seed):
    """Hand-made relation examples, one text file per example in a folder per relation."""
    rng = random.Random(seed)
    for i in range(n):
        relation = sorted(RELATIONS)[i % 3]
        template = rng.choice(RELATIONS[relation])
        text = template.format(
            per=rng.choice(PER), per2=rng.choice(PER), loc=rng.choice(LOC), org=rng.choice(ORG)
        )
        (root / relation).mkdir(parents=True, exist_ok=True)
        (root / relation / f"{i:03d}.txt").write_text(text + "\n")
    return root


def _common(tmp, model):
    return [
        f"model.name={model}",
        f"data.cache_dir={tmp / 'cache'}",
        f"run.output_dir={tmp / 'run'}",
        "data.test=null",  # the recipes' own splits are not used here
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=48",
        "train.lr=3e-3",
        "train.batch_size=16",
        "train.log_every=1",
        "train.warmup_ratio=0.1",
    ]


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- single-label text pairs
@pytest.fixture(scope="module")
def pair_run(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    files = {
        "train": _single_label(tmp / "train.jsonl", 320, 1),
        "validation": _single_label(tmp / "dev.jsonl", 40, 2),
        "test": _single_label(tmp / "test.jsonl", 40, 3),
    }
    overrides = [
        *_common(tmp, tiny_bert),
        *[f"data.{split}={path}" for split, path in files.items()],
        "data.text_pair_column=pair",
        "data.label_column=label",
        "data.class_weights=balanced",
        "train.epochs=4",
        "train.lr=2e-3",
    ]
    assert main(["-q", "train", "text-classification", *overrides]) == 0
    return tmp / "run", files


def test_single_label_pair_run_contract_and_learning(pair_run):
    run_dir, _ = pair_run
    results = _results(run_dir)
    for split in ("dev", "test"):
        assert {"accuracy", "macro_f1", "micro_f1", "per_class", "confusion_matrix"} <= results[split].keys()
        assert set(results[split]["per_class"]) == {"LOC", "ORG", "PER"}
    assert results["test"]["accuracy"] > 0.6
    matrix = results["test"]["confusion_matrix"]
    assert matrix["labels"] == ["LOC", "ORG", "PER"] and sum(map(sum, matrix["matrix"])) == 40
    manifest = next((run_dir.parent / "cache").glob("*/manifest.json"))
    weights = json.loads(manifest.read_text())["meta"]["class_weights"]
    assert weights[2] > weights[0]  # PER is the rare class


def test_pair_export_loads_in_a_transformers_pipeline(pair_run):
    from transformers import pipeline

    run_dir, _ = pair_run
    classify = pipeline("text-classification", model=str(run_dir / "export"))
    out = classify({"text": "john said to the", "text_pair": "the said"})
    assert (out[0] if isinstance(out, list) else out)["label"] in {"LOC", "ORG", "PER"}


def test_pair_predict_matches_evaluation(pair_run, tmp_path, capsys):
    run_dir, files = pair_run
    out = tmp_path / "pred.jsonl"
    assert main(["-q", "predict", str(run_dir), "--input", str(files["test"]), "--format", "jsonl",
                 "--output", str(out)]) == 0  # fmt: skip
    gold = [r["label"] for r in _jsonl(files["test"])]
    predicted = _jsonl(out)
    accuracy = sum(p["label"] == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
    assert accuracy == pytest.approx(_results(run_dir)["test"]["accuracy"])
    assert set(predicted[0]["scores"]) == {"LOC", "ORG", "PER"} and "text_pair" in predicted[0]
    text = tmp_path / "in.txt"
    text.write_text("mary said\tthe\nparis and\ta to\n")
    assert main(["-q", "predict", str(run_dir), "--input", str(text), "--output", str(out)]) == 0
    assert [r["text_pair"] for r in _jsonl(out)] == ["the", "a to"]
    capsys.readouterr()
    assert main(["-q", "evaluate", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(
        _results(run_dir)["test"]["accuracy"]
    )


# --------------------------------------------------------------------------- multi-label
def test_multi_label_csv_with_delimiter(tiny_bert, tmp_path):
    train, dev = _multi_label(tmp_path / "train.csv", 160, 4), _multi_label(tmp_path / "dev.csv", 40, 5)
    overrides = [
        *_common(tmp_path, tiny_bert),
        f"data.train={train}",
        f"data.validation={dev}",
        "data.label_column=labels",
        "data.multi_label=true",
        "data.label_delimiter='|'",  # quoted: the value is read as YAML
        "eval.metric=micro_f1",
        "train.epochs=10",
    ]
    assert main(["-q", "train", "text-classification", *overrides]) == 0
    results = _results(tmp_path / "run")
    assert results["dev"]["multi_label"] is True and set(results["dev"]["per_class"]) == {"LOC", "ORG", "PER"}
    assert results["dev"]["micro_f1"] > 0.75
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(tmp_path / "run" / "export"), top_k=None)
    assert classify.model.config.problem_type == "multi_label_classification"
    scores = {s["label"]: s["score"] for s in classify(["john and paris"])[0]}
    assert set(scores) == {"LOC", "ORG", "PER"} and 1.2 < sum(scores.values()) < 3  # sigmoid, not softmax
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("john and paris\n")
    assert main(["-q", "predict", str(tmp_path / "run"), "--input", str(source), "--output", str(out)]) == 0
    (record,) = _jsonl(out)
    assert isinstance(record["labels"], list) and set(record["scores"]) == {"LOC", "ORG", "PER"}


# --------------------------------------------------------------------------- relation classification
def test_relation_markers_train_and_survive_export(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, dev = _relations(tmp_path / "train", 150, 6), _relations(tmp_path / "dev", 30, 7)
    overrides = [
        *_common(tmp_path, tiny_bert),
        f"data.train={train}",
        f"data.validation={dev}",
        "data.entity_markers=true",
        "train.epochs=5",
    ]
    assert main(["-q", "train", "text-classification", *overrides]) == 0
    run_dir = tmp_path / "run"
    assert _results(run_dir)["dev"]["accuracy"] > 0.6
    base = AutoTokenizer.from_pretrained(str(tiny_bert))
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "export"))
    assert len(tokenizer) == len(base) + 4
    ids = tokenizer("[E1] john [/E1] visited [E2] paris [/E2]")["input_ids"]
    markers = tokenizer.convert_tokens_to_ids(["[E1]", "[/E1]", "[E2]", "[/E2]"])
    assert markers == list(range(len(base), len(base) + 4)) and set(markers) <= set(ids)
    model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "export"))
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    with torch.no_grad():
        logits = model(**tokenizer("[E1] mary [/E1] visited [E2] london [/E2]", return_tensors="pt")).logits
    assert model.config.id2label[int(logits.argmax())] in RELATIONS
    # `dft export` rebuilds the model from the base one: the markers must be re-added before loading
    assert main(["-q", "export", str(run_dir), "--out", str(tmp_path / "again")]) == 0
    again = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "again"))
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("[E1] anna [/E1] met [E2] john [/E2] in paris\n")
    assert main(["-q", "predict", str(run_dir), "--input", str(source), "--output", str(out)]) == 0
    assert _jsonl(out)[0]["label"] in RELATIONS


# --------------------------------------------------------------------------- causal LM
@pytest.fixture(scope="module")
def lm_run(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    overrides = [
        *_common(tmp, tiny_llama),
        "data.test=builtin:instructions/test",
        "data.max_length=128",
        "data.generate_samples=2",
        "data.max_new_tokens=12",
        "train.epochs=3",
        "train.batch_size=8",
        "train.eval_every=3",
        "train.eval_each_epoch=false",
        "eval.batch_size=16",
    ]
    assert main(["-q", "train", "instruction-tuning", *overrides]) == 0
    return tmp / "run"


def test_causal_lm_run_contract_and_perplexity_drop(lm_run):
    results = _results(lm_run)
    for split in ("dev", "test"):
        metrics = results[split]
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-4)
        assert metrics["examples"] == 30 and metrics["tokens"] > 0
    samples = results["test"]["samples"]
    assert len(samples["prompt"]) == len(samples["generated"]) == 2
    assert samples["prompt"][0].endswith("### Response:\n") and samples["reference"][0]
    events = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    evals = [e["perplexity"] for e in events if e["event"] == "eval"]
    assert len(evals) >= 3 and evals[-1] < 0.7 * evals[0]
    train = [e for e in events if e["event"] == "train"]
    assert all(e["tokens_per_s"] > 0 for e in train)


def test_causal_lm_export_generates_in_plain_transformers(lm_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lm_run / "export"))
    model = AutoModelForCausalLM.from_pretrained(str(lm_run / "export"))
    ids = tokenizer("### Instruction:\nWhat is the capital of Peru?\n\n### Response:\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_causal_lm_predict_and_evaluate(lm_run, tmp_path, capsys):
    prompts, chats, out = tmp_path / "prompts.jsonl", tmp_path / "chats.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"prompt": "Is 14 even or odd?"}) + "\n")
    chat = [
        {"role": "user", "content": "Which day comes after Monday?"},
        {"role": "assistant", "content": "Tue."},
    ]
    chats.write_text(json.dumps({"messages": chat}) + "\n")
    assert (
        main(
            ["-q", "predict", str(lm_run), "--input", str(prompts), "--format", "jsonl", "--output", str(out)]
        )
        == 0
    )
    (first,) = _jsonl(out)
    assert first["prompt"] == "Is 14 even or odd?" and isinstance(first["generated"], str)
    assert (
        main(["-q", "predict", str(lm_run), "--input", str(chats), "--format", "jsonl", "--output", str(out)])
        == 0
    )
    (second,) = _jsonl(out)
    assert second["messages"] == chat[:1] and second["response"] == "Tue." and "generated" in second
    text = tmp_path / "prompts.txt"
    text.write_text("What is 3 plus 4?\n\nSpell the word 'river' backwards.\n")
    assert main(["-q", "predict", str(lm_run), "--input", str(text), "--output", str(out)]) == 0
    assert [r["prompt"] for r in _jsonl(out)] == ["What is 3 plus 4?", "Spell the word 'river' backwards."]
    # batched (left-padded) generation equals one prompt at a time
    batched = [r["generated"] for r in _jsonl(out)]
    assert (
        main(["-q", "predict", str(lm_run), "eval.batch_size=1", "--input", str(text), "--output", str(out)])
        == 0
    )
    assert [r["generated"] for r in _jsonl(out)] == batched
    capsys.readouterr()
    assert main(["-q", "evaluate", str(lm_run), "data.generate_samples=0", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == pytest.approx(_results(lm_run)["test"]["loss"], rel=1e-5)
