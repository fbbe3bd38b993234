"""The one assembly path: a task rebuilt from config + manifest behaves like the one that prepared."""

from __future__ import annotations

from distributed_ft.config.load import load_config
from distributed_ft.testing import make_tiny_bert, make_tokenizer
from distributed_ft.train.job import data_splits, load_task


def test_a_task_that_never_prepared_pads_with_the_tokenizers_pad_id(tmp_path, tiny_conll):
    """Ray workers and readers of a cache never call prepare_data; collation must still use the right pad."""
    tokenizer = make_tokenizer()
    tokenizer.pad_token = "[MASK]"  # pad id 4, as RoBERTa-style tokenizers have a non-zero pad id
    model_dir = make_tiny_bert(tmp_path / "model", tokenizer=tokenizer)
    config, _ = load_config(
        "ner-conll2003",
        [
            f"model.name={model_dir}",
            f"data.train={tiny_conll['train']}",
            "data.validation=null",
            "data.test=null",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_train_samples=null",
        ],
    )
    preparer_tokenizer, preparer = load_task(config)
    prepared = preparer.prepare_data(preparer_tokenizer, data_splits(config))
    _, reader = load_task(config)  # e.g. a Ray worker: the data arrives prepared
    reader.restore_assets(prepared.meta)
    rows = prepared.splits["train"].read().slice(0, 8).to_pylist()
    batch = reader.collate(rows)
    assert preparer_tokenizer.pad_token_id == 4
    padded = batch["input_ids"][batch["attention_mask"] == 0]
    assert padded.numel() > 0 and set(padded.tolist()) == {4}
    assert (batch["input_ids"] == preparer.collate(rows)["input_ids"]).all()
