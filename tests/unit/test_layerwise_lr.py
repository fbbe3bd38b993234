"""Discriminative fine-tuning: learning rates by depth (train.layer_lr_decay) and for the head."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distributed_ft.config.load import load_config
from distributed_ft.engine.optim import build_optimizer, build_scheduler, parameter_depths, scheduled_lr
from distributed_ft.modeling.peft import apply_peft
from distributed_ft.train.job import load_task

LR, DECAY, HEAD_LR = 1e-4, 0.5, 1e-3


def _model(tiny_bert, *overrides: str):
    config, _ = load_config(None, [f"model.name={tiny_bert}", f"train.lr={LR}", *overrides])
    _, task = load_task(config)
    return config, apply_peft(task.build_model(["O", "B-PER", "I-PER"]), config)


def _rates(optimizer) -> dict[int, float]:
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_each_layer_trains_at_its_depths_rate_and_the_head_at_head_lr(tiny_bert):
    config, model = _model(tiny_bert, f"train.layer_lr_decay={DECAY}", f"train.head_lr={HEAD_LR}")
    optimizer = build_optimizer(model, config.train, config.task)
    rates, layers = _rates(optimizer), model.config.num_hidden_layers
    for name, param in model.named_parameters():
        if name.startswith(("classifier.", "crf.")):  # both heads (the recipe's CRF included)
            expected = HEAD_LR
        elif name.startswith("bert.embeddings."):
            expected = LR * DECAY ** (layers + 1)
        else:
            index = int(name.split("encoder.layer.")[1].split(".")[0])
            expected = LR * DECAY ** (layers - index)
        assert rates[id(param)] == pytest.approx(expected), name
    scheduler = build_scheduler(optimizer, config.train, total_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduled_lr(scheduler, LR) == pytest.approx(LR * scheduler.lr_lambdas[0](3))  # what the log shows
    for group in optimizer.param_groups:  # weight decay still skips biases and norms
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_lora_adapters_take_their_layers_rate(tiny_bert):
    config, model = _model(
        tiny_bert, "peft.method=lora", f"train.layer_lr_decay={DECAY}", f"train.head_lr={HEAD_LR}"
    )
    rates = _rates(build_optimizer(model, config.train, config.task))
    trained = {n: rates[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.num_hidden_layers
    assert trained and all(id(p) not in rates for p in model.parameters() if not p.requires_grad)
    for name, rate in trained.items():
        if ".classifier." in name or ".crf." in name:
            assert rate == HEAD_LR, name
        else:
            assert "lora_" in name
            index = int(name.split("encoder.layer.")[1].split(".")[0])
            assert rate == pytest.approx(LR * DECAY ** (layers - index)), name


def test_depths_follow_the_layer_stack(tiny_bert):
    _, model = _model(tiny_bert)
    depths, layers = parameter_depths(model)
    by_name = {n: depths[id(p)] for n, p in model.named_parameters()}
    assert by_name["bert.embeddings.word_embeddings.weight"] == 0
    assert by_name["bert.encoder.layer.0.attention.self.query.weight"] == 1
    assert by_name["classifier.weight"] == layers + 1


def test_without_the_keys_the_groups_are_the_plain_two(tiny_bert):
    config, model = _model(tiny_bert)
    groups = build_optimizer(model, config.train, config.task).param_groups
    assert [g["weight_decay"] for g in groups] == [config.train.weight_decay, 0.0]
    assert {g["lr"] for g in groups} == {LR}


ZERO_GROUPS = """
import json, sys
from distributed_ft.config.load import load_config
from distributed_ft.engine import build_engine
from distributed_ft.runtime.context import LocalContext
from distributed_ft.train.job import build_model, load_task

config, _ = load_config(None, sys.argv[1:])
_, task = load_task(config)
engine = build_engine(config, LocalContext(use_gpu=False))
engine.prepare(build_model(config, task, ["O", "B-PER", "I-PER"], engine), 10)
groups = engine.scheduler.optimizer.param_groups
print(json.dumps({"initial": [g["initial_lr"] for g in groups], "lr": engine.lr}))
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_the_rates_survive_deepspeed_zero(tiny_bert, stage):
    """The optimizer DeepSpeed steps holds the groups' rates (a fresh process: DeepSpeed keeps globals)."""
    pytest.importorskip("deepspeed")
    rates = [f"train.layer_lr_decay={DECAY}", f"train.head_lr={HEAD_LR}"]
    overrides = [f"model.name={tiny_bert}", f"train.lr={LR}", f"deepspeed.zero_stage={stage}", *rates]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    done = subprocess.run(
        [sys.executable, "-c", ZERO_GROUPS, *overrides], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    layers = 2
    expected = {HEAD_LR} | {LR * DECAY ** (layers - i) for i in range(layers)} | {LR * DECAY ** (layers + 1)}
    assert {round(r / LR, 9) for r in got["initial"]} == {round(r / LR, 9) for r in expected}
    assert got["lr"] == 0.0  # the first warm-up step of train.lr's schedule
