"""Augmented copies of the training split (``data.augment.*``), deterministic by the seed.

Everything new is drawn from the training split itself (after few-shot selection): no outside
vocabulary, no model. The originals come first, then ``multiplier`` copies of every example, each copy
keeping its original's ``line`` (errors and locations name the source sentence).

- Token classification (``tokens``/``tags``, IOB2): each mention ``B-X I-X*`` is replaced with chance
  ``mention_replace`` by another distinct mention of type X seen in the split, re-tagged ``B-X I-X...``;
  every other word is replaced with chance ``token_substitute`` by another word seen with the same tag
  (``O``, ``B-X`` or ``I-X``). Tags stay valid IOB2 and words and tags the same length.
- Sequence classification (``text`` and ``text_pair``): each whitespace-separated word gets, with chance
  ``token_noise``, one operation picked uniformly: swap with the next word, delete (never the last word),
  or substitute by another word of the training texts. Words holding an entity marker are left alone.

Randomness: one ``numpy`` ``Generator`` of ``SeedSequence([seed, AUGMENT_STREAM])`` consumed in row order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distributed_ft.config.schema import TextAugmentConfig, TokenAugmentConfig
from distributed_ft.data.few_shot import seeded_rng

AUGMENT_STREAM = 0xA6
"""Second word of the seed sequence, so augmentation's random stream is its own."""


@dataclass
class AugmentStats:
    """What augmentation did: examples before and after, and the operations applied."""

    original: int
    multiplier: int
    operations: dict[str, int]

    @property
    def augmented(self) -> int:
        """The augmented examples added."""
        return self.original * self.multiplier

    def describe(self, unit: str) -> str:
        """``augment: 240 -> 480 training sentences (multiplier 1: 130 mention replacements, ...)``."""
        done = ", ".join(f"{n:,} {name.replace('_', ' ')}" for name, n in self.operations.items())
        return (
            f"augment: {self.original:,} -> {self.original + self.augmented:,} training {unit} "
            f"(data.augment.multiplier={self.multiplier}: {done})"
        )


class Pool:
    """Distinct items in first-seen order; draws one that differs from a given item."""

    def __init__(self) -> None:
        self.items: list = []
        self.index: dict = {}

    def add(self, item) -> None:
        """Keep ``item`` unless it is already there."""
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)

    def other(self, rng: np.random.Generator, item):
        """A uniformly drawn item other than ``item`` (``None`` when there is none)."""
        own = self.index.get(item)
        n = len(self.items) - (own is not None)
        if n <= 0:
            return None
        pick = int(rng.integers(n))
        return self.items[pick + (own is not None and pick >= own)]


def mentions(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(type, start, end)`` of each IOB2 mention, ``end`` exclusive."""
    spans: list[tuple[str, int, int]] = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-"):
            spans.append((tag[2:], i, i + 1))
        elif tag.startswith("I-") and spans and spans[-1][2] == i and spans[-1][0] == tag[2:]:
            spans[-1] = (spans[-1][0], spans[-1][1], i + 1)
    return spans


# --------------------------------------------------------------------------- token classification
class SentenceAugmenter:
    """Mention replacement and same-tag word substitution from one training split's words and mentions."""

    def __init__(self, tokens: list[list[str]], tags: list[list[str]], config: TokenAugmentConfig) -> None:
        self.config = config
        self.mentions: dict[str, Pool] = {}
        self.words: dict[str, Pool] = {}
        for words, labels in zip(tokens, tags, strict=True):
            for word, tag in zip(words, labels, strict=True):
                self.words.setdefault(tag, Pool()).add(word)
            for kind, start, end in mentions(labels):
                self.mentions.setdefault(kind, Pool()).add(tuple(words[start:end]))

    def __call__(
        self, words: list[str], tags: list[str], rng: np.random.Generator, counts: dict[str, int]
    ) -> tuple[list[str], list[str]]:
        """One augmented copy of a sentence; ``counts`` gets the operations applied."""
        out_words: list[str] = []
        out_tags: list[str] = []
        position = 0
        for kind, start, end in [*mentions(tags), ("", len(tags), len(tags))]:
            self._substitute(words[position:start], tags[position:start], rng, counts, out_words, out_tags)
            position = end
            if not kind:
                break
            replacement = None
            if rng.random() < self.config.mention_replace:
                replacement = self.mentions[kind].other(rng, tuple(words[start:end]))
            if replacement is None:
                self._substitute(words[start:end], tags[start:end], rng, counts, out_words, out_tags)
                continue
            counts["mention_replacements"] += 1
            out_words += replacement
            out_tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(replacement) - 1)
        return out_words, out_tags

    def _substitute(self, words, tags, rng, counts, out_words: list[str], out_tags: list[str]) -> None:
        for word, tag in zip(words, tags, strict=True):
            new = self.words[tag].other(rng, word) if rng.random() < self.config.token_substitute else None
            counts["token_substitutions"] += new is not None
            out_words.append(word if new is None else new)
            out_tags.append(tag)


def augment_sentences(
    table: pa.Table, config: TokenAugmentConfig, seed: int
) -> tuple[pa.Table, AugmentStats]:
    """The training sentences followed by ``config.multiplier`` augmented copies of each."""
    tokens, tags = table.column("tokens").to_pylist(), table.column("tags").to_pylist()
    augmenter = SentenceAugmenter(tokens, tags, config)
    rng = seeded_rng(seed, AUGMENT_STREAM)
    counts = {"mention_replacements": 0, "token_substitutions": 0}
    new_tokens, new_tags = [], []
    for _ in range(config.multiplier):
        for words, labels in zip(tokens, tags, strict=True):
            words, labels = augmenter(words, labels, rng, counts)
            new_tokens.append(words)
            new_tags.append(labels)
    copies = _copies(table, config.multiplier, {"tokens": new_tokens, "tags": new_tags})
    return pa.concat_tables([table, copies]), AugmentStats(table.num_rows, config.multiplier, counts)


# --------------------------------------------------------------------------- sequence classification
class TextNoise:
    """Word swaps, deletions and substitutions with words of the training texts."""

    OPERATIONS = ("swaps", "deletions", "substitutions")

    def __init__(self, texts: list[str], markers: Sequence[str], probability: float) -> None:
        self.markers, self.probability = tuple(markers), probability
        self.vocabulary = Pool()
        for text in texts:
            for word in text.split():
                if not self._protected(word):
                    self.vocabulary.add(word)

    def _protected(self, word: str) -> bool:
        return any(marker in word for marker in self.markers)

    def __call__(self, text: str, rng: np.random.Generator, counts: dict[str, int]) -> str:
        """One noised copy of ``text``; ``counts`` gets the operations applied."""
        words = text.split()
        out: list[str] = []
        i = 0
        while i < len(words):
            word = words[i]
            if self._protected(word) or rng.random() >= self.probability:
                out.append(word)
                i += 1
                continue
            operation = self.OPERATIONS[int(rng.integers(len(self.OPERATIONS)))]
            if operation == "swaps" and i + 1 < len(words) and not self._protected(words[i + 1]):
                out += [words[i + 1], word]
                i += 2
            elif operation == "deletions" and len(words) > 1:
                i += 1
            elif operation == "substitutions" and (new := self.vocabulary.other(rng, word)) is not None:
                out.append(new)
                i += 1
            else:  # the operation does not apply here
                out.append(word)
                i += 1
                continue
            counts[operation] += 1
        return " ".join(out) if out else text


def augment_texts(
    table: pa.Table, config: TextAugmentConfig, seed: int, markers: Sequence[str] = ()
) -> tuple[pa.Table, AugmentStats]:
    """The training examples followed by ``config.multiplier`` noised copies of each (labels kept)."""
    columns = [c for c in ("text", "text_pair") if c in table.column_names]
    values = {c: table.column(c).to_pylist() for c in columns}
    noise = TextNoise([t for c in columns for t in values[c]], markers, config.token_noise)
    rng = seeded_rng(seed, AUGMENT_STREAM)
    counts = dict.fromkeys(TextNoise.OPERATIONS, 0)
    new: dict[str, list[str]] = {c: [] for c in columns}
    for _ in range(config.multiplier):
        for row in range(table.num_rows):
            for c in columns:
                new[c].append(noise(values[c][row], rng, counts))
    copies = _copies(table, config.multiplier, new)
    return pa.concat_tables([table, copies]), AugmentStats(table.num_rows, config.multiplier, counts)


def _copies(table: pa.Table, multiplier: int, columns: dict[str, list]) -> pa.Table:
    """``multiplier`` copies of ``table``'s rows with ``columns`` replaced (same schema and metadata)."""
    copies = table.take(np.tile(np.arange(table.num_rows), multiplier))
    for name, values in columns.items():
        position = copies.schema.get_field_index(name)
        copies = copies.set_column(
            position, copies.schema.field(position), pa.array(values, table.schema.field(name).type)
        )
    return copies
