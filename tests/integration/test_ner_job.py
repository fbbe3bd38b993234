"""The NER job end to end in local mode on a tiny BERT: train, run directory, export, evaluate, predict."""

import json

import pytest
from seqeval.metrics import f1_score

from distributed_ft.cli import main


@pytest.fixture(scope="module")
def trained_run(tiny_bert, tiny_conll, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ner-run")
    overrides = [
        f"model.name={tiny_bert}",
        *[f"data.{split}={path}" for split, path in tiny_conll.items()],
        f"data.cache_dir={tmp / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        f"run.output_dir={tmp / 'run'}",
        "train.epochs=3",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.eval_every=10",
    ]
    assert main(["-q", "train", "ner-conll2003", *overrides]) == 0
    return tmp / "run", tiny_conll


def _events(run_dir, kind):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == kind]


def test_run_directory_contract(trained_run):
    run_dir, _ = trained_run
    assert (run_dir / "config.yaml").is_file()
    train = _events(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in train)
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("dev", "test"):
        assert {"f1", "precision", "recall", "per_type"} <= results[split].keys()
        assert set(results[split]["per_type"]) == {"LOC", "ORG", "PER"}
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert (run_dir / "export" / "config.json").is_file()


def test_loss_falls_and_model_learns(trained_run):
    run_dir, _ = trained_run
    losses = [r["loss"] for r in _events(run_dir, "train")]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["f1"] > 0.6
    # evaluations happen every 10 steps and at each epoch end; the best one is kept
    evals = _events(run_dir, "eval")
    assert results["best_step"] in [e["step"] for e in evals]
    assert results["dev"]["f1"] == max(e["f1"] for e in evals)


def test_export_loads_in_transformers_pipeline(trained_run):
    from transformers import pipeline

    run_dir, _ = trained_run
    ner = pipeline("token-classification", model=str(run_dir / "export"), aggregation_strategy="simple")
    entities = ner("john smith visited paris with nato")
    groups = {e["entity_group"] for e in entities}
    assert groups <= {"PER", "LOC", "ORG"} and entities
    config = json.loads((run_dir / "export" / "config.json").read_text())
    assert config["id2label"]["0"] == "O" and "B-PER" in config["label2id"]


def test_evaluation_equals_seqeval_on_predicted_words(trained_run, tmp_path, capsys):
    run_dir, conll = trained_run
    output = tmp_path / "pred.conll"
    assert (
        main(
            [
                "-q",
                "predict",
                str(run_dir),
                "--input",
                str(conll["test"]),
                "--format",
                "conll",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    gold, pred, g, p = [], [], [], []
    for line in [*output.read_text().splitlines(), ""]:
        if not line:
            if g:
                gold.append(g)
                pred.append(p)
            g, p = [], []
            continue
        _, gold_tag, pred_tag = line.split()
        g.append(gold_tag)
        p.append(pred_tag)
    results = json.loads((run_dir / "results.json").read_text())
    assert len(gold) == results["test"]["sentences"]
    assert f1_score(gold, pred) == pytest.approx(results["test"]["f1"], abs=1e-12)
    capsys.readouterr()
    assert main(["-q", "evaluate", str(run_dir), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["f1"] == pytest.approx(results["test"]["f1"], abs=1e-12)


def test_predict_raw_text_gives_entity_spans_with_offsets(trained_run, tmp_path):
    run_dir, _ = trained_run
    source = tmp_path / "in.txt"
    source.write_text("John Smith visited Paris.\n\nThe EU met in London\n")
    output = tmp_path / "out.jsonl"
    assert main(["-q", "predict", str(run_dir), "--input", str(source), "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["text"] for r in records] == ["John Smith visited Paris.", "The EU met in London"]
    assert records[0]["tokens"] == ["John", "Smith", "visited", "Paris", "."]
    for record in records:
        for span in record["entities"]:
            assert record["text"][span["start_char"] : span["end_char"]] == span["text"]


def test_predict_of_a_missing_input_is_one_clear_line(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    missing = tmp_path / "missing.txt"
    assert main(["-q", "predict", str(run_dir), "--input", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--input {missing}: no such file" in err and "Traceback" not in err


def test_predict_jsonl_tokens_and_tokens_only_conll(trained_run, tmp_path):
    run_dir, _ = trained_run
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["mary", "met", "peter", "anna"]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            ["-q", "predict", str(run_dir), "--input", str(jsonl), "--format", "jsonl", "--output", str(out)]
        )
        == 0
    )
    assert len(json.loads(out.read_text())["tags"]) == 4
    conll = tmp_path / "in.conll"
    conll.write_text("mary\nvisited\nparis\n\nthe\neu\n")
    out = tmp_path / "out.conll"
    assert (
        main(
            ["-q", "predict", str(run_dir), "--input", str(conll), "--format", "conll", "--output", str(out)]
        )
        == 0
    )
    rows = [line.split() for line in out.read_text().splitlines() if line]
    assert [r[0] for r in rows] == ["mary", "visited", "paris", "the", "eu"] and all(
        len(r) == 2 for r in rows
    )


def test_early_stopping_stops_when_the_metric_stalls(tiny_job, tmp_path):
    overrides = [
        *tiny_job,
        "train.lr=1e-12",
        "train.eval_every=2",
        "train.early_stopping_patience=2",
        "train.eval_each_epoch=false",
        "train.epochs=5",
    ]
    assert main(["-q", "train", "ner-conll2003", *overrides]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stopped_early"] is True
    assert results["steps"] == 6  # evaluations at 2 (best), 4 and 6 (no improvement twice)
    assert results["best_step"] == 2


def test_dft_export_after_the_fact_matches_run_export(trained_run, tmp_path):
    from safetensors.torch import load_file

    run_dir, _ = trained_run
    assert main(["-q", "export", str(run_dir), "--out", str(tmp_path / "again")]) == 0
    a = load_file(run_dir / "export" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_missing_data_and_bad_model_fail_with_clear_errors(tiny_job, capsys):
    assert main(["-q", "train", "ner-conll2003", *tiny_job, "data.train=/nope/train.conll"]) == 2
    assert "/nope/train.conll" in capsys.readouterr().err
    assert main(["-q", "train", "ner-conll2003", *tiny_job, "model.name=/nope/model"]) == 2
    assert "model.name='/nope/model': /nope/model does not exist" in capsys.readouterr().err
