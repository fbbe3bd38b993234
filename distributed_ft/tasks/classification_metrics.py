"""Classification metrics without scikit-learn: accuracy, P/R/F1 (micro, macro, weighted), confusion."""

from __future__ import annotations

from typing import Any

import numpy as np


def _prf(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, ...]:
    precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(len(tp)), where=total > 0)
    return precision, recall, f1


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro/micro/weighted F1, per-class report and confusion matrix.

    Args:
        y_true: Gold label ids ``(n,)`` (single-label) or a 0/1 matrix ``(n, classes)`` (multi-label).
        y_pred: Predictions of the same shape.
        labels: Class names by id.

    Macro averages run over the classes that occur in the gold labels or the predictions (as
    scikit-learn does by default). Multi-label ``accuracy`` is exact-match (subset) accuracy.
    """
    classes = len(labels)
    multi = y_true.ndim == 2
    if multi:
        t, p = y_true.astype(bool), y_pred.astype(bool)
        tp, predicted, support = (t & p).sum(0), p.sum(0), t.sum(0)
        accuracy = float((t == p).all(1).mean()) if len(t) else 0.0
        confusion: dict[str, Any] = {
            label: [[int((~t[:, i] & ~p[:, i]).sum()), int((~t[:, i] & p[:, i]).sum())],
                    [int((t[:, i] & ~p[:, i]).sum()), int(tp[i])]]
            for i, label in enumerate(labels)
        }  # fmt: skip
    else:
        matrix = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(matrix, (y_true, y_pred), 1)
        tp, predicted, support = np.diag(matrix), matrix.sum(0), matrix.sum(1)
        accuracy = float(tp.sum() / max(len(y_true), 1))
        confusion = {"labels": labels, "matrix": matrix.tolist()}
    precision, recall, f1 = _prf(tp, predicted, support)
    present = (support > 0) | (predicted > 0)
    micro_p, micro_r, micro_f1 = _prf(
        np.array([tp.sum()]), np.array([predicted.sum()]), np.array([support.sum()])
    )
    weights = support / support.sum() if support.sum() else np.zeros(classes)
    return {
        "accuracy": accuracy,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "micro_f1": float(micro_f1[0]),
        "weighted_f1": float((f1 * weights).sum()),
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "micro_precision": float(micro_p[0]),
        "micro_recall": float(micro_r[0]),
        "examples": len(y_true),
        "multi_label": multi,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion,
    }


def format_classification_report(metrics: dict[str, Any]) -> str:
    """Per-class table, averages and (single-label, up to 20 classes) the confusion matrix."""
    width = max([12, *(len(name) + 2 for name in metrics["per_class"])])
    lines = [f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<{width}}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}"
            f"{row['support']:>10}"
        )
    lines.append("")
    support = sum(row["support"] for row in metrics["per_class"].values())
    for key, title in (("micro", "micro avg"), ("macro", "macro avg")):
        lines.append(
            f"{title:<{width}}{metrics[f'{key}_precision']:>10.4f}{metrics[f'{key}_recall']:>10.4f}"
            f"{metrics[f'{key}_f1']:>10.4f}{support:>10}"
        )
    kind = "exact-match accuracy" if metrics["multi_label"] else "accuracy"
    lines.append(f"{kind} {metrics['accuracy']:.4f} over {metrics['examples']:,} examples")
    confusion = metrics["confusion_matrix"]
    if not metrics["multi_label"] and len(confusion["labels"]) <= 20:
        names = confusion["labels"]
        cell = max(6, *(len(n) + 1 for n in names))
        lines += ["", "confusion matrix (rows: gold, columns: predicted)"]
        lines.append(" " * width + "".join(f"{n:>{cell}}" for n in names))
        lines += [
            f"{n:<{width}}" + "".join(f"{v:>{cell}}" for v in row)
            for n, row in zip(names, confusion["matrix"], strict=True)
        ]
    return "\n".join(lines)
