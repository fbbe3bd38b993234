"""Labelled text records for sequence classification: label parsing, entity markers, validation.

Every error names ``file:line`` (via :func:`distributed_ft.data.readers.row_location`) and says what to do.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from distributed_ft.data import readers
from distributed_ft.data.readers import RowLocation
from distributed_ft.errors import DataError

DEFAULT_MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")


def entity_markers(value: bool | list[str]) -> list[str]:
    """The marker tokens ``data.entity_markers`` asks for (``True``: the four default markers)."""
    if value is True:
        return list(DEFAULT_MARKERS)
    return list(value) if value else []


def add_marker_tokens(tokenizer: Any, markers: list[str]) -> int:
    """Add ``markers`` as unsplittable, un-normalised tokens (idempotent); returns how many were new."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [AddedToken(m, special=True, normalized=False) for m in markers if m not in vocab]
    return tokenizer.add_tokens(new, special_tokens=True) if new else 0


def parse_labels(
    value: Any, where: str | RowLocation, column: str, multi_label: bool, delimiter: str | None
) -> list[str]:
    """The label(s) of one record as strings; raises naming ``where`` when the value is unusable."""
    if not multi_label:
        if isinstance(value, list | dict):
            raise DataError(
                f"{where}: {column!r} holds a {type(value).__name__}; for several labels per example "
                "set data.multi_label=true"
            )
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: empty {column!r}; every training/evaluation example needs a label")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return [str(value).strip()]
    if value is None:
        return []
    if isinstance(value, str):
        if delimiter:
            value = value.split(delimiter)
        elif value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: {column!r} starts with '[' but is not a JSON list ({e.msg})"
                ) from None
        else:
            value = [value]
    if not isinstance(value, list):
        value = [value]
    for item in value:
        if not isinstance(item, str | int):
            raise DataError(
                f"{where}: {column!r} must hold label strings, found {type(item).__name__}: {item!r}"
            )
    return list(dict.fromkeys(s for s in (str(item).strip() for item in value) if s))


def check_markers(text: str, markers: list[str], where: str | RowLocation) -> None:
    """Each marker once, every opening marker (even positions) before its closing one."""
    for opening, closing in zip(markers[::2], markers[1::2], strict=False):
        counts = (text.count(opening), text.count(closing))
        if counts != (1, 1) or text.index(opening) > text.index(closing):
            raise DataError(
                f"{where}: expected {opening} ... {closing} exactly once, in that order "
                f"(found {counts[0]} {opening} and {counts[1]} {closing}): {text[:120]!r}"
            )


def text_value(value: Any, where: str | RowLocation, column: str) -> str:
    """``value`` when it is a non-empty string; raises naming ``where`` otherwise."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} must be a string, found {type(value).__name__}: {value!r}")
    if not value.strip():
        raise DataError(f"{where}: empty {column!r}; remove the record or give it a text")
    return value


def label_order(labels: set[str]) -> list[str]:
    """Sorted labels; numerically when every label is an integer (``2`` before ``10``)."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def check_known_labels(table: pa.Table, known: list[str]) -> None:
    """Raise at the first label of ``table`` that the training data does not have."""
    known_set = set(known)
    for row, labels in enumerate(table.column("labels").to_pylist()):
        unknown = [label for label in labels if label not in known_set]
        if unknown:
            raise DataError(
                f"{readers.row_location(table, row)}: label {unknown[0]!r} does not occur in the training "
                f"data; the training data has labels: {', '.join(known)}; add examples of it to the training "
                "data or fix the label"
            )
