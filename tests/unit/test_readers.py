"""Tests for distributed_ft.data.readers: every reader, the tag schemes and the error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_ft.data import builtin
from distributed_ft.data.readers import (
    describe,
    detect_scheme,
    label_list,
    read_records,
    read_token_tags,
    to_iob2,
    validate_tags,
)
from distributed_ft.errors import DataError

SENTENCES = [
    (["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"]),
    (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
]


def write(path: Path, text: str | bytes) -> str:
    """Write text (or bytes) to ``path`` and return it as a string."""
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return str(path)


def raises(match: str, func, *args, **kwargs) -> str:
    """Call ``func`` expecting a DataError whose message contains every ``|``-separated piece of ``match``."""
    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    for piece in match.split("|"):
        assert piece in message, f"{piece!r} not in {message!r}"
    return message


def rows(table: pa.Table) -> list[tuple[list[str], list[str], int]]:
    return list(
        zip(table["tokens"].to_pylist(), table["tags"].to_pylist(), table["line"].to_pylist(), strict=True)
    )


# ---------------------------------------------------------------- CoNLL, positive


def test_conll_docstart_blank_lines_crlf_trailing_spaces_tabs(tmp_path: Path) -> None:
    text = (
        "\r\n"
        "-DOCSTART- -X- -X- O\r\n"
        "\r\n"
        "EU NNP B-NP B-ORG  \r\n"
        "rejects\tVBZ\tB-VP\tO\t\r\n"
        "German JJ  B-NP B-MISC\r\n"
        "call NN I-NP O\r\n"
        "\r\n"
        " \t\r\n"
        "\r\n"
        "Peter NNP B-NP B-PER\r\n"
        "-DOCSTART- -X- -X- O\r\n"
        "Blackburn NNP I-NP I-PER\r\n"
        "\r\n\r\n"
    )
    table = read_token_tags(write(tmp_path / "a.conll", text))
    assert rows(table) == [
        (["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"], 4),
        (["Peter"], ["B-PER"], 11),
        (["Blackburn"], ["B-PER"], 13),  # a document boundary ends the sentence; I- opening -> B-
    ]
    assert table.schema.field("tokens").type == pa.list_(pa.string())
    assert table.schema.field("line").type == pa.int64()
    meta = table.schema.metadata
    assert meta[b"source"] == str(tmp_path / "a.conll").encode()
    assert meta[b"scheme"] == b"iob1"
    assert meta[b"num_sentences"] == b"3" and meta[b"num_tokens"] == b"6"


def test_conll_two_columns_and_bom(tmp_path: Path) -> None:
    text = "\ufeffEU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn I-PER\n"
    table = read_token_tags(write(tmp_path / "b.txt", text))
    assert rows(table) == [
        (["EU", "rejects"], ["B-ORG", "O"], 1),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"], 4),
    ]
    assert "2 sentences, 4 tokens" in describe(table)


def test_conll_chosen_tag_column(tmp_path: Path) -> None:
    text = "EU B-ORG NNP\nrejects O VBZ\n"
    path = write(tmp_path / "c.tsv", text)
    assert read_token_tags(path, conll_tag_column=1)["tags"].to_pylist() == [["B-ORG", "O"]]
    assert read_token_tags(path, conll_tag_column=-2)["tags"].to_pylist() == [["B-ORG", "O"]]


def test_conll_extensionless_and_explicit_format(tmp_path: Path) -> None:
    path = write(tmp_path / "eng.testa", "EU B-ORG\n")
    assert read_token_tags(path).num_rows == 1
    assert read_token_tags(write(tmp_path / "data.weird", "EU B-ORG\n"), fmt="conll").num_rows == 1


def test_glob_of_two_files(tmp_path: Path) -> None:
    write(tmp_path / "part-1.conll", "Peter B-PER\n")
    write(tmp_path / "part-0.conll", "\nEU B-ORG\nrejects O\n")
    table = read_token_tags(str(tmp_path / "part-*.conll"))
    assert rows(table) == [(["EU", "rejects"], ["B-ORG", "O"], 2), (["Peter"], ["B-PER"], 1)]
    # A bad tag in the second file names that file and its own line number.
    write(tmp_path / "part-1.conll", "Peter B-PER\n\nBlackburn PER\n")
    raises("part-1.conll:3: tag 'PER'", read_token_tags, str(tmp_path / "part-*.conll"))


# ---------------------------------------------------------------- CoNLL and file errors


def test_one_column_line(tmp_path: Path) -> None:
    path = write(tmp_path / "train.txt", "EU B-ORG\nrejects O\n\nEU\n")
    raises(f"{path}:4: expected at least 2 whitespace-separated columns|found 1: 'EU'", read_token_tags, path)


def test_inconsistent_columns_with_a_fixed_tag_column(tmp_path: Path) -> None:
    path = write(tmp_path / "train.txt", "\nEU B-ORG NNP\nrejects O\n")
    raises(
        f"{path}:3: found 2 columns|first token line ({path}:2) has 3|data.conll_tag_column=-1",
        read_token_tags,
        path,
        conll_tag_column=1,
    )


def test_mecab_style_lines_of_differing_columns_take_the_last_as_tag(tmp_path: Path) -> None:
    fields10 = "\t".join(["名詞", "固有名詞", "人名", "姓", "*", "*", "田中", "タナカ"])
    fields12 = "\t".join(
        ["名詞", "固有名詞", "地域", "一般", "*", "*", "東京", "トウキョウ", "トーキョー", "x"]
    )
    text = f"田中\t{fields10}\tB-PER\nは\t助詞\tO\n東京\t{fields12}\tB-LOC\n\n山田\t{fields10}\tB-PER\n"
    table = read_token_tags(write(tmp_path / "ja.tsv", text))
    assert rows(table) == [(["田中", "は", "東京"], ["B-PER", "O", "B-LOC"], 1), (["山田"], ["B-PER"], 5)]
    # A prediction file of tokens only cannot switch to tagged lines half-way.
    path = write(tmp_path / "mixed.conll", "田中\nは O\n")
    raises(f"{path}:2: found 2 columns|({path}:1) has 1", read_token_tags, path, require_tags=False)


@pytest.mark.parametrize("column", [2, 0, -3])
def test_tag_column_out_of_range(tmp_path: Path, column: int) -> None:
    path = write(tmp_path / "train.txt", "EU B-ORG\n")
    raises(
        f"{path}:1: data.conll_tag_column={column} is out of range|2 columns",
        read_token_tags,
        path,
        conll_tag_column=column,
    )


def test_non_utf8_byte(tmp_path: Path) -> None:
    path = write(tmp_path / "train.txt", b"EU B-ORG\nM\xfcller B-PER\n")
    raises(f"{path}:2: byte 0xfc at column 2 is not UTF-8|iconv -f latin1 -t utf-8", read_token_tags, path)


def test_empty_file_and_only_docstart(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.conll", "")
    raises(f"{empty}: no sentences found", read_token_tags, empty)
    docstart = write(tmp_path / "doc.conll", "-DOCSTART- -X- O O\n\n\n-DOCSTART- -X- O O\n")
    raises(f"{docstart}: no sentences found", read_token_tags, docstart)
    raises("empty.jsonl: no sentences found", read_token_tags, write(tmp_path / "empty.jsonl", "\n\n"))
    raises("empty.csv: no sentences found", read_token_tags, write(tmp_path / "empty.csv", ""))


@pytest.mark.parametrize("tag", ["B_PER", "PER", "X-PER", "B-", "b-PER"])
def test_bad_tag_shape(tmp_path: Path, tag: str) -> None:
    path = write(tmp_path / "train.txt", f"EU B-ORG\n\nPeter O\nBlackburn {tag}\n")
    raises(
        f"{path}:4: tag {tag!r} is not a valid tag|expected 'O' or PREFIX-TYPE|'B-PER'", read_token_tags, path
    )


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conll")
    raises(f"{missing}: file not found|check data.train/data.validation/data.test", read_token_tags, missing)
    raises("no files match|check data.train", read_token_tags, str(tmp_path / "*.conll"))
    odd = write(tmp_path / "data.xlsx", "x")
    raises(f"{odd}: cannot tell the file format|'.xlsx'|set data.format=", read_token_tags, odd)
    raises("is a directory", read_token_tags, str(tmp_path))


# ---------------------------------------------------------------- tag schemes


def test_detect_scheme() -> None:
    assert detect_scheme([["B-PER", "I-PER", "O"], ["B-LOC", "B-LOC"]]) == "iob2"
    assert detect_scheme([["O", "I-PER", "I-PER"]]) == "iob1"
    assert detect_scheme([["B-PER", "I-LOC"]]) == "iob1"  # I- after another type opens an entity
    assert detect_scheme([["I-PER"]]) == "iob1"  # at sentence start
    assert detect_scheme([["B-PER", "E-PER", "O", "I-LOC"]]) == "iobes"
    assert detect_scheme([["U-PER", "O", "B-LOC", "L-LOC"]]) == "iobes"
    raises("sentence 2, word 1: tag 'PER'", detect_scheme, [["O"], ["PER"]])


def test_to_iob2_hand_written() -> None:
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG", "O", "I-MISC"]
    assert to_iob2(iob1, "iob1") == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG", "O", "B-MISC"]
    iobes = ["S-PER", "B-ORG", "I-ORG", "E-ORG", "O", "S-LOC", "S-LOC", "B-MISC", "E-MISC"]
    assert to_iob2(iobes, "iobes") == [
        "B-PER",
        "B-ORG",
        "I-ORG",
        "I-ORG",
        "O",
        "B-LOC",
        "B-LOC",
        "B-MISC",
        "I-MISC",
    ]
    bilou = ["U-PER", "B-ORG", "I-ORG", "L-ORG", "U-ORG", "O"]
    assert to_iob2(bilou, "iobes") == ["B-PER", "B-ORG", "I-ORG", "I-ORG", "B-ORG", "O"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    assert to_iob2(iob2, "iob2") == iob2
    raises("'S-PER' does not occur in iob2", to_iob2, ["S-PER"], "iob2")
    raises("unknown tag scheme", to_iob2, ["O"], "bio")


def test_reader_normalises_iobes_and_iob1(tmp_path: Path) -> None:
    iobes = write(tmp_path / "a.bio", "Peter S-PER\nsaw O\nNew B-LOC\nYork E-LOC\n")
    table = read_token_tags(iobes)
    assert table["tags"].to_pylist() == [["B-PER", "O", "B-LOC", "I-LOC"]]
    assert table.schema.metadata[b"scheme"] == b"iobes"
    iob1 = write(tmp_path / "b.iob", "Peter I-PER\nBlackburn I-PER\nJohn B-PER\nsaw O\nYork I-LOC\n")
    assert read_token_tags(iob1)["tags"].to_pylist() == [["B-PER", "I-PER", "B-PER", "O", "B-LOC"]]
    # IOB2 data read with a fixed iob1 scheme converts to itself.
    iob2 = write(tmp_path / "c.iob", "Peter B-PER\nBlackburn I-PER\n")
    assert read_token_tags(iob2, tag_scheme="iob1")["tags"].to_pylist() == [["B-PER", "I-PER"]]


def test_fixed_scheme_contradicted(tmp_path: Path) -> None:
    path = write(tmp_path / "a.conll", "EU B-ORG\n\nPeter O\nBlackburn S-PER\n")
    raises(
        f"{path}:4: tag 'S-PER' does not fit data.tag_scheme=iob2|looks like iobes",
        read_token_tags,
        path,
        tag_scheme="iob2",
    )
    path = write(tmp_path / "b.conll", "EU B-ORG\nrejects O\nGerman I-MISC\n")
    raises(
        f"{path}:3: tag 'I-MISC' does not fit data.tag_scheme=iob2|looks like iob1",
        read_token_tags,
        path,
        tag_scheme="iob2",
    )


# ---------------------------------------------------------------- labels


def test_label_list_ordering() -> None:
    table = pa.table({"tags": [["I-PER", "O", "B-PER"], ["B-MISC", "I-LOC", "B-LOC"], ["I-MISC"]]})
    assert label_list([table]) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-PER", "I-PER"]
    assert label_list(table) == label_list([table.slice(0, 1), table.slice(1)])


def test_validate_tags(tmp_path: Path) -> None:
    train = read_token_tags(write(tmp_path / "train.conll", "EU B-ORG\nrejects O\n"))
    labels = label_list([train])
    valid_path = write(tmp_path / "valid.conll", "EU B-ORG\n\nPeter O\nsaid O\nBlackburn B-PER\n")
    valid = read_token_tags(valid_path)
    raises(
        f"{valid_path}:5: tag 'B-PER' does not occur in the training data|the training data has labels: "
        "O, B-ORG;|add examples of it to the training data or fix the tag",
        validate_tags,
        valid,
        labels,
        "data.validation",
    )
    validate_tags(train, labels, "data.train")  # no error
    # JSONL rows name the record's line (not line + word offset).
    jsonl = write(tmp_path / "valid.jsonl", '\n{"tokens": ["a", "b"], "tags": ["O", "B-PER"]}\n')
    raises(f"{jsonl}:2: tag 'B-PER'", validate_tags, read_token_tags(jsonl), labels, "data.validation")
    # Slices of a one-file table keep exact lines; a table without metadata falls back to ``source``.
    raises(f"{valid_path}:5: tag 'B-PER'", validate_tags, valid.slice(1), labels, "data.validation")
    bare = valid.replace_schema_metadata(None)
    raises("data.validation:3: tag 'B-PER'", validate_tags, bare, labels, "data.validation")


# ---------------------------------------------------------------- JSONL / CSV / Parquet


def _jsonl(sentences) -> str:
    return "".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in sentences)


def test_round_trips_give_identical_tables(tmp_path: Path) -> None:
    conll = "\n\n".join("\n".join(f"{w} {g}" for w, g in zip(t, g, strict=True)) for t, g in SENTENCES)
    from_conll = read_token_tags(write(tmp_path / "s.conll", conll + "\n"))
    from_jsonl = read_token_tags(write(tmp_path / "s.jsonl", _jsonl(SENTENCES)))
    csv_text = "id,tokens,tags\n1,EU rejects German call,B-ORG O B-MISC O\n" + (
        '2,"[""Peter"", ""Blackburn""]","B-PER I-PER"\n'
    )
    from_csv = read_token_tags(write(tmp_path / "s.csv", csv_text))
    pq.write_table(
        pa.table({"tokens": [t for t, _ in SENTENCES], "tags": [g for _, g in SENTENCES]}), tmp_path / "s.pq"
    )
    from_parquet = read_token_tags(str(tmp_path / "s.pq"))
    pq.write_table(
        pa.table({"w": [" ".join(t) for t, _ in SENTENCES], "y": [" ".join(g) for _, g in SENTENCES]}),
        tmp_path / "strings.parquet",
    )
    from_strings = read_token_tags(str(tmp_path / "strings.parquet"), tokens_column="w", tags_column="y")
    json_array = json.dumps([{"tokens": t, "tags": g} for t, g in SENTENCES], indent=2)
    from_json = read_token_tags(write(tmp_path / "s.json", json_array))
    expected = [t for t, _ in SENTENCES], [g for _, g in SENTENCES]
    for table in (from_conll, from_jsonl, from_csv, from_parquet, from_strings, from_json):
        assert (table["tokens"].to_pylist(), table["tags"].to_pylist()) == expected
        assert table.schema == from_jsonl.schema.remove_metadata().with_metadata(table.schema.metadata)
    assert from_conll["line"].to_pylist() == [1, 6]
    assert from_csv["line"].to_pylist() == [2, 3]
    assert from_parquet["line"].to_pylist() == [1, 2]
    assert from_json["line"].to_pylist() == [1, 2]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"tokens": ["EU"], "tags": ["B-ORG"]', "invalid JSON|expected one object per line"),
        ('{"words": ["EU"], "tags": ["B-ORG"]}', "missing key 'tokens'|['words', 'tags']|data.tokens_column"),
        ('{"tokens": ["EU", "x"], "tags": ["B-ORG"]}', "2 tokens but 1 tags|exactly one tag"),
        ('{"tokens": [], "tags": []}', "empty 'tokens' list"),
        ('{"tokens": "EU", "tags": 5}', "'tags' must be a list of strings, found int"),
        ('{"tokens": ["EU", 3], "tags": ["O", "O"]}', "'tokens'[1] must be a string, found int: 3"),
        ('["EU", "O"]', "expected a JSON object, found list"),
    ],
)
def test_jsonl_errors(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path / "train.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n\n' + line + "\n")
    raises(f"{path}:3: " + expected, read_token_tags, path)


def test_json_array_errors_name_the_record(tmp_path: Path) -> None:
    path = write(tmp_path / "train.json", json.dumps([{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a"]}]))
    raises(f"{path}: record 2: missing key 'tags'|['tokens']", read_token_tags, path)


def test_csv_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "words,tags\nEU,B-ORG\n")
    raises(f"{path}:1: missing column 'tokens'|found columns ['words', 'tags']", read_token_tags, path)
    path = write(tmp_path / "train.csv", 'tokens,tags\n"EU\nrejects",B-ORG O\nPeter Blackburn,B-PER\n')
    raises(f"{path}:4: 2 tokens but 1 tags", read_token_tags, path)  # the quoted newline counts as a line
    path = write(tmp_path / "train.csv", "tokens,tags\nEU,B-ORG,extra\n")
    raises(f"{path}:2: found 3 fields but the header has 2", read_token_tags, path)


def test_parquet_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"tokens": [["a"], ["b", "c"]], "tags": [["O"], ["O"]]}), tmp_path / "t.parquet")
    raises("t.parquet: row 2: 2 tokens but 1 tags", read_token_tags, str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "u.parquet")
    raises("missing column 'tokens'|found columns ['text']", read_token_tags, str(tmp_path / "u.parquet"))
    raises("cannot read it as Parquet", read_token_tags, write(tmp_path / "v.parquet", "not parquet"))


# ---------------------------------------------------------------- read_records


def test_read_records(tmp_path: Path) -> None:
    jsonl = write(
        tmp_path / "r.jsonl", '{"text": "good", "label": 1, "x": 0}\n\n{"text": "bad", "label": 0}\n'
    )
    table = read_records(jsonl, columns=["text", "label"])
    assert table.to_pydict() == {"text": ["good", "bad"], "label": [1, 0], "line": [1, 3]}
    csv_path = write(tmp_path / "r.csv", 'text,label\n"good, really",pos\nbad,neg\n')
    assert read_records(csv_path).to_pydict() == {
        "text": ["good, really", "bad"],
        "label": ["pos", "neg"],
        "line": [2, 3],
    }
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, 2]}), tmp_path / "r.parquet")
    assert read_records(str(tmp_path / "r.parquet"), columns=["label"]).to_pydict() == {
        "label": [1, 2],
        "line": [1, 2],
    }
    raises(f"{jsonl}:3: missing key 'x'|found keys ['text', 'label']", read_records, jsonl)
    raises(
        f"{csv_path}:1: missing column 'sentence'|['text', 'label']",
        read_records,
        csv_path,
        columns=["sentence"],
    )
    mixed = write(tmp_path / "m.jsonl", '{"label": 1}\n{"label": "one"}\n')
    raises(f"{mixed}:2: 'label' holds a str, but a int at {mixed}:1", read_records, mixed)
    raises("r2.csv: no records found", read_records, write(tmp_path / "r2.csv", "text,label\n"))
    raises("hold no named columns", read_records, write(tmp_path / "r.conll", "a O\n"))
    assert re.search(r"r\.csv: 2 rows$", describe(read_records(csv_path)))


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize(
    ("name", "count"),
    [("train", 14041), ("validation", 3250), ("test", 3453)],
)
def test_real_conll2003(name: str, count: int) -> None:
    table = read_token_tags(builtin.resolve(f"builtin:conll2003/{name}"))
    assert table.num_rows == count
    assert table.schema.metadata[b"scheme"] == b"iob2"
    assert label_list([table]) == [
        "O",
        "B-LOC",
        "I-LOC",
        "B-MISC",
        "I-MISC",
        "B-ORG",
        "I-ORG",
        "B-PER",
        "I-PER",
    ]
