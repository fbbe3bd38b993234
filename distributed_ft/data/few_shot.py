"""Few-shot selection of the training split (``data.shots_per_label``), deterministic by the seed.

What "k per label" means: every example has a set of labels (classification: its class, or its classes
when multi-label; token classification: the entity types of its mentions, a sentence counting once per
type however many mentions of it it holds). The selection holds, for every label, **exactly k examples
that carry it** whenever the data allows it:

1. labels are filled rarest first (fewest examples carrying them; ties by name);
2. candidates come in one seeded random order of the examples (``numpy`` ``Generator`` of
   ``SeedSequence([seed, FEW_SHOT_STREAM])``);
3. a candidate is taken while its label has fewer than k, and only if it pushes no label past k;
4. a label still short after that pass (all its remaining examples carry a label already full) takes its
   next candidates regardless; the labels that then exceed k are reported.

Single-label classification therefore always gets exactly k per class. Examples without any label (NER
sentences with no entity) are never selected. A label carried by fewer than k examples is an error.
The selected examples keep their order in the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from distributed_ft.errors import DataError

FEW_SHOT_STREAM = 0x5E1EC7
"""Second word of the seed sequence, so the selection's random stream is its own."""


@dataclass
class ShotSelection:
    """The rows chosen and, per label, how many chosen rows carry it."""

    rows: list[int]
    counts: dict[str, int]
    over: dict[str, int] = field(default_factory=dict)
    """Labels carried by more than k chosen rows (co-occurrence left no other choice)."""


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    """A generator of its own for ``(seed, stream)`` (any integer ``train.seed``, negative included)."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, stream]))


def select_shots(
    label_sets: Sequence[Sequence[str]], k: int, seed: int, *, unit: str, what: str
) -> ShotSelection:
    """Choose rows so that every label is carried by k of them (see the module docstring).

    Args:
        label_sets: The labels of each row.
        k: ``data.shots_per_label``.
        seed: ``train.seed``.
        unit: What a row is, for the error (``examples``, ``sentences``).
        what: What a label is, for the error (``class``, ``entity type``).
    """
    sets = [set(labels) for labels in label_sets]
    carriers: dict[str, list[int]] = {}
    for row, labels in enumerate(sets):
        for label in labels:
            carriers.setdefault(label, []).append(row)
    for label in sorted(carriers):
        if len(carriers[label]) < k:
            raise DataError(
                f"data.shots_per_label={k}: {what} {label!r} has only {len(carriers[label])} training "
                f"{unit}; lower data.shots_per_label to at most {len(carriers[label])}, or add training "
                f"{unit} with {label!r}"
            )
    rank = np.empty(len(sets), dtype=np.int64)
    rank[seeded_rng(seed, FEW_SHOT_STREAM).permutation(len(sets))] = np.arange(len(sets))
    order = sorted(carriers, key=lambda label: (len(carriers[label]), label))
    candidates = {label: sorted(carriers[label], key=lambda row: rank[row]) for label in order}
    counts = dict.fromkeys(order, 0)
    chosen: set[int] = set()

    def take(row: int) -> None:
        chosen.add(row)
        for label in sets[row]:
            counts[label] += 1

    for label in order:  # strict pass: nobody past k
        for row in candidates[label]:
            if counts[label] >= k:
                break
            if row not in chosen and all(counts[other] < k for other in sets[row]):
                take(row)
    for label in order:  # what co-occurrence left short
        for row in candidates[label]:
            if counts[label] >= k:
                break
            if row not in chosen:
                take(row)
    over = {label: n for label, n in counts.items() if n > k}
    return ShotSelection(sorted(chosen), counts, over)


def entity_types(tags: Sequence[str]) -> set[str]:
    """The entity types of an IOB2 tag sequence (every mention starts with ``B-``)."""
    return {tag[2:] for tag in tags if tag.startswith("B-")}


def few_shot_sentences(table: pa.Table, k: int, seed: int) -> tuple[pa.Table, str]:
    """The sentences of a ``tokens``/``tags`` table that hold k sentences per entity type, and a log line."""
    sets = [entity_types(tags) for tags in table.column("tags").to_pylist()]
    selection = select_shots(sets, k, seed, unit="sentences", what="entity type")
    return table.take(selection.rows), _note(selection, k, table.num_rows, "sentences")


def few_shot_examples(table: pa.Table, k: int, seed: int) -> tuple[pa.Table, str]:
    """The examples of a ``labels`` table that hold k examples per class, and a log line."""
    selection = select_shots(table.column("labels").to_pylist(), k, seed, unit="examples", what="class")
    return table.take(selection.rows), _note(selection, k, table.num_rows, "examples")


def _note(selection: ShotSelection, k: int, total: int, unit: str) -> str:
    line = f"data.shots_per_label={k}: {len(selection.rows):,} of {total:,} training {unit}"
    if selection.over:
        shown = ", ".join(f"{label} in {n}" for label, n in sorted(selection.over.items()))
        line += f" (co-occurrence put some labels past {k}: {shown})"
    return line
