"""Data pipeline: the training source + collate vs the training step's consumption; cold vs cached prepare.

* **prepare**: ``task.prepare_data`` into an empty cache directory (read, tokenize, align labels, write
  Parquet shards + manifest) vs the same call again (fingerprint match: the manifest is read).
* **pipeline**: one epoch of the training source (length-grouped shuffle, dynamic-padding collate) with
  nothing else running: batches/s, samples/s, tokens/s.
* **consumption**: the library's step on the same source (``engine.forward``, ``task.loss``,
  ``engine.backward``, ``engine.step`` with ``TorchEngine``), steps/s after warm-up.

``headroom`` = pipeline batches/s / training steps/s: how many times faster batches are produced than
consumed; ``1 / headroom`` is the share of a step spent producing its batch (single process, no
prefetching). Pipeline passes and training runs alternate (ABBA) in one process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import StepRecorder, interleaved, job_config, median, paired_ratios


def _source(config: Any, task: Any, split: Any) -> Any:
    from distributed_ft.train.loop import training_source

    return training_source(config, task, split)


def pipeline_pass(config: Any, task: Any, split: Any) -> dict[str, Any]:
    """Iterate one epoch of batches, doing nothing with them."""
    started = time.perf_counter()
    source = _source(config, task, split)
    built = time.perf_counter()
    batches = samples = real = padded = 0
    for batch in source:
        mask = batch["attention_mask"]
        batches += 1
        samples += int(mask.shape[0])
        real += int(mask.sum())
        padded += int(mask.numel())
    seconds = time.perf_counter() - built
    return {
        "source_build_s": built - started,
        "batches": batches,
        "seconds": seconds,
        "batches_per_s": batches / seconds,
        "samples_per_s": samples / seconds,
        "real_tokens_per_s": real / seconds,
        "padded_tokens_per_s": padded / seconds,
    }


def training_pass(config: Any, task: Any, split: Any, labels: list[str], steps: int, warmup: int) -> dict:
    """The library's step (TorchEngine) on the same source; steps/s after warm-up."""
    import torch

    from distributed_ft.engine import build_engine
    from distributed_ft.runtime.context import LocalContext
    from distributed_ft.train.job import build_model

    context = LocalContext()
    torch.manual_seed(config.train.seed)
    engine = build_engine(config, context)
    model = build_model(config, task, labels, engine)
    engine.prepare(model, total_steps=steps)
    engine.train(True)
    recorder = StepRecorder()
    source = _source(config, task, split)
    for batch in source:
        recorder.batch(batch)
        loss = task.loss_sum(engine.forward(batch), batch) / task.loss_weight(batch).clamp(min=1)
        engine.backward(loss)
        engine.step()
        recorder.step_done()
        if len(recorder.ends) >= steps:
            break
    summary = recorder.summary(warmup)
    summary["steps_per_s"] = 1 / summary["step_s_p50"] if summary["step_s_p50"] else None
    summary["batches_per_s"] = (
        summary["samples_per_s"] / config.train.batch_size if summary["samples_per_s"] else None
    )
    return summary


def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import transformers

    from distributed_ft.train.job import data_splits, load_task

    transformers.logging.set_verbosity_error()
    params = spec["params"]
    if params.get("threads"):
        import torch

        torch.set_num_threads(int(params["threads"]))
    repeats = int(params.get("repeats", 2))
    steps, warmup = int(params.get("train_steps", 20)), int(params.get("warmup_steps", 3))
    config = job_config(spec["job"])
    records: list[dict[str, Any]] = []

    # prepare: cold then cached, per repeat (a fresh cache directory each repeat)
    splits = data_splits(config)
    prepared = None
    for rep in range(repeats):
        cold_config = job_config(spec["job"], f"data.cache_dir={workdir / f'cache-{rep}'}")
        tokenizer, task = load_task(cold_config)
        for variant in ("cold", "cached"):
            started = time.perf_counter()
            prepared = task.prepare_data(tokenizer, splits)
            seconds = time.perf_counter() - started
            examples = sum(s.stats.examples for s in prepared.splits.values())
            records.append(
                {
                    "variant": f"prepare {variant}",
                    "repeat": rep,
                    "seconds": seconds,
                    "reused": prepared.reused,
                    "examples": examples,
                    "examples_per_s": examples / seconds,
                }
            )
    assert prepared is not None
    tokenizer, task = load_task(config)
    started = time.perf_counter()
    split = prepared.splits["train"]
    read_seconds = time.perf_counter() - started

    for rep, variant in interleaved(["pipeline", "training"], repeats):
        if variant == "pipeline":
            result = pipeline_pass(config, task, split)
        else:
            result = training_pass(config, task, split, prepared.labels, steps, warmup)
        records.append({"variant": variant, "repeat": rep, **result})
    return summarize(records, read_seconds, config)


def summarize(records: list[dict[str, Any]], read_seconds: float, config: Any) -> dict[str, Any]:
    def med(variant: str, key: str) -> float | None:
        return median(r.get(key) for r in records if r["variant"] == variant)

    headroom = paired_ratios(records, "batches_per_s", "pipeline", "training")
    headroom["note"] = "batches produced per batch consumed; 1/x = data share of a step"
    cache = paired_ratios(records, "seconds", "prepare cold", "prepare cached")
    cache["note"] = "how many times longer a cold prepare takes than a cache hit"
    rows = [
        [
            "prepare cold",
            med("prepare cold", "seconds"),
            med("prepare cold", "examples_per_s"),
            None,
            None,
            None,
        ],
        [
            "prepare cached",
            med("prepare cached", "seconds"),
            med("prepare cached", "examples_per_s"),
            None,
            None,
            None,
        ],
        ["read prepared train split", read_seconds, None, None, None, None],
        [
            "pipeline (source + collate)",
            med("pipeline", "seconds"),
            med("pipeline", "samples_per_s"),
            med("pipeline", "batches_per_s"),
            med("pipeline", "real_tokens_per_s"),
            med("pipeline", "padded_tokens_per_s"),
        ],
        [
            "training step (consumption)",
            med("training", "measured_seconds"),
            med("training", "samples_per_s"),
            med("training", "batches_per_s"),
            med("training", "real_tokens_per_s"),
            med("training", "padded_tokens_per_s"),
        ],
    ]
    share = 1 / headroom["value"] if headroom["value"] else None
    return {
        "ratios": [headroom, cache],
        "tables": [
            {
                "title": "Throughput (median over repeats)",
                "columns": [
                    "stage",
                    "seconds",
                    "examples or samples/s",
                    "batches/s",
                    "real tok/s",
                    "padded tok/s",
                ],
                "rows": rows,
                "caption": f"{config.data.max_train_samples} train sentences, "
                f"batch {config.train.batch_size}, max_length {config.data.max_length}; "
                "source build (RowReader) "
                f"{med('pipeline', 'source_build_s') or 0:.3f} s; data share of a training step "
                f"{share if share is not None else float('nan'):.2%}.",
            }
        ],
        "plots": [
            {
                "title": "batches/s",
                "ylabel": "batches/s",
                "labels": ["pipeline", "training"],
                "series": {"": [med("pipeline", "batches_per_s"), med("training", "batches_per_s")]},
            },
            {
                "title": "prepare seconds",
                "ylabel": "s",
                "labels": ["cold", "cached"],
                "series": {"": [med("prepare cold", "seconds"), med("prepare cached", "seconds")]},
            },
        ],
        "records": records,
        "failures": [],
        "notes": [],
    }
