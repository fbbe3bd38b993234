"""Adversarial training on the input embeddings (``train.adversarial``: FGM or PGD).

A perturbation ``r`` is added to the output of an embedding module by a forward hook; the embedding
weights are never touched. Per micro-batch:

1. the clean forward adds a zero ``delta`` that requires grad, and ``torch.autograd.grad(clean, delta,
   retain_graph=True)`` gives the clean loss's gradient ``g`` on the embeddings (no parameter ``.grad``
   is written);
2. FGM: ``r = epsilon * g / ||g||``. PGD: ``steps`` ascent steps ``r <- project(r + alpha * g / ||g||)``
   onto the epsilon ball, each after the first taking ``g`` from one more forward at the current ``r``;
3. the adversarial forward adds ``r``; the caller backpropagates ``(clean + adversarial) / 2`` with its
   one ``engine.backward``.

Norms are L2 per example, over all its tokens and hidden units (padding gets no gradient, so no share
of the budget), as in Miyato et al.'s adversarial training for text. Every forward but the last runs the
bare model (``Engine.forward(bare=True)``): DDP's reduction hooks and DeepSpeed's micro-step accounting
only ever see the last forward and the one backward (DeepSpeed hooks its forward's outputs to run its
backward prologue and gradient reduction: a partial backward through them would reduce mid-step).
Each forward of a micro-batch is seeded alike, so the clean and adversarial passes draw the same dropout
masks and ``epsilon=0`` gives the plain step's gradients exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from distributed_ft.config.schema import TrainConfig
from distributed_ft.errors import ConfigError

Forward = Callable[[bool], torch.Tensor]
"""One forward of a micro-batch returning its summed loss; the argument is ``bare``."""


def target_module(model: nn.Module, target: str) -> nn.Module:
    """The module whose output is perturbed: the token embeddings, or the whole embeddings block.

    Raises:
        ConfigError: ``all`` on a model without an embeddings block (e.g. Llama: token embeddings only).
    """
    words = model.get_input_embeddings()
    if target == "word":
        return words
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "embeddings" and any(m is words for m in module.modules()):
            return module
    raise ConfigError(
        f"train.adversarial_target=all: {type(model).__name__} has no embeddings block around its token "
        "embeddings (positions are not added to them); use train.adversarial_target=word"
    )


def _unit(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` scaled to unit L2 norm per example (an all-zero example stays zero)."""
    flat = grad.detach().float().flatten(1)
    return functional.normalize(flat, dim=1, eps=1e-12).view_as(grad)


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``delta`` with every example's L2 norm clipped to ``epsilon`` (the projection onto the ball)."""
    return delta.flatten(1).renorm(p=2, dim=0, maxnorm=epsilon).view_as(delta)


class Adversary:
    """FGM / PGD perturbations of one embedding module's output.

    Args:
        module: The module whose output is perturbed (:func:`target_module`).
        epsilon: Radius of the per-example L2 ball.
        alpha: Size of each ascent step.
        steps: Ascent steps (FGM: one, of size ``epsilon``).
        method: ``fgm`` or ``pgd`` (for the description only).
    """

    def __init__(self, module: nn.Module, epsilon: float, alpha: float, steps: int, method: str) -> None:
        self.module, self.epsilon, self.alpha, self.steps, self.method = module, epsilon, alpha, steps, method
        self.delta: torch.Tensor | None = None
        self.last_delta: torch.Tensor | None = None
        """The perturbation of the last adversarial forward (float32, detached): tests read it."""

    @classmethod
    def from_config(cls, train: TrainConfig, model: nn.Module) -> Adversary | None:
        """The adversary ``train.adversarial*`` asks for on ``model``; ``None`` for ``none``."""
        if train.adversarial == "none":
            return None
        steps = train.adversarial_steps if train.adversarial == "pgd" else 1
        module = target_module(model, train.adversarial_target)
        alpha = train.adversarial_step_size
        return cls(module, train.adversarial_epsilon, alpha, steps, train.adversarial)

    def describe(self) -> str:
        """What the technique is and what it costs per micro-batch (the loop logs it at start)."""
        shape = f"epsilon {self.epsilon:g}" + (
            f", {self.steps} steps of {self.alpha:g}" if self.method == "pgd" else ""
        )
        return (
            f"adversarial training: {self.method} ({shape}) on {type(self.module).__name__} outputs; per "
            f"micro-batch {self.steps + 1} forwards, {self.steps} input-gradient backward(s) and one "
            "backward of both losses instead of 1 forward and 1 backward, with the activations of two "
            "forwards held until it (the step times and tokens_per_s in metrics.jsonl include the cost)"
        )

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        del module, args
        if self.delta is None:  # the clean forward: a zero to take the gradient on
            self.delta = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
            self.delta.requires_grad_(True)
        return output + self.delta.to(output.dtype)

    def _forward(self, forward: Forward, delta: torch.Tensor | None, bare: bool) -> torch.Tensor:
        self.delta = delta
        with self.module.register_forward_hook(self._hook):
            loss = forward(bare)
        return loss

    def losses(self, forward: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean loss and the loss to backpropagate, ``(clean + adversarial) / 2``.

        Args:
            forward: Runs one forward of the micro-batch (seeded alike each time) and returns its summed
                loss; its argument says whether to run the bare model.
        """
        try:
            clean = self._forward(forward, None, bare=True)
            delta = self.delta
            if delta is None:
                raise RuntimeError(f"{type(self.module).__name__} did not run in the model's forward")
            (grad,) = torch.autograd.grad(clean, delta, retain_graph=True)
            delta = delta.detach()
            for step in range(self.steps):
                delta = project(delta + self.alpha * _unit(grad), self.epsilon)
                if step < self.steps - 1:  # PGD: the gradient at the new point
                    delta.requires_grad_(True)
                    (grad,) = torch.autograd.grad(self._forward(forward, delta, bare=True), delta)
                    delta = delta.detach()
            adversarial = self._forward(forward, delta, bare=False)
        finally:
            self.delta = None
        self.last_delta = delta
        return clean, (clean + adversarial) / 2
