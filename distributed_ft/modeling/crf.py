"""A linear-chain CRF over a token classifier's emissions (``model.crf=true``).

The CRF is a submodule ``crf`` of the transformers model, so DDP and DeepSpeed ZeRO train (and partition)
its parameters like any other and it lands in the state dict, checkpoints and ``save_pretrained``. A forward
hook on the module the engine calls adds the CRF's scores to the model outputs (``outputs["crf"]``:
start, end and transition scores in float32); the task computes the negative log-likelihood and Viterbi
paths from them with the functions below. All of it is batched tensor code on the emissions' device; the
only loop is over sequence positions, and nothing is read on the host.

Sequences are *left-compacted*: ``mask[b]`` is a prefix of ``True`` (the words of example ``b``),
``False`` after it.

The export records the CRF in ``config.json`` (:data:`CONFIG_KEY`), which plain transformers keeps as an
unknown attribute and ignores (with the ``crf.*`` weights reported unused): it then gives argmax emissions.
:func:`restore` re-attaches the CRF with its trained weights where this project loads an export.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_ft.errors import ConfigError
from distributed_ft.modeling import heads

log = logging.getLogger("distributed_ft")

CONFIG_KEY = "dft_crf"
"""``config.json`` key of an export with a CRF: ``{"constraints": "none" | "iob2"}``."""
MODULE = "crf"
"""The CRF's attribute name on the transformers model (its state-dict prefix)."""
FORBIDDEN = -1.0e4
"""Score added to a forbidden transition: finite, so a (never expected) forbidden gold path stays finite."""


def scores_of(outputs: Any) -> Any:
    """The CRF's scores the hook added to a model's outputs, or ``None`` (no CRF, or other outputs)."""
    return outputs.get(MODULE) if isinstance(outputs, Mapping) else None


def iob2_allowed(labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed first tags and transitions under IOB2: ``I-X`` only after ``B-X`` or ``I-X``.

    Returns:
        ``(start [K] bool, transitions [K, K] bool: from row to column)``.
    """
    kinds = [label[2:] if label[:2] in ("B-", "I-") else None for label in labels]
    inside = [label.startswith("I-") for label in labels]
    start = torch.tensor([not i for i in inside])
    transitions = torch.ones(len(labels), len(labels), dtype=torch.bool)
    for to, kind in enumerate(kinds):
        if inside[to]:
            transitions[:, to] = torch.tensor([k == kind for k in kinds])
    return start, transitions


class LinearChainCRF(nn.Module):
    """Start, end and transition scores of ``num_tags`` tags; ``forward()`` returns them constrained.

    Args:
        num_tags: Number of tags (the classifier's labels).
        allowed: ``(start, transitions)`` masks of :func:`iob2_allowed`, or ``None`` (everything allowed).
    """

    def __init__(self, num_tags: int, allowed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        start, transitions = allowed or (
            torch.ones(num_tags, dtype=torch.bool),
            torch.ones(num_tags, num_tags, dtype=torch.bool),
        )
        penalty = torch.tensor(FORBIDDEN)
        self.register_buffer("start_penalty", torch.where(start, 0.0, penalty), persistent=False)
        self.register_buffer("transition_penalty", torch.where(transitions, 0.0, penalty), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(start [K], end [K], transitions [K, K])`` in float32, forbidden moves penalised.

        New tensors (not the parameters): valid after ZeRO-3 releases the gathered parameters.
        """
        start = self.start.float() + self.start_penalty.to(self.start.device)
        transitions = self.transitions.float() + self.transition_penalty.to(self.transitions.device)
        return start, self.end.float().clone(), transitions


def log_partition(emissions: torch.Tensor, mask: torch.Tensor, scores: tuple) -> torch.Tensor:
    """``log Z`` per sequence (forward algorithm in log space, float32); ``0`` for empty sequences.

    Args:
        emissions: ``[B, T, K]`` scores per position and tag.
        mask: ``[B, T]`` left-compacted positions that count.
        scores: ``(start, end, transitions)`` of :meth:`LinearChainCRF.forward`.
    """
    start, end, transitions = scores
    emissions, mask = emissions.float(), mask.bool()
    alpha = start + emissions[:, 0]
    for t in range(1, emissions.shape[1]):
        step = torch.logsumexp(alpha[:, :, None] + transitions + emissions[:, t, None, :], dim=1)
        alpha = torch.where(mask[:, t, None], step, alpha)
    return torch.where(mask[:, 0], torch.logsumexp(alpha + end, dim=1), 0.0)


def path_score(
    emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor, scores: tuple
) -> torch.Tensor:
    """The score of ``tags`` ``[B, T]`` per sequence (entries past each sequence's end are ignored)."""
    start, end, transitions = scores
    emissions, mask = emissions.float(), mask.bool()
    tags = torch.where(mask, tags, 0).long()
    emitted = emissions.gather(2, tags[:, :, None]).squeeze(2)
    moved = transitions[tags[:, :-1], tags[:, 1:]]
    total = start[tags[:, 0]] + emitted[:, 0]
    total = total + ((emitted[:, 1:] + moved) * mask[:, 1:]).sum(1)
    last = (mask.sum(1) - 1).clamp(min=0)
    total = total + end[tags.gather(1, last[:, None]).squeeze(1)]
    return torch.where(mask[:, 0], total, 0.0)


def nll(emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor, scores: tuple) -> torch.Tensor:
    """Summed negative log-likelihood of ``tags`` over the batch (``>= 0``; float32)."""
    return (log_partition(emissions, mask, scores) - path_score(emissions, tags, mask, scores)).sum()


def viterbi(emissions: torch.Tensor, mask: torch.Tensor, scores: tuple) -> torch.Tensor:
    """The best tag sequence per row ``[B, T]`` (``-1`` past each sequence's end), on the device."""
    start, end, transitions = scores
    emissions, mask = emissions.float(), mask.bool()
    batch, length, _ = emissions.shape
    best = start + emissions[:, 0]
    history = []
    for t in range(1, length):
        candidates = best[:, :, None] + transitions
        step, previous = candidates.max(dim=1)
        history.append(previous)
        best = torch.where(mask[:, t, None], step + emissions[:, t], best)
    current = (best + end).argmax(dim=1)
    path = torch.empty(batch, length, dtype=torch.long, device=emissions.device)
    for t in range(length - 1, 0, -1):  # positions past the end keep the last tag: not followed
        path[:, t] = current
        before = history[t - 1].gather(1, current[:, None]).squeeze(1)
        current = torch.where(mask[:, t], before, current)
    path[:, 0] = current
    return torch.where(mask, path, -1)


def compact(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the masked positions of each row to its left, in order: ``(values, mask)``, same shapes.

    ``values`` is ``[B, T]`` or ``[B, T, K]``; a stable sort on the device (no host sync).
    """
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
    index = order if values.dim() == 2 else order[:, :, None].expand_as(values)
    return values.gather(1, index), mask.gather(1, order)


# --------------------------------------------------------------------------- on a transformers model
def attach(model: nn.Module, constraints: str = "none") -> nn.Module:
    """Add a CRF for the model's labels as ``model.crf`` and record it in ``model.config``."""
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    allowed = iob2_allowed(labels) if constraints == "iob2" else None
    dtype = getattr(model, "dtype", torch.float32)  # the weights' dtype (``model.dtype``); scored in float32
    model.add_module(MODULE, LinearChainCRF(len(labels), allowed).to(dtype=dtype))
    setattr(model.config, CONFIG_KEY, {"constraints": constraints})
    return model


def spec(model: nn.Module) -> dict[str, Any] | None:
    """The CRF ``model.config`` records (``None``: no CRF)."""
    return heads.recorded(model, CONFIG_KEY)


def owner(model: nn.Module) -> nn.Module | None:
    """The transformers model under ``model`` (a PEFT wrapper or the model itself) if it has a CRF."""
    return heads.owner(model, MODULE)


def _add_scores(inner: nn.Module):
    def hook(module: nn.Module, args: Any, outputs: Any) -> Any:
        del module, args
        outputs[MODULE] = getattr(inner, MODULE)()  # looked up per call: PEFT wraps it (modules_to_save)
        return outputs

    return hook


def install(model: nn.Module) -> nn.Module:
    """Make the forward of ``model`` (what the engine calls) return the CRF scores as ``outputs["crf"]``.

    A no-op for a model without a CRF; PEFT's wrappers call the inner model's ``forward`` directly
    (no hooks there), so the hook goes on the outermost module.
    """
    inner = owner(model)
    if inner is not None and not getattr(model, "_dft_crf_hook", False):
        model.register_forward_hook(_add_scores(inner))
        model._dft_crf_hook = True
    return model


def restore(model: nn.Module, directory: str | Path, weights_in_directory: bool = True) -> nn.Module:
    """Re-attach the CRF an export's config records, with its weights from the export's safetensors.

    Args:
        model: The transformers model loaded from ``directory`` (without the CRF).
        directory: The export (a local directory).
        weights_in_directory: ``False`` for the base of an adapter export: PEFT loads the CRF's weights
            from the adapter (``modules_to_save``).

    Raises:
        ConfigError: The config records a CRF whose weights the directory's safetensors lack.
    """
    recorded = spec(model)
    if not recorded or hasattr(model, MODULE):
        return model
    attach(model, recorded.get("constraints", "none"))
    if not weights_in_directory:
        return model
    prefix = f"{MODULE}."
    weights = heads.saved_weights(directory, MODULE)
    if not weights:
        raise ConfigError(
            f"{directory}/config.json records a CRF ({CONFIG_KEY}) but no safetensors file there holds its "
            f"{prefix}* weights: export the run again (dft export RUN_DIR --out DIR), or drop {CONFIG_KEY} "
            "from config.json to predict without the CRF"
        )
    getattr(model, MODULE).load_state_dict(weights)
    log.info("%s: the CRF's %s* weights (unused by transformers' loader) are loaded", directory, prefix)
    return model
