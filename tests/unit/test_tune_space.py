"""``dft tune``'s search space (``config/space.py``) and results table (``backends/ray_tune.py``), no Ray."""

from __future__ import annotations

import csv

import pytest
import yaml

from distributed_ft.backends.ray_tune import (
    TrialRow,
    base_config,
    search_mode,
    summarise,
    write_results,
)
from distributed_ft.cli import build_parser
from distributed_ft.config import load_config
from distributed_ft.config.load import validate
from distributed_ft.config.space import apply_params, check_space, parse_space, read_space
from distributed_ft.errors import ConfigError, LaunchError


def test_a_space_file_parses_into_dimensions(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "train.lr: {loguniform: [1e-5, 1e-3]}\n"  # YAML reads 1e-5 as a string
        "train.warmup_ratio: {uniform: [0, 0.2]}\n"
        "train.batch_size: {randint: [8, 33]}\n"
        "train.epochs: {choice: [2, 3]}\n"
    )
    space = read_space(path)
    assert space.keys == ["train.lr", "train.warmup_ratio", "train.batch_size", "train.epochs"]
    lr, warmup, batch, epochs = space.dimensions
    assert (lr.kind, lr.args) == ("loguniform", (1e-5, 1e-3))
    assert (warmup.kind, warmup.args) == ("uniform", (0.0, 0.2))
    assert (batch.kind, batch.args, batch.probes()) == ("randint", (8, 33), [8, 32])
    assert (epochs.kind, epochs.probes()) == ("choice", [2, 3])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train.learning_rate: {uniform: [1, 2]}",
            "space.yaml: train.learning_rate: unknown config key; did you mean 'train.lr'?",
        ),
        ("train.lr: {normal: [0, 1]}", "space.yaml: train.lr: give one distribution as {NAME: [...]}"),
        ("train.lr: 3e-5", "space.yaml: train.lr: give one distribution"),
        ("train.lr: {uniform: [1e-3, 1e-5]}", "space.yaml: train.lr: uniform needs low < high"),
        ("train.lr: {loguniform: [0, 1e-3]}", "space.yaml: train.lr: loguniform needs 0 < low"),
        ("train.lr: {uniform: [a, 1]}", "space.yaml: train.lr: uniform bounds must be numbers"),
        ("train.lr: {uniform: [1]}", "space.yaml: train.lr: uniform takes two bounds"),
        ("train.batch_size: {randint: [1.5, 8]}", "space.yaml: train.batch_size: randint bounds must be"),
        ("train.epochs: {choice: []}", "space.yaml: train.epochs: choice takes a list"),
        ("run.output_dir: {choice: [a, b]}", "space.yaml: run.output_dir: dft tune sets this key"),
        ("eval.metric: {choice: [f1, loss]}", "space.yaml: eval.metric: dft tune sets this key"),
        ("[1, 2]", "space.yaml: a search space maps dotted config keys"),
    ],
)
def test_a_bad_space_names_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_space(path)
    assert str(caught.value).startswith(str(tmp_path / message.split(": ", 1)[0]))
    assert message.split(": ", 1)[1] in str(caught.value)


def test_a_missing_space_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_space(tmp_path / "nope.yaml")


def _base(*overrides: str) -> dict:
    config, _ = load_config("ner-conll2003", ["data.validation=valid.conll", *overrides])
    return config.model_dump(mode="json")


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ({"train.epochs": {"choice": [2, 0]}}, "value 0"),
        ({"train.batch_size": {"randint": [0, 8]}}, "value 0"),
        ({"train.warmup_ratio": {"uniform": [0.5, 1.5]}}, "value 1.5"),
        ({"peft.method": {"choice": ["lora", "adapterz"]}}, "value 'adapterz'"),
    ],
)
def test_every_bound_and_choice_must_pass_the_config_schema(spec, bad):
    space = parse_space(spec, "space.yaml")
    with pytest.raises(ConfigError) as caught:
        check_space(space, _base())
    message = str(caught.value)
    key = next(iter(spec))
    assert message.startswith(f"space.yaml: {key}: {bad} is refused by the config: ")


def test_a_sampled_config_is_the_base_with_the_values_set():
    base = _base("train.lr=3e-5")
    sampled = validate(apply_params(base, {"train.lr": 1e-4, "train.epochs": 2}))
    assert (sampled.train.lr, sampled.train.epochs) == (1e-4, 2)
    assert base["train"]["lr"] == 3e-5  # the base is not changed
    check_space(parse_space({"train.lr": {"loguniform": [1e-5, 1e-3]}}), base)  # a good space passes


def test_the_base_config_needs_a_validation_split_and_one_process_per_trial():
    space = parse_space({"train.lr": {"loguniform": [1e-5, 1e-3]}})
    no_validation, _ = load_config("ner-conll2003", ["data.validation=null"])
    with pytest.raises(ConfigError, match=r"data\.validation"):
        base_config(no_validation, space)
    several, _ = load_config("ner-conll2003", ["data.validation=v.conll", "run.num_workers=2"])
    with pytest.raises(ConfigError, match=r"run\.num_workers=1"):
        base_config(several, space)
    on_ray, _ = load_config("ner-conll2003", ["data.validation=v.conll", "run.backend=ray"])
    assert base_config(on_ray, space)["run"]["backend"] == "local"


def test_the_search_direction_comes_from_the_metric():
    assert search_mode("token_classification", "f1") == "max"
    assert search_mode("token_classification", "loss") == "min"
    assert search_mode("causal_lm", "perplexity") == "min"


def _row(name: str, metric: float | None, stopped: bool, status: str = "ok") -> TrialRow:
    return TrialRow(name, {"train.lr": 1e-4}, metric, 10, 10 if stopped else 30, stopped, 1.0, status)


def test_the_best_trial_is_the_best_completed_one(tmp_path):
    rows = [_row("trial-0", 0.9, stopped=True), _row("trial-1", 0.7, False), _row("trial-2", 0.5, False)]
    assert summarise(tmp_path, "f1", "max", rows).best.trial == "trial-1"  # a stopped trial never wins
    assert summarise(tmp_path, "loss", "min", rows).best.trial == "trial-2"
    only_stopped = [_row("trial-0", 0.9, True), _row("trial-1", 0.8, True)]
    assert summarise(tmp_path, "f1", "max", only_stopped).best.trial == "trial-0"
    with pytest.raises(LaunchError, match="error: boom"):
        summarise(tmp_path, "f1", "max", [_row("trial-0", None, False, "error: boom")])


def test_results_table_and_best_yaml_are_written(tmp_path):
    rows = [_row("trial-0", 0.25, stopped=True), _row("trial-1", 0.5, stopped=False)]
    summary = summarise(tmp_path, "f1", "max", rows)
    best = validate(apply_params(_base(f"run.output_dir={tmp_path}/x"), {"train.lr": 1e-4}))
    files = write_results(summary, best)
    with files["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["trial"] for r in table] == ["trial-0", "trial-1"]
    assert table[0]["best_f1"] == "0.25" and table[0]["stopped_early"] == "True"
    assert "Best trial: trial-1, validation f1 0.5 at step 10" in files["md"].read_text()
    written = yaml.safe_load(files["best"].read_text())
    assert written["run"]["output_dir"] is None and written["train"]["lr"] == 1e-4
    assert validate(written).train.lr == 1e-4  # loadable as a config


def test_dft_tune_requires_a_space_and_a_trial_count():
    parser = build_parser()
    args = parser.parse_args(["tune", "ner-conll2003", "train.lr=1e-4", "--space", "s.yaml", "--trials", "4"])
    assert (args.space, args.trials, args.overrides) == ("s.yaml", 4, ["train.lr=1e-4"])
    with pytest.raises(SystemExit):
        parser.parse_args(["tune", "ner-conll2003", "--trials", "4"])
