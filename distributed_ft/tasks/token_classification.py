"""Token classification (NER): word labels aligned to sub-words, seqeval entity-level metrics.

Scoring is on **words**: the prediction of a word is the prediction at its first sub-token; a word cut
off by ``data.max_length`` is predicted ``O`` (and counted), so the score covers every gold word.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2
from torch import nn

from distributed_ft.config.schema import JobConfig
from distributed_ft.config.task_metrics import TASK_METRICS
from distributed_ft.data import readers
from distributed_ft.data.augment import augment_sentences
from distributed_ft.data.builtin import resolve
from distributed_ft.data.few_shot import few_shot_sentences
from distributed_ft.data.gazetteer import COLUMN as GAZETTEER
from distributed_ft.data.gazetteer import (
    BuiltGazetteer,
    Gazetteer,
    align_features,
    collect_mentions,
    load_gazetteer,
)
from distributed_ft.data.prepare import (
    Preparation,
    PreparedDataset,
    SplitPlan,
    SplitStats,
    limit_split,
)
from distributed_ft.data.sources import Batch, pad_sequences
from distributed_ft.errors import DataError
from distributed_ft.modeling import crf
from distributed_ft.modeling import gazetteer as gazetteer_model
from distributed_ft.modeling.build import build_model
from distributed_ft.tasks.base import cached, input_key, shaped_training_set
from distributed_ft.tasks.losses import token_count, token_cross_entropy_sum

IGNORE = -100
ENCODE_CHUNK = 2048
"""Sentences handed to the fast tokenizer at once."""


def align_labels(
    word_ids: list[int | None], word_labels: list[int], continuation: list[int] | None
) -> tuple[list[int], list[int]]:
    """Sub-token labels and the position of each word's first sub-token.

    Args:
        word_ids: ``BatchEncoding.word_ids()`` of one example (``None`` for special tokens).
        word_labels: Label id per word (``IGNORE`` when unknown, e.g. prediction input).
        continuation: Maps a word's label id to the id its later sub-tokens get; ``None`` labels only
            the first sub-token (the rest get ``IGNORE``).

    Returns:
        ``(labels per sub-token, first-sub-token position per word, -1 for words not in the encoding)``.
    """
    labels = [IGNORE] * len(word_ids)
    starts = [-1] * len(word_labels)
    previous = None
    for position, word in enumerate(word_ids):
        if word is None:
            previous = None
            continue
        if word != previous:
            starts[word] = position
            labels[position] = word_labels[word]
        elif continuation is not None and word_labels[word] != IGNORE:
            labels[position] = continuation[word_labels[word]]
        previous = word
    return labels, starts


def continuation_labels(labels: list[str]) -> list[int]:
    """For ``label_all_subtokens``: ``B-X`` continues as ``I-X`` (when it exists), others as themselves."""
    index = {label: i for i, label in enumerate(labels)}
    return [index.get("I-" + label[2:], i) if label.startswith("B-") else i for i, label in enumerate(labels)]


def encode_sentences(
    table: pa.Table,
    tokenizer: Any,
    label2id: dict[str, int] | None,
    max_length: int,
    continuation: list[int] | None = None,
    *,
    first: int = 0,
    gazetteer: Gazetteer | None = None,
) -> tuple[pa.Table, SplitStats]:
    """Tokenize the ``tokens`` of a reader table and align its ``tags`` (when ``label2id`` is given).

    ``first`` is the split index of the table's first row (rows of a chunk keep their split's example ids).
    With a ``gazetteer`` each sub-token also gets its word's dictionary feature (column ``gazetteer``),
    through the same ``word_ids()`` as the labels.
    """
    tokens = table.column("tokens").to_pylist()
    tags = table.column("tags").to_pylist() if label2id and "tags" in table.column_names else None
    columns: dict[str, list] = {"input_ids": [], "labels": [], "word_starts": [], "word_labels": []}
    if gazetteer is not None:
        columns[GAZETTEER] = []
    stats = SplitStats()
    for start in range(0, len(tokens), ENCODE_CHUNK):
        chunk = tokens[start : start + ENCODE_CHUNK]
        encoding = tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=max_length)
        for offset, words in enumerate(chunk):
            i = start + offset
            word_labels = [label2id[t] for t in tags[i]] if tags else [IGNORE] * len(words)
            word_ids = encoding.word_ids(offset)
            labels, starts = align_labels(word_ids, word_labels, continuation)
            if gazetteer is not None:
                columns[GAZETTEER].append(align_features(word_ids, gazetteer.word_features(words)))
            columns["input_ids"].append(encoding["input_ids"][offset])
            columns["labels"].append(labels)
            columns["word_starts"].append(starts)
            columns["word_labels"].append(word_labels)
            missing = starts.count(-1)
            stats.truncated_examples += missing > 0
            stats.truncated_words += missing
            stats.tokens += len(labels)
    stats.examples = len(tokens)
    int_list = pa.list_(pa.int32())
    prepared = pa.table(
        {
            "example_id": pa.array(np.arange(first, first + len(tokens)), pa.int64()),
            **{name: pa.array(values, int_list) for name, values in columns.items()},
            "length": pa.array([len(ids) for ids in columns["input_ids"]], pa.int32()),
            "line": table.column("line"),
        }
    )
    return prepared, stats


class TokenClassificationTask:
    """NER and other word-tagging tasks."""

    name = "token_classification"
    metrics: ClassVar[dict[str, str]] = TASK_METRICS["token_classification"]
    """Metrics ``eval.metric`` may name, and whether each is maximised or minimised."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.pad_token_id = 0

    @functools.cached_property
    def gazetteer(self) -> Gazetteer | None:
        """The parsed ``data.gazetteer`` (``None`` without one)."""
        data = self.config.data
        return load_gazetteer(data.gazetteer, data.gazetteer_lowercase) if data.gazetteer else None

    # ----------------------------------------------------------------- data
    def read(self, path: str) -> pa.Table:
        """Read one split's file(s) into a ``tokens``/``tags``/``line`` table."""
        data = self.config.data
        return readers.read_token_tags(
            resolve(path),
            data.format,
            tokens_column=data.tokens_column,
            tags_column=data.tags_column,
            conll_tag_column=data.conll_tag_column,
            tag_scheme=data.tag_scheme,
        )

    def prepare_tokenizer(self, tokenizer: Any) -> Any:
        """Take the tokenizer's pad id for collation (also where the data was prepared elsewhere)."""
        self.pad_token_id = tokenizer.pad_token_id or 0
        return tokenizer

    def cache_key(self, tokenizer: Any, splits: dict[str, str], labels: list[str] | None = None) -> str:
        """Inputs by path, size and mtime, the tokenizer, given ``labels`` and the encoding options."""
        data = self.config.data
        return input_key(
            self.name,
            self.config,
            tokenizer,
            splits,
            labels,
            label_all_subtokens=data.label_all_subtokens,
            reader=[data.format, data.tokens_column, data.tags_column, data.conll_tag_column],
            scheme=data.tag_scheme,
            **({"gazetteer": [self.gazetteer.digest, data.gazetteer_lowercase]} if self.gazetteer else {}),
        )

    def prepare_data(
        self,
        tokenizer: Any,
        splits: dict[str, str],
        labels: list[str] | None = None,
        key: str | None = None,
    ) -> PreparedDataset:
        """The cached encoding of the splits; on a miss they are read, validated and encoded first."""
        self.prepare_tokenizer(tokenizer)
        return cached(
            self.config,
            key or self.cache_key(tokenizer, splits, labels),
            lambda: self.preparation(tokenizer, splits, labels),
        )

    def preparation(
        self, tokenizer: Any, splits: dict[str, str], labels: list[str] | None = None
    ) -> Preparation:
        """Read every split, fix the label list from ``train``, validate the rest; the encoding to run."""
        data = self.config.data
        tables = {split: limit_split(self.read(path), split, data) for split, path in splits.items()}
        if labels is None:
            if "train" not in tables:
                raise DataError("data.train is needed to fix the label set")
            labels = readers.label_list([tables["train"]])
        for split, table in tables.items():
            if split != "train":
                readers.validate_tags(table, set(labels), resolve(splits[split]))
        notes: list[str] = []
        if "train" in tables:
            tables["train"], notes = self.training_set(tables["train"])
        encode = functools.partial(
            encode_sentences,
            tokenizer=tokenizer,
            label2id={label: i for i, label in enumerate(labels)},
            max_length=data.max_length,
            continuation=continuation_labels(labels) if data.label_all_subtokens else None,
            gazetteer=self.gazetteer,
        )
        plans = [SplitPlan(split, table, encode) for split, table in tables.items()]
        return Preparation(plans, labels, meta={"training_set": notes})

    def training_set(self, train: pa.Table) -> tuple[pa.Table, list[str]]:
        """Few-shot selection, then augmentation, of the training sentences; a log line for each."""
        return shaped_training_set(train, self.config, few_shot_sentences, augment_sentences, "sentences")

    def training_gazetteer(self, min_count: int = 1) -> BuiltGazetteer:
        """Entity surfaces of the training split only, each with its most frequent type.

        For ``dft data gazetteer``: the split as training sees it (``data.max_train_samples``, few-shot
        selection and augmentation applied), so validation and test stay unseen.
        """
        if not self.config.data.train:
            raise DataError("dft data gazetteer collects the mentions of data.train: set data.train=FILE")
        train = limit_split(self.read(self.config.data.train), "train", self.config.data)
        train, _ = self.training_set(train)
        pairs = zip(train.column("tokens").to_pylist(), train.column("tags").to_pylist(), strict=True)
        return collect_mentions(pairs, min_count)

    def collate(self, rows: list[dict[str, Any]], with_meta: bool = False) -> Batch:
        """Dynamic padding to the longest example of the batch."""
        input_ids = pad_sequences([r["input_ids"] for r in rows], self.pad_token_id)
        batch: Batch = {
            "input_ids": input_ids,
            "attention_mask": pad_sequences([np.ones(len(r["input_ids"])) for r in rows], 0),
            "labels": pad_sequences([r["labels"] for r in rows], IGNORE),
        }
        if GAZETTEER in rows[0]:  # feature ids, read by the model's gazetteer hook (0: no match, padding)
            batch[gazetteer_model.KWARG] = pad_sequences([r[GAZETTEER] for r in rows], 0)
        if with_meta:
            batch["meta"] = [(int(r["example_id"]), r["word_starts"]) for r in rows]
        return batch

    # ----------------------------------------------------------------- model
    def restore_assets(self, meta: dict[str, Any]) -> None:
        """Nothing to restore: the labels travel with the prepared data."""
        del meta

    def build_model(self, labels: list[str] | None) -> nn.Module:
        """The token classifier, with the CRF and gazetteer embedding the job asks for.

        ``model.crf``: a CRF over its emissions (``modeling/crf.py``); ``data.gazetteer``: a zero
        gazetteer embedding added to the word embeddings (``modeling/gazetteer.py``).
        """
        model = build_model(self.name, self.config.model, labels)
        for extra in (crf, gazetteer_model):  # an export with them as model.name: not built, nor recorded
            if extra.spec(model) is not None:
                delattr(model.config, extra.CONFIG_KEY)
        if self.config.model.crf:  # a fresh CRF, also over a CRF export (its labels may differ)
            crf.attach(model, self.config.model.crf_constraints)
        if self.gazetteer is not None:
            found = self.gazetteer
            gazetteer_model.attach(model, list(found.types), found.lowercase, found.digest)
        return model

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        """Labelled sub-tokens of the batch (the loss is a mean over them)."""
        return token_count(batch["labels"])

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy over labelled sub-tokens, or the CRF's summed negative log-likelihood.

        The CRF runs over each example's labelled positions (its words' first sub-tokens), moved to the
        left; divided by :meth:`loss_weight` it is the negative log-likelihood per word.
        """
        scores = crf.scores_of(outputs)
        if scores is None:
            return token_cross_entropy_sum(outputs.logits, batch["labels"])
        labels = batch["labels"].to(outputs.logits.device)
        mask = labels != IGNORE
        emissions, words = crf.compact(outputs.logits, mask)
        tags, _ = crf.compact(labels, mask)
        return crf.nll(emissions, tags, words, scores)

    # ----------------------------------------------------------------- evaluation
    def predictions(self, outputs: Any, batch: Batch) -> list[tuple[int, np.ndarray]]:
        """Per example: the label id predicted at each word's first sub-token (``-1``: word cut off).

        The argmax of the emissions, or with a CRF (``outputs["crf"]``) the Viterbi path over the words.
        """
        scores = crf.scores_of(outputs)
        if scores is not None:
            return viterbi_words(outputs.logits, batch["meta"], scores)
        predicted = outputs.logits.argmax(-1).cpu().numpy()
        out = []
        for row, (example_id, starts) in enumerate(batch["meta"]):
            starts = np.asarray(starts)
            words = np.where(starts >= 0, predicted[row, np.maximum(starts, 0)], -1)
            out.append((example_id, words))
        return out

    def score(self, predictions: dict[int, np.ndarray], split: pa.Table, labels: list[str]) -> dict[str, Any]:
        """Seqeval entity-level metrics and word accuracy of ``predictions`` on ``split``."""
        gold_ids = split.column("word_labels").to_pylist()
        ids = split.column("example_id").to_pylist()
        y_true = [[labels[i] for i in gold] for gold in gold_ids]
        y_pred = [word_tags(predictions[example_id], labels) for example_id in ids]
        return entity_metrics(y_true, y_pred, self.config.eval.seqeval_mode)

    def format_report(self, metrics: dict[str, Any]) -> str:
        return format_entity_report(metrics)

    # ----------------------------------------------------------------- prediction
    def read_unlabeled(self, path: str, fmt: str, tokenizer: Any) -> pa.Table:
        return read_unlabeled(path, fmt, tokenizer, self.config)

    def encode_unlabeled(self, inputs: pa.Table, tokenizer: Any) -> pa.Table:
        return encode_sentences(
            inputs, tokenizer, None, self.config.data.max_length, gazetteer=self.gazetteer
        )[0]

    def write_predictions(self, inputs, predictions, labels, output, fmt) -> None:
        write_predictions(inputs, predictions, labels, output, fmt)


def viterbi_words(
    emissions: torch.Tensor, meta: list[tuple[int, list[int]]], scores: tuple
) -> list[tuple[int, np.ndarray]]:
    """Viterbi label ids of each example's words (``-1``: word cut off), one device-to-host copy."""
    starts = [np.asarray(row_starts, dtype=np.int64) for _, row_starts in meta]
    kept = [row[row >= 0] for row in starts]
    index = np.zeros((len(kept), max([len(row) for row in kept] + [1])), dtype=np.int64)
    for row, positions in enumerate(kept):
        index[row, : len(positions)] = positions
    mask = torch.from_numpy(np.arange(index.shape[1])[None, :] < np.array([[len(r)] for r in kept]))
    index_t = torch.from_numpy(index).to(emissions.device)
    words = emissions.gather(1, index_t[:, :, None].expand(-1, -1, emissions.shape[-1]))
    paths = crf.viterbi(words, mask.to(emissions.device), scores).cpu().numpy()
    out = []
    for row, (example_id, _) in enumerate(meta):
        predicted = np.full(len(starts[row]), -1, dtype=np.int64)
        predicted[starts[row] >= 0] = paths[row, : len(kept[row])]
        out.append((example_id, predicted))
    return out


def word_tags(predicted: np.ndarray, labels: list[str]) -> list[str]:
    """Label strings for predicted word ids; words cut off by truncation (``-1``) become ``O``."""
    return [labels[i] if i >= 0 else "O" for i in predicted]


def entity_metrics(y_true: list[list[str]], y_pred: list[list[str]], mode: str = "default") -> dict[str, Any]:
    """Seqeval micro/macro precision, recall, F1, per-type report, and word (token) accuracy."""
    strict = {"mode": "strict", "scheme": IOB2} if mode == "strict" else {}
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0, **strict)
    words = sum(len(s) for s in y_true)
    correct = sum(t == p for ts, ps in zip(y_true, y_pred, strict=True) for t, p in zip(ts, ps, strict=True))
    micro, macro = report.get("micro avg", {}), report.get("macro avg", {})
    per_type = {
        name: {
            "precision": float(v["precision"]),
            "recall": float(v["recall"]),
            "f1": float(v["f1-score"]),
            "support": int(v["support"]),
        }
        for name, v in report.items()
        if not name.endswith(" avg")
    }
    return {
        "f1": float(micro.get("f1-score", 0.0)),
        "precision": float(micro.get("precision", 0.0)),
        "recall": float(micro.get("recall", 0.0)),
        "macro_f1": float(macro.get("f1-score", 0.0)),
        "macro_precision": float(macro.get("precision", 0.0)),
        "macro_recall": float(macro.get("recall", 0.0)),
        "token_accuracy": correct / words if words else 0.0,
        "entities": int(micro.get("support", 0)),
        "sentences": len(y_true),
        "seqeval_mode": mode,
        "per_type": per_type,
    }


def format_entity_report(metrics: dict[str, Any]) -> str:
    """The per-type seqeval table plus micro/macro averages, as printed at the end of a run."""
    lines = [f"{'type':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, row in sorted(metrics["per_type"].items()):
        lines.append(
            f"{name:<12}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>10}"
        )
    lines.append("")
    lines.append(
        f"{'micro avg':<12}{metrics['precision']:>10.4f}{metrics['recall']:>10.4f}{metrics['f1']:>10.4f}"
        f"{metrics['entities']:>10}"
    )
    lines.append(
        f"{'macro avg':<12}{metrics['macro_precision']:>10.4f}{metrics['macro_recall']:>10.4f}"
        f"{metrics['macro_f1']:>10.4f}{metrics['entities']:>10}"
    )
    lines.append(f"word accuracy {metrics['token_accuracy']:.4f} over {metrics['sentences']:,} sentences")
    return "\n".join(lines)


def entity_spans(words: list[str], tags: list[str]) -> list[dict[str, Any]]:
    """Entities of one sentence: type, word range ``[start, end)`` and text (words joined by spaces)."""
    return [
        {"type": kind, "start": start, "end": end + 1, "text": " ".join(words[start : end + 1])}
        for kind, start, end in get_entities(tags)
    ]


# --------------------------------------------------------------------------- prediction I/O
PREDICT_FORMATS = ("text", "jsonl", "conll")


def _text_words(tokenizer: Any, text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Split raw text into words the way the tokenizer's pre-tokenizer does, with character offsets."""
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    return [word for word, _ in pieces], [span for _, span in pieces]


def read_unlabeled(path: str, fmt: str, tokenizer: Any, config: JobConfig) -> pa.Table:
    """Prediction input as a ``tokens``/``line`` table (plus ``text``/``offsets`` for raw text)."""
    if fmt not in PREDICT_FORMATS:
        raise DataError(f"--format {fmt!r} is not one of {', '.join(PREDICT_FORMATS)}")
    if fmt == "conll":
        return readers.read_token_tags(
            path, "conll", conll_tag_column=config.data.conll_tag_column, require_tags=False
        )
    if fmt == "jsonl":
        records = readers.read_records(path, "jsonl")
        if config.data.tokens_column in records.column_names:
            words = readers.read_records(path, "jsonl", [config.data.tokens_column])
            return pa.table({"tokens": words.column(config.data.tokens_column), "line": words.column("line")})
        if "text" not in records.column_names:
            raise DataError(
                f"{path}: each JSON line needs {config.data.tokens_column!r} (a list of words) "
                "or 'text' (a sentence)"
            )
        texts, lines = records.column("text").to_pylist(), records.column("line").to_pylist()
    else:
        texts, lines = [], []
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    texts.append(raw.rstrip("\r\n"))
                    lines.append(number)
    if not texts:
        raise DataError(f"{path}: no sentences to predict")
    words, offsets = zip(*(_text_words(tokenizer, t) for t in texts), strict=True)
    return pa.table({"tokens": list(words), "line": lines, "text": texts, "offsets": list(offsets)})


def write_predictions(
    inputs: pa.Table, predictions: dict[int, np.ndarray], labels: list[str], output: str | None, fmt: str
) -> None:
    """Entity spans as JSONL (``text``/``jsonl`` input) or CoNLL with a predicted column (``conll``)."""
    import json
    import sys

    tokens = inputs.column("tokens").to_pylist()
    gold = inputs.column("tags").to_pylist() if "tags" in inputs.column_names else None
    texts = inputs.column("text").to_pylist() if "text" in inputs.column_names else None
    offsets = inputs.column("offsets").to_pylist() if "offsets" in inputs.column_names else None
    handle = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
    try:
        for i, words in enumerate(tokens):
            tags = word_tags(predictions[i], labels)
            if fmt == "conll":
                for j, (word, tag) in enumerate(zip(words, tags, strict=True)):
                    handle.write(f"{word} {gold[i][j]} {tag}\n" if gold else f"{word} {tag}\n")
                handle.write("\n")
                continue
            spans = entity_spans(words, tags)
            record: dict[str, Any] = {"tokens": words, "tags": tags, "entities": spans}
            if texts is not None:
                record["text"] = texts[i]
                for span in spans:
                    span["start_char"] = offsets[i][span["start"]][0]
                    span["end_char"] = offsets[i][span["end"] - 1][1]
                    span["text"] = texts[i][span["start_char"] : span["end_char"]]
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if output:
            handle.close()
