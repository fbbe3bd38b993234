"""Gazetteers (``data.gazetteer``): entity dictionaries matched on words, as per-token features.

A gazetteer file holds UTF-8 lines ``surface<TAB>TYPE``; a surface of several words is written with
spaces (``New York<TAB>LOC``); blank lines and lines starting with ``#`` are skipped. Matching is on the
words of a sentence (case-sensitive unless ``lowercase``): longest entry first, non-overlapping, greedy
from left to right. The words of a match get BIO features of its type, ids ``1 + 2 * t`` (``B-``) and
``2 + 2 * t`` (``I-``) for the ``t``-th type in sorted order; ``0`` is no match (and padding), so a
gazetteer of ``n`` types has ``1 + 2 * n`` feature ids.

Sub-tokens take their word's feature through the same ``word_ids()`` alignment as the labels
(:func:`align_features`); special tokens get ``0``. Torch-free: the tasks call it while encoding.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from distributed_ft.data.augment import mentions as tag_mentions
from distributed_ft.errors import DataError

COLUMN = "gazetteer"
"""The prepared column (and batch key) of the per-sub-token feature ids."""


@dataclass(frozen=True)
class Gazetteer:
    """A parsed gazetteer: entries by their words, the sorted types, and the matching option."""

    entries: dict[tuple[str, ...], int]
    """Words of a surface (lowercased with ``lowercase``) -> index of its type in :attr:`types`."""
    types: tuple[str, ...]
    lowercase: bool = False
    digest: str = ""
    """SHA-256 of the file's bytes (part of the data cache key)."""
    longest: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "longest", max((len(words) for words in self.entries), default=0))

    @property
    def num_features(self) -> int:
        """Feature ids, ``0`` (no match) included: ``1 + 2 * len(types)``."""
        return 1 + 2 * len(self.types)

    def feature_names(self) -> list[str]:
        """The name of each feature id: ``O``, then ``B-TYPE`` and ``I-TYPE`` per type."""
        return ["O"] + [f"{prefix}-{kind}" for kind in self.types for prefix in ("B", "I")]

    def word_features(self, words: list[str]) -> list[int]:
        """The feature id of each word: longest match first, non-overlapping, left to right."""
        keys = [w.lower() for w in words] if self.lowercase else list(words)
        features = [0] * len(keys)
        i = 0
        while i < len(keys):
            for n in range(min(self.longest, len(keys) - i), 0, -1):
                kind = self.entries.get(tuple(keys[i : i + n]))
                if kind is not None:
                    features[i] = 1 + 2 * kind
                    features[i + 1 : i + n] = [2 + 2 * kind] * (n - 1)
                    i += n
                    break
            else:
                i += 1
        return features


def file_digest(path: str | Path) -> str:
    """SHA-256 of a gazetteer file's bytes."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise DataError(f"data.gazetteer={path}: cannot read it ({exc}); give an existing file") from exc


def load_gazetteer(path: str | Path, lowercase: bool = False) -> Gazetteer:
    """Parse a gazetteer file.

    Raises:
        DataError: Unreadable file, a malformed line or a surface given two types (named ``file:line``),
            or no entries at all.
    """
    digest = file_digest(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is not part of a surface
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc}); save the gazetteer as UTF-8") from exc
    found: dict[tuple[str, ...], tuple[str, int]] = {}
    kinds: set[str] = set()  # every line's type, so the feature ids do not depend on ``lowercase``
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip(" \r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip() or " " in fields[1].strip():
            raise DataError(
                f"{path}:{number}: expected 'surface<TAB>TYPE' (one tab; words of the surface separated by "
                f"spaces, a type without spaces), got {raw!r}; fix the line or comment it out with '#'"
            )
        words = tuple(fields[0].lower().split() if lowercase else fields[0].split())
        kind = fields[1].strip()
        kinds.add(kind)
        if words in found and found[words][0] != kind:
            if lowercase:  # case variants of one surface: the first line wins
                continue
            first_kind, first_line = found[words]
            raise DataError(
                f"{path}:{number}: {fields[0]!r} is {kind} here but {first_kind} at line {first_line}; "
                "keep one type per surface"
            )
        found.setdefault(words, (kind, number))
    if not found:
        raise DataError(f"{path}: no 'surface<TAB>TYPE' entries; build one with `dft data gazetteer`")
    types = tuple(sorted(kinds))
    index = {kind: i for i, kind in enumerate(types)}
    entries = {words: index[kind] for words, (kind, _) in found.items()}
    return Gazetteer(entries, types, lowercase, digest)


def align_features(word_ids: list[int | None], word_features: list[int]) -> list[int]:
    """The feature of each sub-token: its word's (every sub-token of it), ``0`` for special tokens.

    ``word_ids`` is ``BatchEncoding.word_ids()`` of the (truncated) encoding, the alignment of the labels.
    """
    return [0 if word is None else word_features[word] for word in word_ids]


# --------------------------------------------------------------------------- building one from data
@dataclass
class BuiltGazetteer:
    """Surfaces collected from a tagged split: chosen type and its mention count per surface."""

    entries: dict[str, tuple[str, int]]
    mentions: int
    dropped: int
    """Surfaces below ``min_count``."""

    def counts(self) -> dict[str, int]:
        """Entries per type."""
        return dict(sorted(Counter(kind for kind, _ in self.entries.values()).items()))

    def describe(self) -> str:
        per_type = ", ".join(f"{kind} {n}" for kind, n in self.counts().items())
        return (
            f"{len(self.entries)} entries ({per_type}) from {self.mentions} mentions; "
            f"{self.dropped} surfaces below the minimum count left out"
        )


def collect_mentions(sentences: Iterable[tuple[list[str], list[str]]], min_count: int = 1) -> BuiltGazetteer:
    """Entity surfaces of IOB2-tagged ``(words, tags)``, each with its most frequent type.

    Ties go to the alphabetically first type; a surface seen fewer than ``min_count`` times (with its
    chosen type) is left out.
    """
    if min_count < 1:
        raise DataError(f"--min-count {min_count}: give a count of at least 1")
    seen: dict[str, Counter] = defaultdict(Counter)
    count_mentions = 0
    for words, tags in sentences:
        for kind, start, end in tag_mentions(tags):
            surface = " ".join(words[start:end])
            if "\t" not in surface and surface.strip():
                seen[surface][kind] += 1
                count_mentions += 1
    entries: dict[str, tuple[str, int]] = {}
    for surface, kinds in seen.items():
        kind, count = min(kinds.items(), key=lambda item: (-item[1], item[0]))
        if count >= min_count:
            entries[surface] = (kind, count)
    return BuiltGazetteer(entries, count_mentions, len(seen) - len(entries))


def write_gazetteer(built: BuiltGazetteer, path: str | Path, source: str) -> None:
    """Write ``surface<TAB>TYPE`` lines (by type, then surface) under a comment naming ``source``."""
    lines = [f"# built by `dft data gazetteer` from {source}: {built.describe()}"]
    for surface, (kind, _) in sorted(built.entries.items(), key=lambda item: (item[1][0], item[0])):
        lines.append(f"{surface}\t{kind}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
