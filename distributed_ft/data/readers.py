"""Readers that turn labelled files (CoNLL, JSONL, CSV, Parquet) into ``pyarrow.Table``s.

Nothing is silently dropped: every malformed input raises :class:`DataError` naming ``file:line``,
what was found and what was expected. Token tags are normalised to IOB2. CoNLL, JSONL and CSV files are read
line by line (:func:`text_lines`), never as one whole-file string; a JSON array file is one value, read whole.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import functools
import glob
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_ft.errors import DataError

SCHEMES = ("iob1", "iob2", "iobes")
_EXTENSIONS = {
    **dict.fromkeys((".conll", ".txt", ".iob", ".bio", ".tsv"), "conll"),
    **dict.fromkeys((".jsonl", ".json"), "jsonl"),
    ".csv": "csv",
    **dict.fromkeys((".parquet", ".pq"), "parquet"),
}
# Extensionless CoNLL files are named like ``eng.train`` / ``eng.testa``.
_CONLL_SUFFIXES = {"", ".train", ".dev", ".test", ".testa", ".testb", ".valid", ".validation"}
_FORMATS = ("conll", "jsonl", "csv", "parquet")
_COLUMN_SPLIT = re.compile(r"[ \t]+")
_TAG_SHAPES = "expected 'O' or PREFIX-TYPE with PREFIX one of B, I, E, S (or BILOU's L, U), e.g. 'B-PER'"
_ENDS = frozenset("ESLU")  # prefixes only IOBES/BILOU use
_WHERE_FIX = "check data.train/data.validation/data.test"


@dataclass
class _Part:
    """Sentences read from one file; ``unit`` says how ``lines`` locate them (conll/line/record/row)."""

    path: str
    unit: str
    tokens: list[list[str]]
    tags: list[list[str]]
    lines: list[int]
    untagged: bool = False
    """A one-column CoNLL file (tokens only; prediction input)."""


def _where(path: str, unit: str, line: int, word: int = 0) -> str:
    """Format a location: ``file:line`` (CoNLL words are one per line), ``file: record N`` or ``row N``."""
    if unit == "conll":
        return f"{path}:{line + word}"
    if unit == "line":
        return f"{path}:{line}"
    return f"{path}: {unit} {line}"


def _expand(path: str | os.PathLike[str]) -> list[str]:
    """Return the files ``path`` names (a glob gives several, in sorted order)."""
    path = os.fspath(path)
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"{path}: no files match this pattern; {_WHERE_FIX}")
        return files
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; point to a file or a glob such as {path}/*.conll")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; {_WHERE_FIX}")
    return [path]


def input_files(path: str | os.PathLike[str]) -> list[str]:
    """The files an input names: a file, a glob's matches, or every file under a directory, sorted."""
    path = os.fspath(path)
    if os.path.isdir(path):  # a folder-per-class layout
        return sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    return _expand(path)


def _format_of(path: str, fmt: str) -> str:
    """Resolve ``fmt`` ("auto" picks from the extension) to one of conll/jsonl/csv/parquet."""
    if fmt != "auto":
        if fmt not in _FORMATS:
            raise DataError(f"{path}: unknown data.format={fmt!r}; use one of auto, {', '.join(_FORMATS)}")
        return fmt
    ext = Path(path).suffix.lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    if ext in _CONLL_SUFFIXES:
        return "conll"
    raise DataError(
        f"{path}: cannot tell the file format from the extension {ext!r}; "
        f"set data.format={'|'.join(_FORMATS)}"
    )


def _decode_error(path: str, line: int, raw: bytes, error: UnicodeDecodeError) -> DataError:
    """The error for a non-UTF-8 byte of ``raw`` (one line, or the whole file when ``line`` is 0)."""
    if line == 0:
        line = raw.count(b"\n", 0, error.start) + 1
    column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
    return DataError(
        f"{path}:{line}: byte 0x{raw[error.start]:02x} at column {column} is not UTF-8; "
        "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _read_text(path: str) -> str:
    """Read a whole (small) file as UTF-8 (a BOM is stripped); non-UTF-8 bytes raise with line and column.

    Only for inputs that are one value (a JSON array, a class folder's text file); others stream lines.
    """
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _decode_error(path, 0, data, e) from None


def text_lines(path: str) -> Iterator[str]:
    r"""The lines of a UTF-8 file, one at a time, each with its ``\n`` (a leading BOM is stripped).

    Lines end at ``\n`` only (``\r`` stays with the line); a non-UTF-8 byte raises naming
    ``path:line`` and the column.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(path, number, raw, e) from None


def _read_conll(path: str, tag_column: int, require_tags: bool = True) -> _Part:
    """Read a CoNLL file: one ``token ... tag`` line per word, blank lines between sentences.

    With the tag in the last column (``tag_column=-1``) lines may have differing numbers of columns (MeCab
    style: token, morphological fields, tag); a fixed column needs the same columns on every line. With
    ``require_tags=False`` a file of one column (tokens only, prediction input) is accepted too.
    """
    part = _Part(path, "conll", [], [], [])
    tokens: list[str] | None = None
    tags: list[str] = []
    ncols = first = 0
    for number, raw in enumerate(text_lines(path), 1):
        line = raw.strip(" \t\r\n")
        if not line:
            tokens = None
            continue
        cols = _COLUMN_SPLIT.split(line)
        if cols[0] == "-DOCSTART-":
            tokens = None
            continue
        if len(cols) != ncols:
            _check_columns(path, number, line, len(cols), ncols, first, tag_column, require_tags)
            if not ncols:
                ncols, first = len(cols), number
        if tokens is None:
            tokens, tags = [], []
            part.tokens.append(tokens)
            part.tags.append(tags)
            part.lines.append(number)
        tokens.append(cols[0])
        tags.append(cols[tag_column] if ncols > 1 else "O")
    part.untagged = ncols == 1
    return part


def _check_columns(
    path: str, number: int, line: str, found: int, ncols: int, first: int, tag_column: int, require_tags: bool
) -> None:
    """Raise naming ``path:number`` when a CoNLL line of ``found`` columns cannot be read."""
    if found < 2 and (require_tags or ncols > 1):
        raise DataError(
            f"{path}:{number}: expected at least 2 whitespace-separated columns (token ... tag), "
            f"found 1: {line!r}"
        )
    if ncols == 1 or (ncols and tag_column != -1):
        fix = "" if ncols == 1 else "; or set data.conll_tag_column=-1 (the tag is the last column)"
        raise DataError(
            f"{path}:{number}: found {found} columns but the first token line ({path}:{first}) has "
            f"{ncols}; every token line needs the same columns{fix}: {line!r}"
        )
    if found > 1 and not (1 <= tag_column < found or -found < tag_column <= -1):
        raise DataError(
            f"{path}:{number}: data.conll_tag_column={tag_column} is out of range for a line with "
            f"{found} columns (column 0 is the token); use 1..{found - 1} or -1..-{found - 1}"
        )


def _json_records(path: str) -> tuple[str, Iterable[tuple[int, Any]]]:
    """Yield ``(line, value)`` per JSONL line, or ``(N, record)`` for a file holding one JSON array.

    JSONL is read line by line; a JSON array is one value, so that file is read whole.
    """
    lines = text_lines(path)
    head = []
    for line in lines:
        head.append(line)
        if line.strip():
            break
    if head and head[-1].lstrip().startswith("["):
        lines.close()
        try:
            values = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        return "record", enumerate(values, 1)

    def records() -> Iterable[tuple[int, Any]]:
        for number, line in enumerate(itertools.chain(head, lines), 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno}); "
                    'expected one object per line such as {"tokens": [...], "tags": [...]}'
                ) from None

    return "line", records()


_Rows = tuple[str, list[int], list[dict]]  # (location unit, line numbers, rows)


def _jsonl_rows(path: str, columns: Sequence[str] | None, hint: str) -> _Rows:
    """Read JSON objects holding ``columns`` (default: the keys of the first object)."""
    unit, items = _json_records(path)
    lines, rows = [], []
    for number, value in items:
        where = _where(path, unit, number)
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(value).__name__}")
        columns = list(value) if columns is None else columns
        _require(where, "key", columns, list(value), hint)
        lines.append(number)
        rows.append({c: value[c] for c in columns})
    return unit, lines, rows


def _csv_rows(path: str, columns: Sequence[str] | None, hint: str) -> _Rows:
    """Read CSV rows under a header row; line numbers are physical lines (quoted newlines count)."""
    reader = csv.reader(text_lines(path))
    lines, rows = [], []
    try:
        header = [h.strip() for h in next(reader, [])]
        if not header:
            return "line", lines, rows
        columns = header if columns is None else columns
        _require(f"{path}:1", "column", columns, header, hint)
        index = [header.index(c) for c in columns]
        end = reader.line_num
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields and len(fields) != len(header):
                raise DataError(
                    f"{path}:{start}: found {len(fields)} fields but the header has {len(header)} "
                    f"({', '.join(header)}); quote fields that contain commas"
                )
            if fields:
                lines.append(start)
                rows.append({c: fields[i] for c, i in zip(columns, index, strict=True)})
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return "line", lines, rows


def _parquet_rows(path: str, columns: Sequence[str] | None, hint: str) -> _Rows:
    """Read Parquet rows (numbered from 1)."""
    try:
        names = pq.read_schema(path).names
        columns = names if columns is None else columns
        _require(path, "column", columns, names, hint)
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read it as Parquet ({e}); check the file or data.format") from None
    return "row", list(range(1, table.num_rows + 1)), table.to_pylist()


def _rows(path: str, fmt: str, columns: Sequence[str] | None, hint: str) -> _Rows:
    """Read JSONL/CSV/Parquet rows as dicts holding ``columns`` (default: those of the first row)."""
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    if fmt not in readers:
        raise DataError(f"{path}: {fmt} files hold no named columns; use JSONL, CSV or Parquet here")
    return readers[fmt](path, columns, hint)


def _require(where: str, what: str, wanted: Sequence[str], present: list[str], hint: str) -> None:
    """Raise if a wanted key/column is missing, listing those present."""
    for name in wanted:
        if name not in present:
            raise DataError(f"{where}: missing {what} {name!r}; found {what}s {present}; {hint}")


def _string_list(where: str, name: str, value: Any) -> list[str]:
    """Check ``value`` is a list of strings (a string holds space-separated words or a JSON list)."""
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return value.split()
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {name!r} starts with '[' but is not a JSON list ({e.msg})") from None
    if not isinstance(value, list):
        raise DataError(
            f"{where}: {name!r} must be a list of strings, found {type(value).__name__}: {value!r}"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(f"{where}: {name!r}[{i}] must be a string, found {type(item).__name__}: {item!r}")
    return value


def _read_pairs(path: str, fmt: str, tokens_column: str, tags_column: str) -> _Part:
    """Read token/tag list pairs from JSONL, CSV or Parquet rows."""
    hint = "set data.tokens_column / data.tags_column to the right names"
    unit, lines, rows = _rows(path, fmt, [tokens_column, tags_column], hint)
    part = _Part(path, unit, [], [], lines)
    for number, row in zip(lines, rows, strict=True):
        where = _where(path, unit, number)
        tokens = _string_list(where, tokens_column, row[tokens_column])
        tags = _string_list(where, tags_column, row[tags_column])
        if not tokens:
            raise DataError(f"{where}: empty {tokens_column!r} list; remove the record or add its words")
        if len(tokens) != len(tags):
            raise DataError(
                f"{where}: {len(tokens)} {tokens_column} but {len(tags)} {tags_column}; "
                "every word needs exactly one tag"
            )
        part.tokens.append(tokens)
        part.tags.append(tags)
    return part


@functools.lru_cache(maxsize=4096)
def _parse_tag(tag: str) -> tuple[str, str, str, str] | None:
    """Return ``(prefix, type, B-type, I-type)`` for a valid tag ("O" gives prefixes "O"), else None."""
    if tag == "O":
        return "O", "", "O", "O"
    if len(tag) > 2 and tag[0] in "BIESLU" and tag[1] == "-" and tag[2:].strip() == tag[2:]:
        return tag[0], tag[2:], "B-" + tag[2:], "I-" + tag[2:]
    return None


def _scan(seqs: Iterable[Sequence[str]], where: Callable[[int, int], str]) -> tuple[str, dict]:
    """Check every tag's shape; return the scheme and the first ``(row, word)`` that shows it."""
    first: dict[str, tuple[int, int]] = {}
    for r, tags in enumerate(seqs):
        prev_type = ""
        for w, tag in enumerate(tags):
            parsed = _parse_tag(tag) if isinstance(tag, str) else None
            if parsed is None:
                raise DataError(f"{where(r, w)}: tag {tag!r} is not a valid tag; {_TAG_SHAPES}")
            prefix, typ = parsed[0], parsed[1]
            if prefix in _ENDS:
                first.setdefault("iobes", (r, w))
            elif prefix == "I" and typ != prev_type:
                first.setdefault("iob1", (r, w))
            prev_type = typ
    scheme = "iobes" if "iobes" in first else "iob1" if "iob1" in first else "iob2"
    return scheme, first


def _convert(tags: Sequence[str]) -> list[str]:
    """Convert checked tags: B/S/U open an entity; I/E/L continue one of the same type, else open one."""
    out = []
    prev_prefix, prev_type = "O", ""
    for tag in tags:
        prefix, typ, b_tag, i_tag = _parse_tag(tag)  # _scan checked the shape
        if prefix == "O":
            out.append("O")
        elif prefix in "BSU" or typ != prev_type or prev_prefix not in "BI":
            out.append(b_tag)
        else:
            out.append(i_tag)
        prev_prefix, prev_type = prefix, typ
    return out


def detect_scheme(tag_sequences: Iterable[Sequence[str]]) -> str:
    """Detect the tagging scheme of tag sequences (one per sentence).

    Returns:
        ``"iobes"`` if any E-/S-/L-/U- tag occurs, else ``"iob1"`` if an ``I-X`` opens an entity,
        else ``"iob2"``.
    """
    return _scan(tag_sequences, lambda r, w: f"sentence {r + 1}, word {w + 1}")[0]


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
    """Convert one sentence's tags from ``scheme`` (iob1/iob2/iobes, BILOU accepted as iobes) to IOB2."""
    if scheme not in SCHEMES:
        raise DataError(f"unknown tag scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    first = _scan([tags], lambda _, w: f"word {w + 1}")[1]
    if scheme != "iobes" and "iobes" in first:
        w = first["iobes"][1]
        raise DataError(f"word {w + 1}: tag {tags[w]!r} does not occur in {scheme}; use scheme iobes")
    return _convert(tags)


def read_token_tags(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    *,
    tokens_column: str = "tokens",
    tags_column: str = "tags",
    conll_tag_column: int = -1,
    tag_scheme: str = "auto",
    require_tags: bool = True,
) -> pa.Table:
    """Read word/tag sentences from a file or glob.

    ``require_tags=False`` (prediction input) also accepts one-column CoNLL files; their words get ``O``
    and the table has no ``tags`` column.

    Returns:
        A table with ``tokens`` and ``tags`` (IOB2) as ``list<string>`` and ``line`` (where each sentence
        starts; the row number for Parquet). Schema metadata: ``source``, ``scheme`` (as detected),
        ``files`` (JSON ``[[file, rows, unit], ...]``), ``num_sentences``, ``num_tokens``.
    """
    if tag_scheme not in ("auto", *SCHEMES):
        raise DataError(f"unknown data.tag_scheme={tag_scheme!r}; use auto, {', '.join(SCHEMES)}")
    parts = []
    for file in _expand(path):
        fmt_i = _format_of(file, fmt)
        if fmt_i == "conll":
            part = _read_conll(file, conll_tag_column, require_tags)
        else:
            part = _read_pairs(file, fmt_i, tokens_column, tags_column)
        if not part.tokens:
            raise DataError(
                f"{file}: no sentences found; the file is empty or holds only blank/-DOCSTART- lines"
            )
        parts.append(part)

    starts = [0]
    for part in parts:
        starts.append(starts[-1] + len(part.tokens))

    def where(row: int, word: int = 0) -> str:
        i = bisect.bisect_right(starts, row) - 1
        return _where(parts[i].path, parts[i].unit, parts[i].lines[row - starts[i]], word)

    all_tags = [tags for part in parts for tags in part.tags]
    scheme, first = _scan(all_tags, where)
    if tag_scheme != "auto" and scheme not in (tag_scheme, "iob2"):
        row, word = first[scheme]
        raise DataError(
            f"{where(row, word)}: tag {all_tags[row][word]!r} does not fit data.tag_scheme={tag_scheme} "
            f"(the data looks like {scheme}); set data.tag_scheme=auto or {scheme}"
        )
    iob2 = [_convert(tags) for tags in all_tags]
    tokens = [t for part in parts for t in part.tokens]
    strings = pa.list_(pa.string())
    table = pa.table(
        {
            "tokens": pa.array(tokens, type=strings),
            "tags": pa.array(iob2, type=strings),
            "line": pa.array([n for p in parts for n in p.lines], type=pa.int64()),
        }
    )
    if all(p.untagged for p in parts):
        table = table.drop_columns(["tags"])
    return table.replace_schema_metadata(
        {
            "source": os.fspath(path),
            "scheme": scheme,
            "files": json.dumps([[p.path, len(p.tokens), p.unit] for p in parts]),
            "num_sentences": str(len(tokens)),
            "num_tokens": str(sum(map(len, tokens))),
        }
    )


def read_records(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    columns: list[str] | None = None,
    hint: str = "set data.text_column / data.label_column to the right names",
) -> pa.Table:
    """Read JSONL/CSV/Parquet rows (e.g. text classification data) from a file or glob.

    Args:
        path: File or glob.
        fmt: "auto" (from the extension), "jsonl", "csv" or "parquet".
        columns: Columns to keep; each row must have them. Default: those of the first row.
        hint: What the user can do about a missing column (ends the error message).

    Returns:
        A table with ``columns`` plus ``line`` (the row's line; the record/row number for JSON arrays and
        Parquet). CSV values are strings. Schema metadata: ``source``, ``num_rows`` and ``files`` (as in
        :func:`read_token_tags`, so :func:`row_location` can name ``file:line``).
    """
    tables, files = [], []
    for file in _expand(path):
        unit, lines, rows = _rows(file, _format_of(file, fmt), columns, hint)
        files.append([file, len(rows), unit])
        if not rows:
            raise DataError(f"{file}: no records found; the file is empty")
        names = columns or list(rows[0])
        if "line" in names:
            raise DataError(f"{file}: column 'line' is reserved for line numbers; rename it in the file")
        data = {}
        for name in names:
            try:
                data[name] = pa.array([row[name] for row in rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                kinds = [type(row[name]).__name__ for row in rows]
                bad = next((i for i, kind in enumerate(kinds) if kind != kinds[0]), 0)
                raise DataError(
                    f"{_where(file, unit, lines[bad])}: {name!r} holds a {kinds[bad]}, but a {kinds[0]} at "
                    f"{_where(file, unit, lines[0])}; make every value of the column the same type"
                ) from None
        data["line"] = pa.array(lines, type=pa.int64())
        tables.append(pa.table(data))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{path}: the files do not share column types ({e})") from None
    return table.replace_schema_metadata(
        {"source": os.fspath(path), "num_rows": str(table.num_rows), "files": json.dumps(files)}
    )


def read_class_folders(path: str | os.PathLike[str]) -> pa.Table:
    """Read a folder-per-class layout: ``path/<label>/<name>.txt``, one example per file.

    Returns:
        A table with ``text`` (the file's text, stripped), ``label`` (its folder's name) and ``line``
        (always 1), with ``files`` metadata so :func:`row_location` names each file.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; a folder-per-class layout is DIR/<label>/<file>.txt")
    texts, labels, files = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        examples = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not examples:
            raise DataError(
                f"{folder}: empty class folder (class {folder.name!r} would have no examples); add its text "
                "files or remove the folder"
            )
        for file in examples:
            text = _read_text(str(file)).strip()
            if not text:
                raise DataError(f"{file}:1: empty file; every file of {folder} must hold one example's text")
            texts.append(text)
            labels.append(folder.name)
            files.append([str(file), 1, "line"])
    if not texts:
        raise DataError(
            f"{root}: no examples found; expected one sub-folder per class holding one text file per example"
        )
    table = pa.table({"text": texts, "label": labels, "line": pa.array([1] * len(texts), pa.int64())})
    return table.replace_schema_metadata(
        {"source": os.fspath(path), "num_rows": str(table.num_rows), "files": json.dumps(files)}
    )


def _row_location(table: pa.Table, source: str, row: int, word: int) -> str:
    """Locate a word via the ``files`` metadata that :func:`read_token_tags` attaches."""
    line = table["line"][row].as_py()
    meta = table.schema.metadata or {}
    files = json.loads(meta.get(b"files", b"[]"))
    if len(files) == 1:  # line numbers stay right after slicing/filtering rows of one file
        return _where(files[0][0], files[0][2], line, word)
    if sum(n for _, n, _ in files) == table.num_rows:
        for file, n, unit in files:
            if row < n:
                return _where(file, unit, line, word)
            row -= n
    return f"{source}:{line}"


def row_location(table: pa.Table, row: int) -> str:
    """``file:line`` (or ``file: row N``) of ``table``'s row ``row``, for tables these readers return."""
    meta = table.schema.metadata or {}
    return _row_location(table, meta.get(b"source", b"<table>").decode(), row, 0)


class RowLocation:
    """:func:`row_location` of a row, worked out only when formatted (i.e. in an error message)."""

    def __init__(self, table: pa.Table, row: int) -> None:
        self.table, self.row = table, row

    def __str__(self) -> str:
        return row_location(self.table, self.row)


def validate_tags(table: pa.Table, label_set: Iterable[str], source: str) -> None:
    """Raise at the first tag of ``table`` that is not in ``label_set`` (the training labels)."""
    labels = sorted(set(label_set), key=_label_key)
    flat = pc.list_flatten(table["tags"])
    unknown = pc.invert(pc.is_in(flat, value_set=pa.array(labels, type=pa.string())))
    index = pc.index(unknown, True).as_py()
    if index < 0:
        return
    parents = pc.list_parent_indices(table["tags"])
    row = parents[index].as_py()
    word = index - pc.index(parents, row).as_py()
    raise DataError(
        f"{_row_location(table, source, row, word)}: tag {flat[index].as_py()!r} does not occur in the "
        f"training data; the training data has labels: {', '.join(labels)}; "
        "add examples of it to the training data or fix the tag"
    )


def _label_key(tag: str) -> tuple[int, str, str]:
    """Sort key: ``O`` first, then by entity type, ``B-`` before ``I-``."""
    return (0, "", "") if tag == "O" else (1, tag[2:], tag[:2])


def label_list(tables: pa.Table | Iterable[pa.Table]) -> list[str]:
    """Sorted label list of the training tags: ``O``, then B-/I- pairs by entity type."""
    tables = [tables] if isinstance(tables, pa.Table) else tables
    labels: set[str] = set()
    for table in tables:
        labels.update(pc.unique(pc.list_flatten(table["tags"])).to_pylist())
    return sorted(labels, key=_label_key)


def describe(table: pa.Table) -> str:
    """One line summarising a table from :func:`read_token_tags` or :func:`read_records`."""
    meta = table.schema.metadata or {}
    head = f"{meta.get(b'source', b'<table>').decode()}: {table.num_rows}"
    if "tags" not in table.column_names:
        return f"{head} rows"
    tokens = pc.sum(pc.list_value_length(table["tokens"])).as_py() or 0
    scheme = meta.get(b"scheme", b"iob2").decode()
    return f"{head} sentences, {tokens} tokens, {len(label_list(table))} labels (read as {scheme})"
