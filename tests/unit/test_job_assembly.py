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


def _config(*overrides: str):
    return load_config("ner-conll2003", ["model.name=/models/a", "data.train=/data/train.conll", *overrides])[
        0
    ]


def test_a_finished_run_is_never_trained_over(tmp_path):
    from distributed_ft.train.job import run_dir_refusal

    (tmp_path / "results.json").write_text("{}")
    refusal = run_dir_refusal(tmp_path, _config())
    assert refusal is not None and "finished run" in refusal and "new run.output_dir" in refusal
    assert run_dir_refusal(tmp_path, _config("run.resume=never")) is not None  # never: results are kept


def test_an_unfinished_run_resumes_only_with_its_own_model_and_data(tmp_path):
    from distributed_ft.config.load import dump_config
    from distributed_ft.train.job import run_dir_refusal

    (tmp_path / "config.yaml").write_text(dump_config(_config()))
    assert (
        run_dir_refusal(tmp_path, _config("model.name=/models/b")) is None
    )  # no checkpoint: nothing to resume
    step = tmp_path / "checkpoints" / "step-0000003"
    step.mkdir(parents=True)
    (step / "run_state.json").write_text("{}")
    assert run_dir_refusal(tmp_path, _config()) is None  # the same command resumes
    assert (
        run_dir_refusal(tmp_path, _config("train.lr=1e-5", "train.max_steps=99")) is None
    )  # more steps: fine
    refusal = run_dir_refusal(tmp_path, _config("model.name=/models/b"))
    assert refusal is not None and "model.name: '/models/a' -> '/models/b'" in refusal
    assert "run.resume=never" in refusal
    assert run_dir_refusal(tmp_path, _config("data.train=/data/other.conll")) is not None
    assert run_dir_refusal(tmp_path, _config("model.name=/models/b", "run.resume=never")) is None
