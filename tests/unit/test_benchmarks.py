"""The benchmark suite: experiment files, the measurement helpers, and every experiment's smoke variant.

The smoke variants run the real code paths on a random 2-layer BERT (``bench:tiny-bert``) and a few dozen
CoNLL sentences; their results go to a temporary directory. The cache (prepared data, the tiny model) is
a temporary ``XDG_CACHE_HOME`` shared by the module, so nothing is written to the user's cache.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import common, report, runner  # noqa: E402


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """A private cache root for the module (prepared data and the tiny model are built once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


def _smoke(name: str, tmp_path: Path) -> dict:
    payload = runner.run_experiment(name, smoke=True, out_dir=tmp_path / "results")
    files = {Path(p).suffix for p in payload["files"].values()}
    assert {".json", ".md"} <= files
    saved = json.loads(Path(payload["files"]["json"]).read_text())
    assert saved["env"]["software"]["torch"] and saved["env"]["hardware"]["logical_cpus"]
    assert "commit" in saved["env"]["git"]
    markdown = Path(payload["files"]["markdown"]).read_text()
    assert saved["env"]["date"] in markdown
    print(markdown)
    return payload


# --------------------------------------------------------------------------- experiment files
@pytest.mark.parametrize("name", runner.experiment_names())
@pytest.mark.parametrize("smoke", [False, True])
def test_every_experiment_file_loads_and_its_job_config_validates(name, smoke):
    spec = runner.load_experiment(name, smoke=smoke)
    assert spec["kind"] in runner.KINDS and spec["description"].strip()
    config = common.job_config({**spec["job"], "overrides": {**spec["job"]["overrides"], "model.name": "x"}})
    assert config.task in ("token_classification", "causal_lm")


def test_the_expected_experiments_exist():
    expected = {"loops", "orchestration", "zero", "data_pipeline", "scaling", "zero3_load", "data_scale"}
    expected |= {"quality", "few_shot"}
    assert expected <= set(runner.experiment_names())


def test_smoke_merges_overrides_and_replaces_params():
    spec = {"job": {"overrides": {"a": 1, "b": 2}}, "params": {"variants": {"x": {}, "y": {}}, "repeats": 2}}
    merged = runner.merge_smoke(spec, {"job": {"overrides": {"b": 3}}, "params": {"variants": {"x": {}}}})
    assert merged["job"]["overrides"] == {"a": 1, "b": 3}
    assert merged["params"] == {"variants": {"x": {}}, "repeats": 2}
    with pytest.raises(runner.ExperimentError):
        runner.merge_smoke(spec, {"kind": "loops"})


def test_unknown_experiment_is_a_clear_error():
    with pytest.raises(runner.ExperimentError, match="available"):
        runner.load_experiment("no-such-experiment")


# --------------------------------------------------------------------------- helpers
def test_interleaving_is_abba():
    assert common.interleaved(["a", "b", "c"], 2) == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "c"),
        (1, "b"),
        (1, "a"),
    ]


def test_step_summary_excludes_warmup_and_counts_rates():
    summary = common.step_summary([5.0, 1.0, 1.0, 3.0], [4] * 4, [30] * 4, [40] * 4, warmup=1)
    assert summary["steps_measured"] == 3 and summary["step_s_p50"] == 1.0
    assert summary["step_s_p90"] == pytest.approx(2.6)
    assert summary["samples_per_s"] == pytest.approx(12 / 5)
    assert summary["real_tokens_per_s"] == pytest.approx(90 / 5)
    assert summary["real_token_fraction"] == pytest.approx(0.75)


def test_step_recorder_measures_from_first_batch_and_groups_accumulation():
    import torch

    recorder = common.StepRecorder(batches_per_step=2)
    mask = torch.ones(2, 3, dtype=torch.long)
    for _ in range(2):
        recorder.batch({"attention_mask": mask})
        recorder.batch({"attention_mask": mask})
        recorder.step_done()
    summary = recorder.summary(warmup=0)
    assert summary["steps_total"] == 2
    assert recorder.per_step(recorder.samples) == [4, 4]
    assert summary["padded_tokens_per_s"] > 0


def test_paired_ratios_pair_runs_of_the_same_repeat():
    records = [
        {"variant": "a", "repeat": 0, "x": 2.0},
        {"variant": "b", "repeat": 0, "x": 1.0},
        {"variant": "b", "repeat": 1, "x": 4.0},
        {"variant": "a", "repeat": 1, "x": 2.0},
    ]
    ratio = common.paired_ratios(records, "x", "a", "b")
    assert ratio["per_repeat"] == [2.0, 0.5] and ratio["value"] == 1.25


def test_mfu_uses_the_planner_flops_formula():
    flops = common.model_flops_per_token("builtin:minilm-l6", "token_classification", 9, 32)
    from distributed_ft.planning import flops_per_token, shape_from_pretrained

    shape = shape_from_pretrained("builtin:minilm-l6", num_labels=9)
    assert flops == flops_per_token(shape, 32, trainable_params=shape.total_params, full_finetune=True)[0]
    assert common.mfu(1000.0, flops, 1e12) == pytest.approx(1000 * flops / 1e12)


def test_markdown_report_has_header_ratios_and_tables():
    payload = {
        "experiment": "demo",
        "description": "a demo",
        "env": common.environment(),
        "wall_seconds": 1.0,
        "ratios": [
            {"comparison": "a / b", "metric": "samples_per_s", "value": 0.995, "per_repeat": [0.99, 1.0]}
        ],
        "tables": [{"title": "T", "columns": ["x", "y"], "rows": [["r", 1234.5]]}],
        "failures": [{"variant": "ray", "reason": "exit 1: boom"}],
    }
    text = report.to_markdown(payload)
    assert "| a / b | samples_per_s | 0.995 | 0.99, 1 |" in text
    assert "| r | 1,234 |" in text and "**ray**: exit 1: boom" in text
    assert common.hardware_line(payload["env"]) in text


# --------------------------------------------------------------------------- smoke runs
def test_loops_smoke(bench_cache, tmp_path):
    payload = _smoke("loops", tmp_path)
    assert not payload["failures"]
    assert {r["variant"] for r in payload["records"]} == {"ours", "plain", "hf"}
    for record in payload["records"]:
        assert record["samples_per_s"] > 0 and 0 <= record["f1"] <= 1
        assert record["state_bytes"]["optimizer_states"] > 0
    ratios = {(r["comparison"], r["metric"]): r["value"] for r in payload["ratios"]}
    assert ratios[("ours / plain", "samples_per_s")] > 0 and ratios[("ours / hf", "samples_per_s")] > 0


def test_quality_smoke(bench_cache, tmp_path):
    """Each technique and HF Trainer trained per seed, scored on test, compared with the plain run."""
    payload = _smoke("quality", tmp_path)
    assert not payload["failures"], payload["failures"]
    assert {r["variant"] for r in payload["records"]} == {"plain", "augment", "fgm", "crf", "gazetteer", "hf"}
    for record in payload["records"]:
        assert 0 <= record["f1"] <= 1 and record["wall_seconds"] > 0
    rows = {row[0]: row for row in payload["tables"][0]["rows"]}
    assert rows["plain"][5] == 0 and rows["plain"][7] == 1 and rows["plain"][9] == 1  # against itself
    assert rows["augment"][1] == "data.augment.multiplier=1"
    assert rows["hf"][6] > 0  # Trainer's own training time: first batch to last optimizer step


def test_quality_hf_variant_takes_training_arguments(bench_cache, tmp_path):
    """An ``hf_*`` variant is Trainer with its overrides as TrainingArguments fields (the run_ner sampler)."""
    payload = _smoke("quality_hf3", tmp_path)
    assert not payload["failures"], payload["failures"]
    rows = {row[0]: row for row in payload["tables"][0]["rows"]}
    assert rows["hf_run_ner"][1] == 'train_sampling_strategy="random"' and rows["hf_run_ner"][5] == 0
    assert rows["crf"][6] > 0 and rows["crf"][7] > 0  # dft's train s and its ratio to Trainer's


def test_few_shot_smoke_trains_and_scores_each_k(bench_cache, tmp_path):
    payload = _smoke("few_shot", tmp_path)
    assert not payload["failures"], payload["failures"]
    assert [row[0] for row in payload["tables"][0]["rows"]] == ["k2", "k4"]


def test_dft_bench_runs_the_checkout_runner_and_passes_its_exit_code(capfd):
    """``dft bench`` is ``python -m benchmarks`` in the checkout: its output, its exit code."""
    from distributed_ft.cli import main

    assert main(["bench", "--list"]) == 0
    assert set(runner.experiment_names()) <= set(capfd.readouterr().out.split())
    assert main(["bench", "no-such-experiment"]) == 2
    assert "no experiment 'no-such-experiment'" in capfd.readouterr().err


def test_dft_bench_outside_a_checkout_is_one_line_exit_2(monkeypatch, capsys):
    from distributed_ft import cli

    monkeypatch.setattr(cli, "_checkout_root", lambda: None)
    assert cli.main(["bench", "loops"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source checkout" in err


def test_data_pipeline_smoke_through_dft_bench(bench_cache, tmp_path, capsys):
    from distributed_ft.cli import main

    assert main(["bench", "data_pipeline", "--smoke", "--out", str(tmp_path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    variants = {r["variant"] for r in payload["records"]}
    assert variants == {"prepare cold", "prepare cached", "pipeline", "training"}
    reused = {r["variant"]: r["reused"] for r in payload["records"] if "reused" in r}
    assert reused == {"prepare cold": False, "prepare cached": True}
    assert payload["ratios"][0]["value"] > 1  # batches are produced faster than a step consumes them


def test_data_scale_smoke(bench_cache, tmp_path):
    """The quick variant (``python -m benchmarks.data_scale --quick``): 1x and 2x, num_proc 1 and 2."""
    payload = _smoke("data_scale", tmp_path)
    assert not payload["failures"], payload["failures"]
    runs = {(r["scale"], r["num_proc"]): r for r in payload["records"]}
    assert set(runs) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for run in runs.values():
        assert not run["reused"] and run["sentences_per_s"] > 0 and run["peak_rss_bytes"] > 0
    assert runs[(2, 1)]["examples"] == 2 * runs[(1, 1)]["examples"] == 2 * runs[(1, 2)]["examples"]
    assert len(payload["ratios"]) == 4  # num_proc speed-up per scale, rank memory growth per mode
    for scale in (1, 2):  # 2 ranks: each reads half the split when sharded, all of it otherwise
        ranks = [r for r in payload["rank_records"] if r["scale"] == scale]
        sharded = sum(r["rows_read"] for r in ranks if r["mode"] == "sharded")
        whole = {r["rows_read"] for r in ranks if r["mode"] == "whole"}
        assert sharded <= runs[(scale, 1)]["examples"] and whole == {runs[(scale, 1)]["examples"]}
        assert sharded > runs[(scale, 1)]["examples"] - 2 * 32  # only the uneven tail is left out


@pytest.mark.multiproc
def test_zero_smoke(bench_cache, tmp_path):
    payload = _smoke("zero", tmp_path)
    assert not payload["failures"], payload["failures"]
    cases = {r["case"]: r for r in payload["records"]}
    assert set(cases) == {"lora ZeRO-0", "lora ZeRO-3"}
    for record in cases.values():
        assert abs(record["errors"]["model_states"]) < 0.05
    assert cases["lora ZeRO-3"]["deepspeed_estimate_bytes"] > 0
    assert cases["lora ZeRO-0"]["deepspeed_estimate_bytes"] is None  # DeepSpeed has no ZeRO-0 estimator


@pytest.mark.multiproc
def test_zero3_load_smoke(bench_cache, tmp_path):
    payload = _smoke("zero3_load", tmp_path)
    assert {r["variant"] for r in payload["records"]} == {"partitioned fp32", "unpartitioned fp32"}
    shares = {(row[0], row[2]): float(row[3]) for row in payload["tables"][0]["rows"]}
    assert all(0.4 <= shares[("partitioned fp32", rank)] <= 0.6 for rank in (0, 1)), shares
    assert all(shares[("unpartitioned fp32", rank)] == 1.0 for rank in (0, 1)), shares
    assert payload["ratios"][0]["per_repeat"]


@pytest.mark.multiproc
@pytest.mark.ray
def test_orchestration_smoke(bench_cache, tmp_path):
    payload = _smoke("orchestration", tmp_path)
    assert not payload["failures"], payload["failures"]
    runs = {r["variant"]: r for r in payload["records"]}
    assert set(runs) == {"torchrun", "ray"}
    for run in runs.values():
        assert run["samples_per_s"] > 0 and run["time_to_first_step_s"] > 0 and run["real_tokens_per_s"] > 0
        assert "cpu" in run  # None when the steady state is shorter than two samples


def test_cpu_share_splits_a_busy_training_process_from_the_rest():
    """A process spinning one core counts as about one core of training; nothing of it lands in 'other'."""
    from benchmarks.cpu_share import CpuSampler, cpu_between

    marker = "dft-cpu-share-test-spin"
    sampler = CpuSampler(interval=0.1).start()
    code = f"import time\n# {marker}\nend = time.time() + 1.5\nwhile time.time() < end: pass\ntime.sleep(1)"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = subprocess.Popen([sys.executable, "-c", code])
    started = time.time()
    child.wait(timeout=30)
    samples = sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    share = cpu_between(samples, started, started + 1.4, lambda name: marker in name)  # while it spins
    assert share is not None and share["seconds"] > 1
    # the child's CPU time in the window: most of what it used in all (however loaded the machine is)
    assert 0.5 * child_cpu < share["training_cores"] * share["seconds"] <= child_cpu + 0.05
    assert all(marker not in name for name, _ in share["others"])
    assert cpu_between(samples, started, started + 0.01, lambda name: True) is None  # < 2 samples


def test_training_processes_are_told_apart_by_launcher():
    from benchmarks.launch import is_training_process

    ray, torchrun = is_training_process("ray"), is_training_process("torchrun")
    assert ray("ray::RayTrainWorker") and not ray("ray::TrainController.run")
    assert torchrun("/venv/bin/python3 -u -m distributed_ft -q train ner")
    assert not torchrun("/venv/bin/python3 /venv/bin/torchrun --standalone -m distributed_ft train")


@pytest.mark.multiproc
def test_scaling_smoke(bench_cache, tmp_path):
    payload = _smoke("scaling", tmp_path)
    assert not payload["failures"], payload["failures"]
    efficiency = [r for r in payload["ratios"] if r["metric"].startswith("scaling efficiency")]
    assert efficiency and efficiency[0]["value"] > 0


def test_dft_plan_validate_single_process(tiny_bert, capsys):
    from distributed_ft.cli import main

    args = ["plan", "ner-conll2003", f"model.name={tiny_bert}", "data.max_length=32", "train.batch_size=4"]
    assert main([*args, "--validate", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("parameters", "gradients", "optimizer_states"):
        assert abs(result["errors"][key]) < 0.05, result["errors"]
    assert result["setup"]["activations_measured_by"].startswith("saved_tensors_hooks")
    assert result["measured"]["activations"] > 0
    assert main([*args, "peft.method=lora", "--validate"]) == 0
    text = capsys.readouterr().out
    assert "Plan vs measured" in text and "optimizer states" in text
