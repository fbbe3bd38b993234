"""Gradients of one accumulation window on 2 DDP ranks (tests only).

Usage: ``torchrun --nproc_per_node 2 grad_equivalence.py MODEL_DIR OUT_DIR [ADVERSARIAL]``
(``ADVERSARIAL``: a ``train.adversarial`` method, default ``none``). Both ranks build the same
tiny token-classification model, take their half of :func:`examples` as micro-batches of 4 (rank 0's
examples carry more targets than rank 1's) and run one ``train_step`` through the real TorchEngine (DDP
over gloo). The optimizer step is replaced by a capture of the averaged gradients, which rank 0 writes to
``OUT_DIR/grads.pt``; the test compares them with one process taking all examples as one batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from distributed_ft.config.load import validate
from distributed_ft.engine.torch_engine import TorchEngine
from distributed_ft.modeling.build import build_model
from distributed_ft.runtime.context import create_context
from distributed_ft.tasks.token_classification import TokenClassificationTask
from distributed_ft.train.adversarial import Adversary
from distributed_ft.train.step import train_step

LABELS = ["O", "B-X", "I-X"]


def examples(vocab: int, count: int = 16, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    """Examples of lengths 5-14; the first half (rank 0's) keeps every label, the second only a few."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        length = int(torch.randint(5, 15, (1,), generator=generator))
        labels = torch.randint(0, len(LABELS), (length,), generator=generator)
        labels[0] = labels[-1] = -100  # [CLS] / [SEP]
        if index >= count // 2:
            labels[3:] = -100
        rows.append({"input_ids": torch.randint(5, vocab, (length,), generator=generator), "labels": labels})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.int64),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.int64),
        "labels": torch.full((len(rows), width), -100, dtype=torch.int64),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n] = row["input_ids"], row["labels"]
        batch["attention_mask"][i, :n] = 1
    return batch


def window_gradients(
    model_dir: str, context, micro_batches: list[list[dict]], adversarial: str = "none"
) -> dict[str, torch.Tensor]:
    """One ``train_step`` of the TorchEngine over ``micro_batches``; returns the (averaged) gradients."""
    train = {"max_grad_norm": None, "adversarial": adversarial}
    config = validate({"model": {"name": model_dir}, "train": train})
    torch.manual_seed(0)  # the same classifier initialisation on every rank and in the reference
    model = build_model("token_classification", config.model, LABELS)
    engine = TorchEngine(config, context)
    engine.prepare(model, total_steps=1)
    engine.train(False)  # no dropout: the comparison is exact arithmetic, not sampling
    captured: dict[str, torch.Tensor] = {}

    def capture() -> None:
        captured.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()})

    engine.step = capture
    adversary = Adversary.from_config(config.train, engine.module)
    batches = [collate(rows) for rows in micro_batches]
    train_step(engine, TokenClassificationTask(config), batches, context, adversary=adversary)
    return captured


def main(model_dir: str, out: Path, adversarial: str = "none") -> int:
    context = create_context()
    vocab = 40
    rows = examples(vocab)
    half = len(rows) // context.world_size
    mine = rows[context.rank * half : (context.rank + 1) * half]
    micro_batches = [mine[i : i + 4] for i in range(0, len(mine), 4)]
    grads = window_gradients(model_dir, context, micro_batches, adversarial)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(grads, out / "grads.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:]))
