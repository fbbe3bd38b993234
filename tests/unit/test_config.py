import pytest

from distributed_ft.cli import main
from distributed_ft.config import dump_config, load_config, recipe_names
from distributed_ft.config.load import validate
from distributed_ft.errors import ConfigError


@pytest.mark.parametrize("name", recipe_names())
def test_every_packaged_recipe_loads_and_round_trips(name):
    config, job_name = load_config(name)
    assert job_name == name
    again = validate(__import__("yaml").safe_load(dump_config(config)))
    assert again == config


def test_default_recipe_is_the_offline_ner_job():
    config, name = load_config(None)
    assert name == "ner-conll2003"
    assert config.task == "token_classification"
    assert config.model.name == "builtin:minilm-l6"
    assert config.data.train == "builtin:conll2003/train"


def test_overrides_are_parsed_as_yaml_values():
    config, _ = load_config(
        "ner-conll2003", ["train.lr=3e-5", "train.max_grad_norm=null", "peft.target_modules=[a, b]"]
    )
    assert config.train.lr == pytest.approx(3e-5)
    assert config.train.max_grad_norm is None
    assert config.peft.target_modules == ["a", "b"]


def test_yaml_file_source(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("task: token_classification\ntrain:\n  epochs: 1\n")
    config, name = load_config(str(path), ["train.batch_size=4"])
    assert (name, config.train.epochs, config.train.batch_size) == ("job", 1, 4)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train"),
        ("train.learning_rate=1", "unknown config key 'train.learning_rate'; did you mean 'train."),
        ("train.lr=fast", "config key 'train.lr': Input should be a valid number"),
        ("train.batch_size=0", "config key 'train.batch_size': Input should be greater than or equal to 1"),
        ("run.backend=slurm", "config key 'run.backend': Input should be 'local' or 'ray'"),
        ("deepspeed.offload_param=true", "deepspeed.offload_param needs deepspeed.zero_stage=3"),
        ("train.lr", "is not of the form key=value"),
    ],
)
def test_config_errors_are_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config("ner-conll2003", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'ner-conll2003'"):
        load_config("ner-conll2030")


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_cli_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", "ner-conll2003", "train.lr=2e-5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 2.0e-05" in out and "task: token_classification" in out


def test_cli_reports_config_error_without_traceback(capsys):
    assert main(["config", "show", "ner-conll2003", "train.epohcs=2"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train.epochs'" in err and "Traceback" not in err
