"""train/report.py and ``dft report``: plotted series are metrics.jsonl's, tables are results.json's."""

import json
import logging
import subprocess
import sys

import pytest

from distributed_ft.cli import main
from distributed_ft.train.report import write_report

PER_CLASS = {
    "neg": {"precision": 0.5, "recall": 0.25, "f1": 0.3333, "support": 4},
    "pos": {"precision": 0.75, "recall": 1.0, "f1": 0.8571, "support": 6},
}


def _run(path, lr, finished=True):
    path.mkdir(parents=True)
    records = [
        {"event": "train", "step": s, "time": 1.0, "loss": 2.0 / s, "lr": lr * (1 - s / 10),
         "tokens_per_s": 100.0 + s, "epoch": 0}
        for s in range(1, 6)
    ]  # fmt: skip
    records.insert(
        3, {"event": "eval", "step": 3, "split": "validation", "accuracy": 0.5, "examples": 10, "epoch": 0}
    )
    records.append(
        {"event": "train", "step": 4, "time": 2.0, "loss": 0.1, "lr": lr, "tokens_per_s": 1.0}
    )  # resumed
    records.append(
        {"event": "eval", "step": 5, "split": "validation", "accuracy": 0.7, "examples": 10, "epoch": 0}
    )
    records.append({"event": "final", "step": 5, "split": "test", "accuracy": 0.6})
    text = "".join(json.dumps(r) + "\n" for r in records)
    (path / "metrics.jsonl").write_text(text + '{"event": "tra')  # a torn last line: a run still writing
    if finished:
        metrics = {
            "accuracy": 0.7,
            "macro_f1": 0.6,
            "examples": 10,
            "multi_label": False,
            "per_class": PER_CLASS,
        }
        results = {
            "task": "sequence_classification",
            "steps": 5,
            "best_step": 5,
            "dev": metrics,
            "test": metrics,
        }
        (path / "results.json").write_text(json.dumps(results))
    return path


def test_series_are_the_jsonl_values_and_tables_the_results(tmp_path):
    runs = [_run(tmp_path / "a" / "run", 1e-3), _run(tmp_path / "b" / "run", 2e-3, finished=False)]
    report = write_report(runs, tmp_path / "out")
    assert {f.name for f in report.files} == {
        "loss.png", "lr.png", "tokens_per_s.png", "eval.png", "series.json", "report.md"
    }  # fmt: skip
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    # names collide: the legend adds the parent; step 4 logged twice keeps its last value
    loss = series["train/loss"]
    assert set(loss) == {"a/run", "b/run"}
    assert loss["a/run"] == {"step": [1, 2, 3, 4, 5], "value": [2.0, 1.0, 2.0 / 3, 0.1, 0.4]}
    assert series["train/lr"]["b/run"]["value"] == pytest.approx([1.8e-3, 1.6e-3, 1.4e-3, 2e-3, 1e-3])
    assert series["eval/validation/accuracy"]["a/run"] == {"step": [3, 5], "value": [0.5, 0.7]}
    assert "eval/validation/examples" not in series and "train/epoch" not in series  # counts are not curves
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| a/run | dev | 0.7000 | 0.6000 | 10 |" in markdown
    assert "## a/run: test per class" in markdown and "| neg | 0.5000 | 0.2500 | 0.3333 | 4 |" in markdown
    assert "No `results.json` (not finished): b/run." in markdown
    assert "![loss](loss.png)" in markdown


def test_without_matplotlib_report_md_and_one_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    caplog.set_level(logging.INFO, logger="distributed_ft")
    logger = logging.getLogger("distributed_ft")
    logger.addHandler(caplog.handler)  # the CLI's logging setup may have turned propagation off
    try:
        report = write_report([_run(tmp_path / "run", 1e-3)], tmp_path / "out")
    finally:
        logger.removeHandler(caplog.handler)
    assert sorted(f.name for f in report.files) == ["report.md", "series.json"]
    assert set(caplog.messages) == {
        "report: plots need matplotlib (pip install matplotlib); writing report.md only"
    }
    assert "## Curves" not in (tmp_path / "out" / "report.md").read_text()
    assert report.series["train/loss"]["run"].value[:2] == [2.0, 1.0]


def test_dft_report_default_out_and_a_run_without_metrics(tmp_path, capsys, monkeypatch):
    run = _run(tmp_path / "run", 1e-3)
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "loss.png").is_file()
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run), str(_run(tmp_path / "other", 1e-3))]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(run), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dft report: error: {tmp_path / 'empty'}: no metrics.jsonl here; give a run directory "
                   "(dft report RUN_DIR)"]  # fmt: skip


def test_dft_report_imports_no_torch(tmp_path):
    run = _run(tmp_path / "run", 1e-3)
    code = (
        "import sys; from distributed_ft.cli import main; "
        f"assert main(['-q', 'report', {str(run)!r}]) == 0; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
