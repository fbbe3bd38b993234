"""Our local loop vs a hand-written PyTorch loop vs Hugging Face ``Trainer``, interleaved in one process.

All three train the same model (same initial weights: same seed before the head is created) on the
same prepared CoNLL-2003 subset with the same micro-batch, epochs, AdamW (fused), linear warm-up schedule
and gradient clipping, and are scored by the same entity-level evaluation on the same test subset.

* ``ours``: ``distributed_ft.train.loop.train`` itself, unchanged. Its engine is wrapped by
  :class:`~benchmarks.common.TimedEngine`, which only records step boundaries and batch sizes.
* ``plain``: a hand-written loop (model, AdamW, schedule, pad-and-stack collate, ``for batch: forward,
  backward, clip, step``). It takes exactly the batches our loop takes (the library's length-grouped
  batch plan for the same seed and epoch) so both do identical arithmetic.
* ``hf``: ``transformers.Trainer`` with ``train_sampling_strategy="group_by_length"`` (its own
  length-grouped sampler: similar but not identical padding, reported), ``optim="adamw_torch_fused"``,
  ``DataCollatorForTokenClassification``, no evaluation, saving or logging during training.

Variants run in ABBA order (``ours, plain, hf, hf, plain, ours``); ratios are taken per repeat.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    StepRecorder,
    TimedEngine,
    compute_units,
    interleaved,
    job_config,
    memory_snapshot,
    mfu,
    model_flops_per_token,
    model_state_bytes,
    paired_ratios,
    peak_flops,
)

LABEL_PAD = -100


def _f1_of(model: Any, config: Any, task: Any, prepared: Any, context: Any) -> dict[str, Any]:
    """Entity-level test metrics of ``model`` with the library's evaluation (same for every variant)."""
    from distributed_ft.engine.torch_engine import inference_engine
    from distributed_ft.train.evaluate import evaluate

    engine = inference_engine(model, config, context)
    metrics = evaluate(
        engine,
        task,
        prepared.splits["test"].read(),
        prepared.labels,
        context,
        batch_size=config.eval.batch_size,
    )
    return {"f1": metrics["f1"], "precision": metrics["precision"], "recall": metrics["recall"]}


# --------------------------------------------------------------------------- ours
def run_ours(config: Any, context: Any, workdir: Path, recorder: StepRecorder) -> dict[str, Any]:
    """The library's loop, unchanged; only its engine is wrapped to record step boundaries."""
    from distributed_ft.engine import build_engine
    from distributed_ft.train.loop import train

    run = config.run.model_copy(update={"output_dir": str(workdir), "resume": "never", "progress": False})
    config = config.model_copy(update={"run": run})
    engine = TimedEngine(build_engine(config, context), recorder)
    results = train(config, context, "bench-ours", engine=engine)
    test = results["test"]
    return {"f1": test["f1"], "precision": test["precision"], "recall": test["recall"]}


# --------------------------------------------------------------------------- plain PyTorch
def _pad(rows: list[np.ndarray], value: int) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _baseline_model(config: Any, labels: list[str]) -> Any:
    """The job's token-classification model for the baselines, seeded as the library seeds its own."""
    from transformers import AutoModelForTokenClassification, set_seed

    from benchmarks.common import resolve_model_name
    from distributed_ft.data.builtin import resolve

    set_seed(config.train.seed)
    return AutoModelForTokenClassification.from_pretrained(
        resolve(resolve_model_name(config.model.name)),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def run_plain(
    config: Any, context: Any, prepared: Any, recorder: StepRecorder, task: Any
) -> tuple[dict[str, Any], Any]:
    """A hand-written training loop on the same batches; returns test metrics and the model."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from distributed_ft.data.sources import length_grouped_order

    train_cfg, labels = config.train, prepared.labels
    table = prepared.splits["train"].read()
    ids = [np.asarray(x, dtype=np.int64) for x in table.column("input_ids").to_pylist()]
    tags = [np.asarray(x, dtype=np.int64) for x in table.column("labels").to_pylist()]
    lengths = np.asarray(table.column("length").to_numpy())
    pad_id = task.pad_token_id

    model = _baseline_model(config, labels)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": train_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=train_cfg.lr,
        fused=True,
    )
    epochs = math.ceil(train_cfg.epochs)
    steps = math.ceil(len(ids) / train_cfg.batch_size) * epochs
    schedule = get_linear_schedule_with_warmup(optimizer, round(train_cfg.warmup_ratio * steps), steps)
    model.train()
    for epoch in range(epochs):
        plan = length_grouped_order(
            lengths, train_cfg.batch_size, np.random.default_rng([train_cfg.seed, epoch])
        )
        for indices in plan:
            input_ids = _pad([ids[i] for i in indices], pad_id)
            batch = {
                "input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy((input_ids != pad_id).astype(np.int64)),
                "labels": torch.from_numpy(_pad([tags[i] for i in indices], LABEL_PAD)),
            }
            recorder.batch(batch)
            started = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
            if recorder.wants_state_bytes():
                recorder.state_bytes = model_state_bytes(model, optimizer)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            recorder.compute(time.perf_counter() - started)
            recorder.step_done()
    return _f1_of(model.eval(), config, task, prepared, context), model


# --------------------------------------------------------------------------- Hugging Face Trainer
def run_hf(
    config: Any,
    context: Any,
    prepared: Any,
    recorder: StepRecorder,
    task: Any,
    tokenizer: Any,
    out: Path,
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``transformers.Trainer`` with its usual token-classification set-up.

    ``arguments`` replace ``TrainingArguments`` fields of that set-up (e.g. ``train_sampling_strategy:
    random`` and ``optim: adamw_torch`` for a plain ``run_ner.py``).
    """
    from transformers import (
        DataCollatorForTokenClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    train_cfg, labels = config.train, prepared.labels
    table = prepared.splits["train"].read()
    rows = [
        {"input_ids": i, "labels": t}
        for i, t in zip(
            table.column("input_ids").to_pylist(), table.column("labels").to_pylist(), strict=True
        )
    ]
    collate = DataCollatorForTokenClassification(tokenizer)

    def counting_collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        recorder.batch(batch)
        return batch

    class Timing(TrainerCallback):
        started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            Timing.started = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if recorder.wants_state_bytes():
                recorder.state_bytes = model_state_bytes(kwargs["model"], kwargs["optimizer"])

        def on_step_end(self, args, state, control, **kwargs):
            recorder.compute(
                time.perf_counter() - Timing.started
            )  # Trainer's whole step, forward to zero_grad
            recorder.step_done()

    model = _baseline_model(config, labels)
    fields: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=train_cfg.batch_size,
        num_train_epochs=train_cfg.epochs,
        learning_rate=train_cfg.lr,
        warmup_steps=train_cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.max_grad_norm,
        optim="adamw_torch_fused",
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=context.device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=train_cfg.seed,
        remove_unused_columns=False,
    )
    args = TrainingArguments(**{**fields, **(arguments or {})})
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=counting_collate,
        processing_class=tokenizer,
        callbacks=[Timing()],
    )
    trainer.train()
    return _f1_of(trainer.model.eval(), config, task, prepared, context)


# --------------------------------------------------------------------------- experiment
def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run every variant ``repeats`` times in ABBA order and compare throughput and F1."""
    import torch
    import transformers

    from distributed_ft.runtime.context import LocalContext
    from distributed_ft.train.job import data_splits, load_task

    transformers.logging.set_verbosity_error()
    params = spec["params"]
    variants = params.get("variants", ["ours", "plain", "hf"])
    repeats, warmup = int(params.get("repeats", 2)), int(params.get("warmup_steps", 5))
    if params.get("threads"):
        torch.set_num_threads(int(params["threads"]))
    config = job_config(spec["job"])
    context = LocalContext()
    tokenizer, task = load_task(config)
    prepared = task.prepare_data(tokenizer, data_splits(config))  # ours finds it in the cache
    peak = peak_flops()
    records: list[dict[str, Any]] = []
    failures = []
    for rep, variant in interleaved(variants, repeats):
        recorder = StepRecorder()
        out = workdir / f"{variant}-{rep}"
        try:
            if variant == "ours":
                scores = run_ours(config, context, out, recorder)
            elif variant == "plain":
                scores, _ = run_plain(config, context, prepared, recorder, task)
            elif variant == "hf":
                scores = run_hf(config, context, prepared, recorder, task, tokenizer, out)
            else:
                raise ValueError(f"unknown variant {variant!r}")
        except Exception as exc:  # record and go on: the other variants still compare
            failures.append(
                {"variant": f"{variant} (repeat {rep})", "reason": f"{type(exc).__name__}: {exc}"}
            )
            continue
        summary = recorder.summary(warmup)
        flops = model_flops_per_token(
            config.model.name, config.task, len(prepared.labels), summary["mean_padded_len"] or 1
        )
        records.append(
            {
                "variant": variant,
                "repeat": rep,
                **summary,
                **scores,
                "mfu": mfu(
                    summary["real_tokens_per_s"],
                    flops,
                    peak["flops"],
                    devices=compute_units(peak, 1, torch.get_num_threads()),
                ),
                "model_flops_per_token": flops,
                "state_bytes": recorder.state_bytes,
                "memory": memory_snapshot(),
            }
        )
    return summarize(records, variants, failures, peak, config)


def summarize(
    records: list[dict[str, Any]],
    variants: list[str],
    failures: list[dict[str, str]],
    peak: dict,
    config: Any,
) -> dict[str, Any]:
    """Ratios (per repeat, median), a per-variant table and the plots."""
    from benchmarks.common import median

    ratios = []
    for other in [v for v in variants if v != "ours"]:
        for metric in (
            "samples_per_s",
            "real_tokens_per_s",
            "padded_tokens_per_s",
            "measured_seconds",
            "compute_s_p50",
        ):
            ratios.append(paired_ratios(records, metric, "ours", other))
        f1 = {v: median(r["f1"] for r in records if r["variant"] == v) for v in ("ours", other)}
        ratios.append(
            {
                "comparison": f"ours - {other}",
                "metric": "test entity F1 (difference)",
                "value": None if None in f1.values() else f1["ours"] - f1[other],
                "per_repeat": [],
            }
        )
    for other in [v for v in variants if v != "ours"]:
        diff = [
            (o["overhead_s_mean"] - p["overhead_s_mean"]) * 1000
            for o in records
            for p in records
            if o["variant"] == "ours" and p["variant"] == other and o["repeat"] == p["repeat"]
            if o.get("overhead_s_mean") is not None and p.get("overhead_s_mean") is not None
        ]
        ratios.append(
            {
                "comparison": f"ours - {other}",
                "metric": "loop overhead ms/step (difference)",
                "value": median(diff),
                "per_repeat": diff,
                "note": "step time outside forward/backward/clip/optimizer step",
            }
        )
    for ratio in ratios:
        if ratio["metric"] == "measured_seconds":
            ratio["note"] = "time of the measured steps; < 1 means ours is faster"
        if ratio["metric"] == "compute_s_p50":
            ratio["note"] = "the same model work timed in each loop: how much is kernel-time variance"
    rows = []
    for variant in variants:
        runs = [r for r in records if r["variant"] == variant]
        if not runs:
            continue

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float | None:
            return median(r.get(key) for r in runs)

        states = runs[0].get("state_bytes") or {}
        rows.append(
            [
                variant,
                len(runs),
                med("step_s_p50"),
                med("step_s_p90"),
                med("samples_per_s"),
                med("real_tokens_per_s"),
                med("padded_tokens_per_s"),
                med("real_token_fraction"),
                med("mfu"),
                med("compute_s_p50"),
                None if med("overhead_s_mean") is None else med("overhead_s_mean") * 1000,
                med("overhead_share"),
                med("f1"),
                sum(states.values()) / 2**20 if states else None,
            ]
        )
    columns = [
        "loop",
        "runs",
        "step s p50",
        "step s p90",
        "samples/s",
        "real tok/s",
        "padded tok/s",
        "real/padded",
        "MFU",
        "compute s p50",
        "loop overhead ms/step",
        "overhead share",
        "test F1",
        "param+grad+optim MiB",
    ]
    labels = [row[0] for row in rows]
    return {
        "ratios": ratios,
        "tables": [
            {
                "title": "Per loop (median over repeats)",
                "columns": columns,
                "rows": rows,
                "caption": f"MFU: real tokens/s x model FLOPs per token / ({peak['source']} x threads). Job: "
                f"{config.model.name}, {config.data.max_train_samples} train sentences, "
                f"{config.train.epochs:g} epoch(s), batch {config.train.batch_size}, lr {config.train.lr:g}.",
            }
        ],
        "plots": [
            {
                "title": "samples/s (median)",
                "ylabel": "samples/s",
                "labels": labels,
                "series": {"": [r[4] for r in rows]},
            },
            {
                "title": "test entity F1",
                "ylabel": "F1",
                "labels": labels,
                "series": {"": [r[12] for r in rows]},
            },
        ],
        "records": records,
        "failures": failures,
        "peak_flops": peak,
        "notes": [
            "step time = end of one optimizer step to the end of the next (batch fetch + collate + forward + "
            "backward + clip + optimizer step); warm-up steps excluded.",
            "compute = time inside forward, backward, clipping and the optimizer step (ours: the engine's "
            "forward/backward/step; hf: on_step_begin to on_step_end); loop overhead = step time - compute.",
            "ours and plain take identical batches; hf uses its own length-grouped sampler "
            "(see real/padded).",
        ],
    }
