"""Each task's metrics, their direction and its default: the table ``eval.metric`` and the tasks read.

Torch-free, so a metric the task does not have fails when the config loads; ``tasks/*.py`` take their
``metrics`` from here, and ``eval.metric`` resolves to the default (:func:`resolve_metric`).
"""

from __future__ import annotations

TASK_METRICS: dict[str, dict[str, str]] = {
    "token_classification": {
        "f1": "max",
        "precision": "max",
        "recall": "max",
        "macro_f1": "max",
        "token_accuracy": "max",
        "loss": "min",
    },
    "sequence_classification": {
        "accuracy": "max",
        "macro_f1": "max",
        "micro_f1": "max",
        "weighted_f1": "max",
        "loss": "min",
    },
    "causal_lm": {"loss": "min", "perplexity": "min"},
}
"""Task -> metric name -> ``"max"`` or ``"min"``: what ``eval.metric`` may be and which way is better."""

DEFAULT_METRICS: dict[str, str] = {
    "token_classification": "f1",
    "sequence_classification": "macro_f1",
    "causal_lm": "loss",
}
"""The metric ``eval.metric`` resolves to when it is not given."""


def resolve_metric(task: str, metric: str | None) -> str:
    """``metric``, or the task's default when ``None``; a metric the task does not have is a ValueError."""
    if metric is None:
        return DEFAULT_METRICS[task]
    if metric not in TASK_METRICS[task]:
        raise ValueError(
            f"eval.metric={metric!r} is not a {task} metric; use one of {', '.join(TASK_METRICS[task])} "
            f"(default {DEFAULT_METRICS[task]})"
        )
    return metric
