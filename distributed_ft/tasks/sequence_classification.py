"""Sequence classification: single- or multi-label, single texts or text pairs, relation classification.

Data: JSONL / CSV / Parquet columns named by ``data.text_column`` (+ ``data.text_pair_column``) and
``data.label_column``, or a folder-per-class layout. Multi-label labels are a list, a JSON list string,
or a string split at ``data.label_delimiter``. Relation classification marks the two arguments in the text
(``[E1] ... [/E1]``, ``[E2] ... [/E2]``); ``data.entity_markers`` adds the markers to the tokenizer as
unsplittable tokens and grows the embeddings. The loss is computed here (``data.class_weights``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from distributed_ft.config.schema import JobConfig
from distributed_ft.config.task_metrics import TASK_METRICS
from distributed_ft.data import readers
from distributed_ft.data.augment import augment_texts
from distributed_ft.data.builtin import resolve
from distributed_ft.data.few_shot import few_shot_examples
from distributed_ft.data.prepare import (
    Preparation,
    PreparedDataset,
    SplitPlan,
    SplitStats,
    limit_split,
)
from distributed_ft.data.sources import Batch, pad_sequences
from distributed_ft.errors import ConfigError, DataError
from distributed_ft.modeling.build import build_model, load_tokenizer
from distributed_ft.tasks.base import cached, input_key, shaped_training_set
from distributed_ft.tasks.classification_data import (
    add_marker_tokens,
    check_known_labels,
    check_markers,
    entity_markers,
    label_order,
    parse_labels,
    text_value,
)
from distributed_ft.tasks.classification_metrics import classification_metrics, format_classification_report

log = logging.getLogger("distributed_ft")
ENCODE_CHUNK = 2048
METRICS = TASK_METRICS["sequence_classification"]
"""Metrics ``eval.metric`` may name, and whether each is maximised or minimised."""
PREDICT_FORMATS = ("text", "jsonl")


# --------------------------------------------------------------------------- encoding
def encode_texts(
    table: pa.Table,
    tokenizer: Any,
    label2id: dict[str, int] | None,
    max_length: int,
    markers: list[str],
    *,
    first: int = 0,
) -> tuple[pa.Table, SplitStats]:
    """Tokenize texts (and pairs); ``label_ids`` only when ``label2id`` is given.

    ``first`` is the split index of the table's first row (rows of a chunk keep their split's example ids).
    Truncation is counted in ``stats.extra`` (``truncated_examples``, ``markers_cut``).
    """
    texts = table.column("text").to_pylist()
    pairs = table.column("text_pair").to_pylist() if "text_pair" in table.column_names else None
    keep_types = "token_type_ids" in tokenizer.model_input_names
    marker_ids = set(tokenizer.convert_tokens_to_ids(markers))
    columns: dict[str, list] = {"input_ids": [], "token_type_ids": []}
    stats, truncated, markers_cut = SplitStats(examples=len(texts)), 0, 0
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk_pairs = pairs[start : start + ENCODE_CHUNK] if pairs else None
        encoding = tokenizer(
            texts[start : start + ENCODE_CHUNK], chunk_pairs, truncation=True, max_length=max_length
        )
        for i, ids in enumerate(encoding["input_ids"]):
            columns["input_ids"].append(ids)
            if keep_types:
                columns["token_type_ids"].append(encoding["token_type_ids"][i])
            truncated += bool(encoding.encodings[i].overflowing)
            markers_cut += bool(marker_ids - set(ids))
            stats.tokens += len(ids)
    int_list = pa.list_(pa.int32())
    out = {
        "example_id": pa.array(np.arange(first, first + len(texts)), pa.int64()),
        "input_ids": pa.array(columns["input_ids"], int_list),
    }
    if keep_types:
        out["token_type_ids"] = pa.array(columns["token_type_ids"], int_list)
    if label2id is not None:
        ids = [[label2id[label] for label in labels] for labels in table.column("labels").to_pylist()]
        out["label_ids"] = pa.array(ids, int_list)
    out["length"] = pa.array([len(ids) for ids in columns["input_ids"]], pa.int32())
    out["line"] = table.column("line")
    # SplitStats.describe words truncation for NER; it is reported from ``extra`` here instead
    stats.extra = {"truncated_examples": truncated, "markers_cut": markers_cut}
    return pa.table(out), stats


# --------------------------------------------------------------------------- the task
class SequenceClassificationTask:
    """Text and text-pair classification, single- or multi-label, with optional entity markers."""

    name = "sequence_classification"
    metrics = METRICS

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        data = config.data
        self.multi_label = data.multi_label
        self.markers = entity_markers(data.entity_markers)
        self.pair = data.text_pair_column
        self.pad_token_id = 0
        self.labels: list[str] = []
        self.class_weights: torch.Tensor | None = None
        self.tokenizer: Any = None

    # ----------------------------------------------------------------- data
    def prepare_tokenizer(self, tokenizer: Any) -> Any:
        """Add the entity markers and make sure there is a padding token (the run exports this tokenizer)."""
        added = add_marker_tokens(tokenizer, self.markers)
        if added:
            log.info("added %d entity-marker tokens to the tokenizer: %s", added, " ".join(self.markers))
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"the tokenizer of {self.config.model.name!r} has no pad or eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.pad_token_id = tokenizer, tokenizer.pad_token_id
        return tokenizer

    def _is_folder(self, path: str) -> bool:
        fmt = self.config.data.format
        return fmt == "folder" or (fmt == "auto" and os.path.isdir(path))

    def read(self, path: str, labelled: bool = True) -> pa.Table:
        """Read and validate one split into ``text`` (+ ``text_pair``), ``labels`` and ``line``."""
        data, path = self.config.data, resolve(path)
        text_column, label_column = data.text_column, data.label_column
        if self._is_folder(path):
            if self.multi_label or self.pair:
                raise ConfigError("a folder-per-class layout holds single-label, single-text examples")
            table, text_column, label_column = readers.read_class_folders(path), "text", "label"
        else:
            columns = [
                text_column,
                *([self.pair] if self.pair else []),
                *([label_column] if labelled else []),
            ]
            table = readers.read_records(path, data.format, columns)
        return self._validated(table, text_column, self.pair, label_column if labelled else None)

    def _validated(
        self, table: pa.Table, text_column: str, pair_column: str | None, label_column: str | None
    ) -> pa.Table:
        data = self.config.data
        columns: dict[str, list] = {"text": [], "text_pair": [], "labels": []}
        texts = table.column(text_column).to_pylist()
        pairs = table.column(pair_column).to_pylist() if pair_column else None
        values = table.column(label_column).to_pylist() if label_column else None
        for row, text in enumerate(texts):
            where = readers.RowLocation(table, row)
            columns["text"].append(text_value(text, where, text_column))
            if pairs is not None:
                columns["text_pair"].append(text_value(pairs[row], where, pair_column))
            if self.markers:
                check_markers(text + " " + (pairs[row] if pairs else ""), self.markers, where)
            if values is not None:
                labels = parse_labels(
                    values[row], where, label_column, self.multi_label, data.label_delimiter
                )
                columns["labels"].append(labels)
        out = {"text": pa.array(columns["text"], pa.string())}
        if pairs is not None:
            out["text_pair"] = pa.array(columns["text_pair"], pa.string())
        if values is not None:
            out["labels"] = pa.array(columns["labels"], pa.list_(pa.string()))
        out["line"] = table.column("line")
        return pa.table(out).replace_schema_metadata(table.schema.metadata)

    def compute_class_weights(self, train: pa.Table) -> torch.Tensor | None:
        """``balanced`` weights from the training labels (``None`` when ``data.class_weights=none``)."""
        return None if self.config.data.class_weights == "none" else self.balanced_weights(train)

    def balanced_weights(self, train: pa.Table) -> torch.Tensor:
        """Inverse class frequencies (multi-label: negatives / positives per class) of ``train``."""
        index = {label: i for i, label in enumerate(self.labels)}
        counts = np.zeros(len(self.labels))
        for labels in train.column("labels").to_pylist():
            for label in labels:
                counts[index[label]] += 1
        if self.multi_label:  # positive weight per class: negatives / positives
            weights = np.where(counts > 0, (train.num_rows - counts) / np.maximum(counts, 1), 1.0)
        else:  # inverse frequency, as scikit-learn's "balanced"
            weights = train.num_rows / (len(self.labels) * np.maximum(counts, 1))
        return torch.tensor(weights, dtype=torch.float32)

    def cache_key(self, tokenizer: Any, splits: dict[str, str], labels: list[str] | None = None) -> str:
        """Inputs by path, size and mtime, the tokenizer (with markers), given ``labels``, the options."""
        self.prepare_tokenizer(tokenizer)
        data = self.config.data
        return input_key(
            self.name,
            self.config,
            tokenizer,
            splits,
            labels,
            reader=[data.format, data.text_column, self.pair, data.label_column, data.label_delimiter],
            multi_label=self.multi_label,
            markers=self.markers,
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
        prepared = cached(
            self.config,
            key or self.cache_key(tokenizer, splits, labels),
            lambda: self.preparation(tokenizer, splits, labels),
        )
        self.labels = list(prepared.labels or [])
        self.restore_assets(prepared.meta)
        if not prepared.reused:
            for split in prepared.splits.values():
                self._warn_truncation(split.name, split.stats)
        return prepared

    def preparation(
        self, tokenizer: Any, splits: dict[str, str], labels: list[str] | None = None
    ) -> Preparation:
        """Read and validate every split, fix the labels (and class weights) from ``train``."""
        tables = {split: self.read(path) for split, path in splits.items()}
        if labels is None:
            if "train" not in tables:
                raise DataError("data.train is needed to fix the label set")
            labels = label_order(
                {lab for labs in tables["train"].column("labels").to_pylist() for lab in labs}
            )
        for table in tables.values():
            check_known_labels(table, labels)
        tables = {split: limit_split(table, split, self.config.data) for split, table in tables.items()}
        notes: list[str] = []
        if "train" in tables:
            tables["train"], notes = self.training_set(tables["train"])
        self.labels = labels
        # kept whatever data.class_weights says (it is no part of the key); restore_assets applies them
        weights = self.balanced_weights(tables["train"]).tolist() if "train" in tables else None
        if weights is not None and self.config.data.class_weights != "none":
            log.info("class weights: %s", dict(zip(labels, weights, strict=True)))
        encode = functools.partial(
            encode_texts,
            tokenizer=tokenizer,
            label2id={label: i for i, label in enumerate(labels)},
            max_length=self.config.data.max_length,
            markers=self.markers,
        )
        plans = [SplitPlan(split, table, encode) for split, table in tables.items()]
        return Preparation(plans, labels, meta={"class_weights": weights, "training_set": notes})

    def training_set(self, train: pa.Table) -> tuple[pa.Table, list[str]]:
        """Few-shot selection, then augmentation, of the training examples; a log line for each."""

        def augment(table: pa.Table, options: Any, seed: int) -> tuple[pa.Table, Any]:
            return augment_texts(table, options, seed, self.markers)

        return shaped_training_set(train, self.config, few_shot_examples, augment, "examples")

    def encode(
        self, table: pa.Table, tokenizer: Any, label2id: dict[str, int] | None, split: str = "input"
    ) -> tuple[pa.Table, SplitStats]:
        """Tokenize texts (and pairs); ``label_ids`` only when ``label2id`` is given."""
        encoded, stats = encode_texts(table, tokenizer, label2id, self.config.data.max_length, self.markers)
        self._warn_truncation(split, stats)
        return encoded, stats

    def _warn_truncation(self, split: str, stats: SplitStats) -> None:
        cut, markers_cut = stats.extra.get("truncated_examples", 0), stats.extra.get("markers_cut", 0)
        if cut or markers_cut:
            log.warning(
                "%s: %d examples truncated to data.max_length=%d (%d lost an entity marker); raise "
                "data.max_length to keep them whole",
                split,
                cut,
                self.config.data.max_length,
                markers_cut,
            )

    def collate(self, rows: list[dict[str, Any]], with_meta: bool = False) -> Batch:
        """Dynamic padding; ``labels`` are ids (single-label) or a 0/1 float matrix (multi-label)."""
        batch: Batch = {
            "input_ids": pad_sequences([r["input_ids"] for r in rows], self.pad_token_id),
            "attention_mask": pad_sequences([np.ones(len(r["input_ids"])) for r in rows], 0),
        }
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = pad_sequences([r["token_type_ids"] for r in rows], 0)
        if "label_ids" in rows[0]:
            if self.multi_label:
                labels = torch.zeros(len(rows), len(self.labels))
                for i, r in enumerate(rows):
                    labels[i, torch.from_numpy(np.array(r["label_ids"], dtype=np.int64))] = 1.0
            else:
                labels = torch.tensor([int(r["label_ids"][0]) for r in rows], dtype=torch.long)
            batch["labels"] = labels
        if with_meta:
            batch["meta"] = [int(r["example_id"]) for r in rows]
        return batch

    # ----------------------------------------------------------------- model
    def _vocab_size(self) -> int:
        """The tokenizer's length with markers (loads the base tokenizer when none was prepared)."""
        if self.tokenizer is None:
            self.prepare_tokenizer(load_tokenizer(self.config.model.name, self.config.model.revision))
        return len(self.tokenizer)

    def restore_assets(self, meta: dict[str, Any]) -> None:
        """The ``balanced`` class weights computed from the training split when the data was prepared."""
        weights = meta.get("class_weights")
        if weights is not None and self.config.data.class_weights != "none":
            self.class_weights = torch.tensor(weights, dtype=torch.float32)

    def build_model(self, labels: list[str] | None) -> nn.Module:
        self.labels = list(labels or self.labels)
        problem = "multi_label_classification" if self.multi_label else "single_label_classification"
        vocab_size = self._vocab_size()
        return build_model(
            self.name,
            self.config.model,
            self.labels,
            vocab_size=vocab_size,
            problem_type=problem,
            pad_token_id=self.pad_token_id,
        )

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        """The loss's denominator: examples (x classes for multi-label), or the class weights of the labels.

        Matches torch's ``mean`` reductions, so a window's summed loss over its summed weight equals the
        weighted mean loss of one batch holding the whole window.
        """
        labels = batch["labels"]
        if self.multi_label:  # a fill kernel, not a host-to-device copy
            return torch.full((), labels.numel(), dtype=torch.float64, device=labels.device)
        if self.class_weights is None:
            return torch.full((), labels.shape[0], dtype=torch.float64, device=labels.device)
        return self._class_weights_on(labels.device)[labels].sum()

    def _class_weights_on(self, device: torch.device) -> torch.Tensor:
        """The class weights on ``device``, copied there once (not once per micro-batch)."""
        source, copy = getattr(self, "_device_weights", (None, None))
        if source is not self.class_weights or copy.device != device:
            copy = self.class_weights.to(device)
            self._device_weights = (self.class_weights, copy)
        return copy

    def loss_sum(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """Summed (class-weighted) cross-entropy, or binary cross-entropy per class for multi-label."""
        logits = outputs.logits.float()
        labels = batch["labels"].to(logits.device)
        weights = None if self.class_weights is None else self._class_weights_on(logits.device)
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(
                logits, labels.float(), pos_weight=weights, reduction="sum"
            )
        return F.cross_entropy(logits, labels, weight=weights, reduction="sum")

    # ----------------------------------------------------------------- evaluation
    def predictions(self, outputs: Any, batch: Batch) -> list[tuple[int, np.ndarray]]:
        """Per example: class probabilities (softmax, or sigmoid per class for multi-label)."""
        logits = outputs.logits.float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1)
        return list(zip(batch["meta"], probs.cpu().numpy(), strict=True))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted ids ``(n,)`` (argmax) or a 0/1 matrix (multi-label: probability >= 0.5)."""
        return (probs >= 0.5).astype(np.int64) if self.multi_label else probs.argmax(-1)

    def score(self, predictions: dict[int, np.ndarray], split: pa.Table, labels: list[str]) -> dict[str, Any]:
        """Classification metrics of ``predictions`` against the gold labels of the prepared ``split``."""
        ids = split.column("example_id").to_pylist()
        gold = split.column("label_ids").to_pylist()
        probs = np.stack([predictions[i] for i in ids]) if ids else np.zeros((0, len(labels)))
        if self.multi_label:
            y_true = np.zeros((len(ids), len(labels)), dtype=np.int64)
            for row, label_ids in enumerate(gold):
                y_true[row, label_ids] = 1
        else:
            y_true = np.array([g[0] for g in gold], dtype=np.int64)
        return classification_metrics(y_true, self.decide(probs), labels)

    def format_report(self, metrics: dict[str, Any]) -> str:
        return format_classification_report(metrics)

    # ----------------------------------------------------------------- prediction
    def read_unlabeled(self, path: str, fmt: str, tokenizer: Any) -> pa.Table:
        """``text``: one example per line (``TEXT<TAB>PAIR`` with pairs); ``jsonl``: the text column(s)."""
        if fmt not in PREDICT_FORMATS:
            raise DataError(
                f"--format {fmt!r} does not fit {self.name}; use one of {', '.join(PREDICT_FORMATS)}"
            )
        if fmt == "jsonl":
            return self.read(path, labelled=False)
        texts, pairs, lines = [], [], []
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                if self.pair:
                    if "\t" not in line:
                        raise DataError(
                            f"{path}:{number}: expected TEXT<TAB>PAIR (data.text_pair_column is set)"
                        )
                    line, pair = line.split("\t", 1)
                    pairs.append(pair)
                texts.append(line)
                lines.append(number)
        if not texts:
            raise DataError(f"{path}: no texts to predict")
        columns = {"text": texts, **({"text_pair": pairs} if self.pair else {})}
        table = pa.table({**columns, "line": pa.array(lines, pa.int64())})
        meta = {"source": path, "files": json.dumps([[path, len(texts), "line"]])}
        pair_column = "text_pair" if self.pair else None
        return self._validated(table.replace_schema_metadata(meta), "text", pair_column, None)

    def encode_unlabeled(self, inputs: pa.Table, tokenizer: Any) -> pa.Table:
        return self.encode(inputs, tokenizer, None)[0]

    def write_predictions(
        self,
        inputs: pa.Table,
        predictions: dict[int, np.ndarray],
        labels: list[str],
        output: str | None,
        fmt: str,
    ) -> None:
        """JSONL: the input text(s), the predicted ``label`` (multi-label: ``labels``) and all ``scores``."""
        import sys

        texts = inputs.column("text").to_pylist()
        pairs = inputs.column("text_pair").to_pylist() if "text_pair" in inputs.column_names else None
        handle = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
        try:
            for i, text in enumerate(texts):
                probs = predictions[i]
                record: dict[str, Any] = {"text": text, **({"text_pair": pairs[i]} if pairs else {})}
                decided = self.decide(probs[None])[0]
                if self.multi_label:
                    record["labels"] = [labels[j] for j in np.flatnonzero(decided)]
                else:
                    record["label"] = labels[int(decided)]
                record["scores"] = {label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            if output:
                handle.close()
