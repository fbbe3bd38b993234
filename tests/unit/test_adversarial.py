"""Adversarial training (train.adversarial: fgm | pgd) on the input embeddings of a tiny BERT NER model."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "integration" / "scripts"))
import grad_equivalence

from distributed_ft.config.load import dump_config, load_config, validate
from distributed_ft.engine.torch_engine import TorchEngine
from distributed_ft.errors import ConfigError
from distributed_ft.modeling.build import build_model
from distributed_ft.modeling.peft import apply_peft
from distributed_ft.runtime.context import LocalContext
from distributed_ft.tasks.token_classification import TokenClassificationTask
from distributed_ft.train.adversarial import Adversary, target_module
from distributed_ft.train.step import micro_batch_seeds, model_inputs, train_step

LABELS = grad_equivalence.LABELS
EPSILON = 0.5


def _window(vocab: int = 40) -> list[dict[str, torch.Tensor]]:
    rows = grad_equivalence.examples(vocab)
    return [grad_equivalence.collate(rows[i : i + 4]) for i in range(0, len(rows), 8)]  # 2 micro-batches


def _engine(tiny_bert, *overrides: str) -> tuple[TorchEngine, TokenClassificationTask, Adversary | None]:
    config, _ = load_config(None, [f"model.name={tiny_bert}", "train.max_grad_norm=null", *overrides])
    torch.manual_seed(0)  # the same classifier initialisation in every engine of a test
    model = apply_peft(build_model("token_classification", config.model, LABELS), config)
    engine = TorchEngine(config, LocalContext())
    engine.prepare(model, total_steps=1)
    return engine, TokenClassificationTask(config), Adversary.from_config(config.train, engine.module)


def _step(tiny_bert, *overrides: str, train: bool = True) -> tuple[dict[str, torch.Tensor], Adversary | None]:
    """The gradients of one training step (the optimizer step is replaced by their capture).

    The capture also checks that every parameter is bitwise what it was before the step's forwards.
    """
    engine, task, adversary = _engine(tiny_bert, *overrides)
    engine.train(train)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def capture() -> None:
        for name, param in engine.module.named_parameters():
            assert torch.equal(param, before[name]), f"{name} was modified by the forwards"
            if param.grad is not None:
                grads[name] = param.grad.detach().clone()

    engine.step = capture
    seeds = micro_batch_seeds(0, 1, [0, 1])
    train_step(engine, task, _window(), LocalContext(), seeds, adversary)
    if adversary is not None:
        hooks = adversary.module._forward_hooks.values()
        assert all(getattr(h, "__self__", None) is not adversary for h in hooks), "the hook outlived the step"
    return grads, adversary


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("method", [["train.adversarial=fgm"], ["train.adversarial=pgd"]])
def test_fgm_and_pgd_change_the_gradients_and_never_modify_the_weights(tiny_bert, method):
    plain, _ = _step(tiny_bert)
    adversarial, _ = _step(tiny_bert, *method, f"train.adversarial_epsilon={EPSILON}")
    assert _max_difference(plain, adversarial) > 1e-4
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert adversarial[embeddings].abs().sum() > 0  # trained by both losses, never written by the adversary


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_epsilon_zero_gives_the_plain_steps_gradients(tiny_bert, method):
    """The clean and adversarial halves add up to the plain loss: same dropout masks, zero perturbation."""
    plain, _ = _step(tiny_bert)
    zero, _ = _step(tiny_bert, f"train.adversarial={method}", "train.adversarial_epsilon=0")
    for name, grad in plain.items():
        torch.testing.assert_close(zero[name], grad, atol=1e-7, rtol=1e-6, msg=name)


def test_fgm_perturbs_along_the_clean_losss_gradient_with_norm_epsilon(tiny_bert):
    engine, task, adversary = _engine(
        tiny_bert, "train.adversarial=fgm", f"train.adversarial_epsilon={EPSILON}"
    )
    engine.train(False)
    batch = _window()[0]
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        output.retain_grad()
        captured.append(output)

    with adversary.module.register_forward_hook(keep):  # the reference: .grad of the embedding output
        task.loss_sum(engine.forward(model_inputs(batch)), batch).backward()
    reference = captured[0].grad
    engine.module.zero_grad(set_to_none=True)

    def forward(bare: bool = False) -> torch.Tensor:
        return task.loss_sum(engine.forward(model_inputs(batch), bare=bare), batch)

    clean, objective = adversary.losses(forward)
    delta = adversary.last_delta
    norms = delta.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, EPSILON), atol=1e-6, rtol=0)
    expected = EPSILON * reference / reference.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    assert objective > clean  # an ascent direction: the adversarial loss is the larger half
    assert all(p.grad is None for p in engine.module.parameters())  # the probe wrote no .grad


def test_pgd_stays_in_the_epsilon_ball(tiny_bert):
    steps = ["train.adversarial=pgd", f"train.adversarial_epsilon={EPSILON}", "train.adversarial_steps=4"]
    _, adversary = _step(tiny_bert, *steps, f"train.adversarial_alpha={EPSILON}")  # 4 x alpha > epsilon
    norms = adversary.last_delta.flatten(1).norm(dim=1)
    assert adversary.steps == 4 and (norms <= EPSILON * (1 + 1e-5)).all(), norms
    assert norms.max() > 0.99 * EPSILON  # the projection was active, not a tiny step
    _, small = _step(tiny_bert, *steps)  # default alpha: epsilon / steps
    assert small.alpha == pytest.approx(EPSILON / 4)


def test_target_all_perturbs_the_embeddings_block(tiny_bert, tiny_llama):
    engine, _, adversary = _engine(tiny_bert, "train.adversarial=fgm", "train.adversarial_target=all")
    assert adversary.module is engine.module.bert.embeddings
    word, _ = _step(tiny_bert, "train.adversarial=fgm")
    block, _ = _step(tiny_bert, "train.adversarial=fgm", "train.adversarial_target=all")
    assert _max_difference(word, block) > 1e-5
    config, _ = load_config(None, [f"model.name={tiny_llama}", "task=causal_lm"])
    llama = build_model("causal_lm", config.model, None)
    assert target_module(llama, "word") is llama.get_input_embeddings()
    with pytest.raises(ConfigError, match=re.escape("train.adversarial_target=word")):
        target_module(llama, "all")


def test_gradient_checkpointing_gives_the_same_adversarial_gradients(tiny_bert):
    fgm = ["train.adversarial=pgd", "train.adversarial_steps=2"]
    plain, _ = _step(tiny_bert, *fgm, train=False)
    checkpointed, _ = _step(tiny_bert, *fgm, "model.gradient_checkpointing=true", train=False)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_lora_with_frozen_embeddings_trains_adversarially(tiny_bert):
    lora = ["peft.method=lora", "model.gradient_checkpointing=true"]
    plain, _ = _step(tiny_bert, *lora)
    adversarial, adversary = _step(tiny_bert, *lora, "train.adversarial=fgm")
    assert plain.keys() == adversarial.keys() and all("lora_" in n or "classifier" in n for n in plain)
    assert _max_difference(plain, adversarial) > 1e-5
    assert adversary.last_delta.abs().sum() > 0  # a gradient reached the frozen embeddings' output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.adversarial=fgm", "deepspeed.zero_stage=3"],
            "train.adversarial=fgm with deepspeed.zero_stage=3",
        ),
        (["train.adversarial=fgm", "train.adversarial_steps=2"], "train.adversarial_steps is a PGD setting"),
        (["train.adversarial_epsilon=0.1"], "train.adversarial_epsilon is set but train.adversarial=none"),
    ],
)
def test_conflicting_adversarial_keys_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_zero_stage_two_and_plain_runs_accept_it():
    config, _ = load_config(None, ["train.adversarial=pgd", "deepspeed.zero_stage=2"])
    assert config.run.engine == "deepspeed" and config.train.adversarial_step_size == pytest.approx(1 / 3)
    assert load_config(None, [])[0].train.adversarial == "none"


def test_a_resolved_config_with_every_default_loads_again():
    """config.yaml holds every key: the adversarial defaults beside train.adversarial=none are no conflict."""
    config, _ = load_config(None, [])
    assert validate(yaml.safe_load(dump_config(config))).train == config.train
    fgm, _ = load_config(None, ["train.adversarial=fgm", "train.adversarial_epsilon=0.3"])
    assert validate(yaml.safe_load(dump_config(fgm))).train == fgm.train
