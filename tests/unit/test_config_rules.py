"""Config rules a new user meets first: per-task metrics, engine selection, recipes as units, heads."""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from distributed_ft.cli import main
from distributed_ft.config import dump_config, load_config
from distributed_ft.config.load import validate
from distributed_ft.config.schema import DATA_SECTIONS, DataConfig, ModelConfig, key_owners
from distributed_ft.config.task_metrics import DEFAULT_METRICS, TASK_METRICS
from distributed_ft.errors import ConfigError
from distributed_ft.modeling.build import build_model
from distributed_ft.tasks import TASKS


@pytest.fixture
def logged(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """Records of the ``distributed_ft`` logger (which may not propagate once logging is set up)."""
    logger = logging.getLogger("distributed_ft")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # each record once
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


# --------------------------------------------------------------------------- per-task metrics
@pytest.mark.parametrize("task", sorted(TASK_METRICS))
def test_eval_metric_defaults_to_the_tasks_metric(task):
    assert validate({"task": task}).eval.metric == DEFAULT_METRICS[task]


def test_tasks_declare_the_metrics_of_the_config_table():
    for name, (module, cls) in TASKS.items():
        task = getattr(importlib.import_module(module), cls)
        assert task.metrics == TASK_METRICS[name]


def test_a_metric_the_task_lacks_fails_at_load_naming_task_and_metrics():
    with pytest.raises(ConfigError) as info:
        load_config("text-classification", ["eval.metric=f1"])
    message = str(info.value)
    assert "eval.metric='f1' is not a sequence_classification metric" in message
    assert "accuracy, macro_f1, micro_f1, weighted_f1, loss" in message


def test_a_task_override_drops_the_recipes_metric_and_config_show_prints_the_default(capsys):
    config, _ = load_config(None, ["task=sequence_classification"])
    assert config.eval.metric == "macro_f1"
    assert (config.data.train, config.data.test) == (None, None)  # the recipe's NER data went with its task
    config, _ = load_config(None, ["task=sequence_classification", "eval.metric=accuracy"])
    assert config.eval.metric == "accuracy"
    assert main(["config", "show", "task=causal_lm"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["eval"]["metric"] == "loss"


# --------------------------------------------------------------------------- engine selection
def test_a_deepspeed_key_selects_the_deepspeed_engine(logged):
    config, _ = load_config(None, ["deepspeed.zero_stage=3"])
    assert (config.run.engine, config.deepspeed.zero_stage) == ("deepspeed", 3)
    assert "deepspeed.zero_stage=3 is set: using run.engine=deepspeed" in logged.text
    assert load_config(None, [])[0].run.engine == "torch"


def test_a_deepspeed_key_beside_an_explicit_torch_engine_is_an_error():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["deepspeed.zero_stage=3", "run.engine=torch"])
    assert str(info.value) == (
        "deepspeed.zero_stage=3 is set but run.engine=torch: drop one, or set run.engine=deepspeed"
    )


def test_a_recipe_with_deepspeed_keys_selects_the_engine(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("deepspeed:\n  zero_stage: 1\n  offload_optimizer: true\n")
    config, _ = load_config(str(path))
    assert config.run.engine == "deepspeed" and config.deepspeed.offload_optimizer


@pytest.mark.parametrize("overrides", [[], ["run.engine=deepspeed", "deepspeed.zero_stage=3"]])
def test_a_resolved_config_reloads_unchanged(overrides):
    """config.yaml of a run holds every key (deepspeed defaults beside run.engine=torch included)."""
    config, _ = load_config(None, overrides)
    assert validate(yaml.safe_load(dump_config(config))) == config


def test_dft_plan_plans_the_zero_stage_a_deepspeed_key_asks_for(tmp_path, capsys):
    import transformers

    transformers.BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    ).save_pretrained(tmp_path)
    assert (
        main(["plan", f"model.name={tmp_path}", "deepspeed.zero_stage=3", "--tokens", "1e6", "--json"]) == 0
    )
    setup = json.loads(capsys.readouterr().out)["setup"]
    assert (setup["engine"], setup["effective_zero_stage"]) == ("deepspeed", 3)


# --------------------------------------------------------------------------- per-task data sections
@pytest.mark.parametrize("task", sorted(DATA_SECTIONS))
def test_each_task_gets_the_shared_data_keys_plus_its_own(task):
    data = validate({"task": task}).data
    assert type(data) is DATA_SECTIONS[task]
    own = set(type(data).model_fields) - set(DataConfig.model_fields)
    assert own and all(task in key_owners(key) for key in own)
    others = {k for t, s in DATA_SECTIONS.items() if t != task for k in s.model_fields} - set(
        type(data).model_fields
    )
    assert others and not others & set(validate({"task": task}).model_dump()["data"])


@pytest.mark.parametrize(
    ("task", "key", "owner"),
    [
        ("token_classification", "packing", "causal_lm"),
        ("token_classification", "text_column", "sequence_classification"),
        ("sequence_classification", "tags_column", "token_classification"),
        ("causal_lm", "class_weights", "sequence_classification"),
    ],
)
def test_a_key_of_another_task_is_an_error_naming_its_task(task, key, owner):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"task={task}", f"data.{key}=x"])
    assert str(info.value) == (
        f"data.{key} is a {owner} key, but this job's task is {task}: drop it, or set task={owner}"
    )


def test_a_format_of_another_task_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.format=conll is read by token_classification only"):
        load_config("text-classification", ["data.format=conll"])
    with pytest.raises(ConfigError, match=r"data\.format=folder is read by sequence_classification only"):
        load_config(None, ["data.format=folder"])


def test_a_task_override_drops_the_recipes_keys_of_the_old_task(logged):
    config, _ = load_config("text-classification", ["task=token_classification"])
    assert config.data.tags_column == "tags" and not hasattr(config.data, "label_column")
    assert "data.label_column=main_type" in logged.text and "data.class_weights=balanced" in logged.text
    config, _ = load_config("text-classification", ["task=causal_lm", "data.max_length=64"])
    assert config.data.max_length == 64  # a shared key stays


def test_a_task_override_drops_the_recipes_crf(logged):
    assert load_config("ner-conll2003", [])[0].model.crf  # the reference recipe's head
    config, _ = load_config("ner-conll2003", ["task=sequence_classification"])
    assert not config.model.crf and "model.crf=True" in logged.text
    with pytest.raises(ConfigError, match="task=sequence_classification has no CRF"):
        load_config("ner-conll2003", ["task=sequence_classification", "model.crf=true"])


def test_a_misspelt_task_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"did you mean 'data\.label_column'"):
        load_config("text-classification", ["data.label_colum=x"])


# --------------------------------------------------------------------------- recipes as units
def test_a_new_train_split_drops_the_recipes_other_splits(logged):
    config, _ = load_config("ner-conll2003", ["data.train=x.conll", "data.validation=y.conll"])
    assert (config.data.train, config.data.validation, config.data.test) == ("x.conll", "y.conll", None)
    assert "data.test=builtin:conll2003/test" in logged.text
    config, _ = load_config("ner-conll2003", ["data.train=x.conll"])
    assert (config.data.validation, config.data.test) == (None, None)


def test_splits_given_or_not_overridden_are_kept():
    given = ["data.train=x.conll", "data.validation=y.conll", "data.test=z.conll"]
    assert load_config("ner-conll2003", given)[0].data.test == "z.conll"
    data = load_config("ner-conll2003")[0].data
    assert (data.train, data.validation, data.test) == (
        "builtin:conll2003/train",
        "builtin:conll2003/validation",
        "builtin:conll2003/test",
    )
    data = load_config("ner-conll2003", ["data.test=z.conll"])[0].data  # a new test set only
    assert (data.train, data.test) == ("builtin:conll2003/train", "z.conll")


# --------------------------------------------------------------------------- heads
@pytest.fixture(scope="module")
def ner9(tiny_bert, tmp_path_factory) -> Path:
    """A tiny BERT with a 9-label token-classification head, as ``save_pretrained`` writes it."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    labels = ["O", *(f"{p}-{t}" for t in ("PER", "LOC", "ORG", "MISC") for p in "BI")]
    folder = tmp_path_factory.mktemp("ner9")
    model = AutoModelForTokenClassification.from_pretrained(
        str(tiny_bert),
        num_labels=9,
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_bert)).save_pretrained(folder)
    return folder


NER9 = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
NER5 = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]


def _classifier(model: torch.nn.Module) -> torch.Tensor:
    return model.classifier.weight.detach().clone()


def test_auto_replaces_a_head_of_another_size_with_one_log_line(ner9, logged):
    model = build_model("token_classification", ModelConfig(name=str(ner9)), NER5)
    assert model.classifier.weight.shape[0] == 5 and model.config.id2label[0] == "B-LOC"
    lines = [r.getMessage() for r in logged.records if "re-initialised" in r.getMessage()]
    assert lines == [
        f"model {ner9} has a 9-label token-classification head; this job has 5 labels "
        "(model.reset_head=auto): the head is re-initialised (classifier.weight, classifier.bias)"
    ]


def test_false_makes_a_mismatched_head_a_config_error(ner9):
    with pytest.raises(ConfigError) as info:
        build_model("token_classification", ModelConfig(name=str(ner9), reset_head=False), NER5)
    assert str(info.value) == (
        f"model {ner9} has a 9-label token-classification head; this job has 5 labels: "
        "set model.reset_head=auto to replace it"
    )


def test_a_fitting_head_is_kept_unless_reset_head_is_true(ner9, logged):
    from transformers import AutoModelForTokenClassification

    saved = _classifier(AutoModelForTokenClassification.from_pretrained(str(ner9)))
    for reset in ("auto", False):
        kept = build_model("token_classification", ModelConfig(name=str(ner9), reset_head=reset), NER9)
        assert torch.equal(_classifier(kept), saved)
    assert "re-initialised" not in logged.text
    fresh = build_model("token_classification", ModelConfig(name=str(ner9), reset_head=True), NER9)
    assert not torch.equal(_classifier(fresh), saved) and not fresh.classifier.bias.any()
    assert "model.reset_head=true: the head is re-initialised" in logged.text
    renamed = [label.lower() for label in NER9]  # same size, other labels: a mismatch
    with pytest.raises(ConfigError, match="token-classification head for the labels O, B-PER"):
        build_model("token_classification", ModelConfig(name=str(ner9), reset_head=False), renamed)


def test_sequence_classification_heads(tiny_bert, ner9, tmp_path):
    from transformers import AutoModelForSequenceClassification

    labels3 = ["neg", "neu", "pos"]
    three = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert),
        num_labels=3,
        id2label=dict(enumerate(labels3)),
        label2id={x: i for i, x in enumerate(labels3)},
    )
    three.save_pretrained(tmp_path / "sc3")
    model = build_model("sequence_classification", ModelConfig(name=str(tmp_path / "sc3")), ["no", "yes"])
    assert model.classifier.weight.shape[0] == 2
    with pytest.raises(
        ConfigError, match="has a 3-label sequence-classification head; this job has 2 labels"
    ):
        build_model(
            "sequence_classification", ModelConfig(name=str(tmp_path / "sc3"), reset_head=False), ["a", "b"]
        )
    # a token head is not a sentence head, even with as many labels
    with pytest.raises(
        ConfigError, match="9-label token-classification head, not a sequence-classification one"
    ):
        build_model("sequence_classification", ModelConfig(name=str(ner9), reset_head=False), NER9)
    saved = _classifier(three.from_pretrained(str(ner9), num_labels=9))
    model = build_model("sequence_classification", ModelConfig(name=str(ner9)), NER9)
    assert not torch.equal(_classifier(model), saved)


def test_a_base_model_gets_a_new_head_under_every_setting(tiny_bert):
    for reset in ("auto", False, True):
        model = build_model("token_classification", ModelConfig(name=str(tiny_bert), reset_head=reset), NER5)
        assert model.classifier.weight.shape[0] == 5


def test_reset_head_true_is_refused_for_causal_lm():
    with pytest.raises(ConfigError, match="causal_lm has no classification head"):
        load_config("instruction-tuning", ["model.reset_head=true"])
    assert load_config("instruction-tuning", ["model.reset_head=false"])[0].model.reset_head is False
