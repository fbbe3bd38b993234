"""THE training loop: one function, the same under every launcher, engine and backend.

It sees only the seams: a RuntimeContext (where it runs), an Engine (how a step is taken) and a
PositionedSource (this rank's batches). Hooks are explicit: evaluation, checkpointing and early stopping
(:class:`~distributed_ft.train.validation.Validation`). One optimizer step is ``train_step(window)``
(:mod:`distributed_ft.train.step`); device values are read on the host only at ``log_every``, at
evaluations and at checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from distributed_ft.config.schema import JobConfig
from distributed_ft.data.prepare import PreparedDataset, PreparedSplit
from distributed_ft.data.shards import ShardedBatchSource
from distributed_ft.engine import build_engine
from distributed_ft.engine.base import Engine
from distributed_ft.errors import CheckpointError, Preempted
from distributed_ft.modeling import gazetteer
from distributed_ft.modeling.peft import (
    format_parameter_report,
    parameter_report,
    write_export_extras,
)
from distributed_ft.runtime.context import RuntimeContext, describe_device
from distributed_ft.runtime.tracking import MetricsLogger, Progress, ends_trackers
from distributed_ft.runtime.watchdog import Watchdog
from distributed_ft.tasks.base import Task
from distributed_ft.train.adversarial import Adversary
from distributed_ft.train.checkpoint import CheckpointManager, RunState, agree_on_resume
from distributed_ft.train.evaluate import evaluate
from distributed_ft.train.job import Job, build_job, build_model
from distributed_ft.train.layout import step_layout, with_grad_accum
from distributed_ft.train.report import write_run_report
from distributed_ft.train.step import LogWindow, StepTally, micro_batch_seeds, train_step, windows
from distributed_ft.train.throughput import FlopsMeter, flops_meter, peak_memory_bytes
from distributed_ft.train.validation import Validation

log = logging.getLogger("distributed_ft")
PREFETCH_DEPTH = 2
"""Training batches a background thread keeps collated (and pinned, on CUDA) ahead of the step."""


def training_source(
    config: JobConfig,
    task: Task,
    split: PreparedSplit,
    rank: int = 0,
    world_size: int = 1,
    *,
    prefetch: int = 0,
    pin_memory: bool = False,
) -> ShardedBatchSource:
    """The training batches of ``rank``: its lanes of each epoch, streamed from the split's shards.

    ``config.train.grad_accum`` is this world size's share of the step (``train/layout.py``). The one
    definition of the training order; benchmarks replay it to count tokens per step.
    """
    return ShardedBatchSource(
        split.shard_reader(),
        task.collate,
        config.train.batch_size,
        group_by_length=config.data.group_by_length,
        seed=config.train.seed,
        rank=rank,
        world_size=world_size,
        grad_accum=config.train.grad_accum,
        prefetch=prefetch,
        pin_memory=pin_memory,
    )


@ends_trackers  # an exception ends the MLflow run as FAILED (KILLED when pre-empted)
def train(
    config: JobConfig,
    context: RuntimeContext,
    name: str = "job",
    data: PreparedDataset | None = None,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Train, evaluate, keep the best checkpoint, test it and export it; returns ``results.json``.

    ``data`` is the prepared dataset when an orchestrator delivers it (Ray's object store); otherwise it is
    prepared (or found in the cache) here. ``engine`` replaces the configured one (benchmarks wrap it).
    """
    # first: a conflicting DeepSpeed JSON fails before any write
    injected = engine is not None
    engine = engine if engine is not None else build_engine(config, context)
    job = build_job(config, context, name, data)
    config, task, data = job.config, job.task, job.data
    checkpoints = CheckpointManager(job.run_dir / "checkpoints", context, keep=config.train.keep_checkpoints)
    resume_from = agree_on_resume(context, checkpoints, config.run.resume)
    saved = checkpoints.read_state(resume_from) if resume_from is not None else None
    layout = step_layout(config, context.world_size, saved.source if saved is not None else None)
    if layout.grad_accum != config.train.grad_accum:  # resumed (or elastic) on another world size
        if injected:
            raise CheckpointError("an injected engine cannot change train.grad_accum to resume this run")
        config = with_grad_accum(config, layout.grad_accum)
        engine = build_engine(config, context)
    train_cfg, progress = config.train, Progress(config.run.progress, context)
    metrics_log = MetricsLogger(job.run_dir, context, config)  # + trackers of track.*
    log.info("device: %s", describe_device(context.device))

    source = training_source(
        config,
        task,
        data.splits["train"],
        context.rank,
        context.world_size,
        prefetch=PREFETCH_DEPTH,
        pin_memory=context.device.type == "cuda",
    )
    steps_per_epoch = source.steps_per_epoch
    total_steps = train_cfg.max_steps or math.ceil(train_cfg.epochs * steps_per_epoch)
    log.info("train: %s", source.describe())

    model = build_model(config, task, job.labels, engine)
    parameters = parameter_report(model, config.peft.method, config.task)
    num_labels = None if config.task == "causal_lm" else len(job.labels)
    meter = flops_meter(config, num_labels, parameters["trainable"], context.device, context.world_size)
    log.info(format_parameter_report(parameters))
    engine.prepare(model, total_steps)
    adversary = Adversary.from_config(train_cfg, engine.module)  # None unless train.adversarial is set
    if adversary is not None:
        log.info(adversary.describe())
    state = RunState()
    if resume_from is not None:
        state = checkpoints.load(engine, resume_from)
        source.load_state_dict(state.source)
        log.info(
            "resumed from %s (step %d, epoch %d, batch %d)",
            resume_from,
            state.step,
            state.epoch,
            state.source["position"],
        )
    log.info(
        "training %d steps (%d per epoch, %d ranks, engine %s)",
        total_steps,
        steps_per_epoch,
        context.world_size,
        type(engine).__name__,
    )
    split = data.splits["validation"].read() if "validation" in data.splits else None
    validation = Validation(config, task, split, job.labels, context, progress, state)
    tally, window = StepTally(context), LogWindow()
    trained = {"tokens": 0.0, "samples": 0, "seconds": 0.0}  # by this process (since a resume)

    def read_tally() -> dict[str, Any]:
        """Fold the device tallies into the log window and the run state (one collective, one sync)."""
        read = tally.read()
        window.add(read)
        state.tokens_seen += int(read["tokens"])
        trained["tokens"] += read["tokens"]
        trained["samples"] += read["samples"]
        trained["seconds"] += read["seconds"]
        return read

    def validate_and_checkpoint() -> None:
        watchdog.beat(phase="evaluation")  # a long phase: a hang only if it alone outlasts the timeout
        metrics, is_best = validation.run(engine)
        watchdog.beat(phase="checkpoint")
        metrics_log.log(
            "eval",
            state.step,
            split="validation",
            epoch=state.epoch,
            **{k: v for k, v in metrics.items() if not isinstance(v, dict)},
        )
        report = {f"validation/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        checkpoints.save(engine, state, is_best=is_best, metrics=report)
        watchdog.beat(phase="train")

    watchdog = Watchdog.for_run(config.run.hang_timeout_s, job.run_dir, context)  # inert without it
    train_started = time.perf_counter()
    engine.train(True)
    while state.step < total_steps and not state.stopped_early:
        source.set_epoch(state.epoch)
        batches = progress.wrap(
            source, total=len(source), desc=f"epoch {state.epoch}", initial=source.position
        )
        watchdog.start()  # run.hang_timeout_s: watches this epoch's steps (stopped in the finally)
        try:
            for micro_batches in windows(batches, train_cfg.grad_accum):
                seeds = micro_batch_seeds(train_cfg.seed, state.step + 1, source.own_lanes)
                step = train_step(engine, task, micro_batches, context, seeds, adversary)
                tally.add(step)
                state.step += 1
                watchdog.beat(state.step)
                state.source = source.state_dict()
                stop = False
                if state.step % train_cfg.log_every == 0 or state.step == total_steps:
                    read = read_tally()
                    stop = read["stop"]
                    record = {**window.flush(), "lr": engine.lr, "grad_norm": read["grad_norm"]}
                    if meter is not None:
                        seq_len = record["tokens"] / max(record["samples"], 1)
                        record["mfu"] = meter.mfu(record["tokens_per_s"], seq_len)
                    metrics_log.log("train", state.step, **record, epoch=state.epoch)
                    progress.postfix(loss=record["loss"], lr=record["lr"])
                if validation.due(state.step):
                    stop = read_tally()["stop"] or stop
                    validate_and_checkpoint()
                    tally.restart_clock()  # evaluation time is not training throughput
                elif train_cfg.save_every and state.step % train_cfg.save_every == 0:
                    stop = read_tally()["stop"] or stop
                    watchdog.beat(phase="checkpoint")
                    checkpoints.save(engine, state)
                    watchdog.beat(phase="train")
                    tally.restart_clock()
                if stop:  # SIGTERM or a pre-emption notice, agreed by all ranks in the tally's reduction
                    saved = checkpoints.save(engine, state)
                    raise Preempted(
                        f"stopped at step {state.step} on request; checkpoint {saved} written; "
                        "run the same command again to resume from it (without run.output_dir it picks up "
                        "the newest unfinished run of the same config under runs/)"
                    )
                if state.step >= total_steps or state.stopped_early:
                    break
            else:  # the epoch ran to its end
                state.epoch += 1
                source.set_epoch(state.epoch)
                state.source = source.state_dict()
                if validation.due(state.step, epoch_ended=True):
                    read_tally()
                    validate_and_checkpoint()
                    tally.restart_clock()
        finally:
            batches.close()  # stops the prefetch thread of an epoch left early
            watchdog.stop()
    read_tally()
    if validation.enabled and state.step not in validation.evaluated:  # the final weights compete too
        validate_and_checkpoint()
    train_seconds = time.perf_counter() - train_started
    throughput = throughput_summary(trained, meter, context)
    if state.stopped_early:
        log.info(
            "early stopping at step %d: no improvement in %d evaluations",
            state.step,
            train_cfg.early_stopping_patience,
        )
    if not validation.enabled:
        checkpoints.save(engine, state)
    return finish(
        job,
        engine,
        checkpoints,
        state,
        validation.evaluated,
        train_seconds,
        metrics_log,
        progress,
        context,
        parameters,
        steps_per_epoch,
        throughput,
    )


def throughput_summary(trained: dict[str, float], meter: FlopsMeter | None, context: RuntimeContext) -> dict:
    """``results.json``'s throughput: the job's tokens/s and samples/s over training time, MFU, memory.

    Every rank calls it (the peak memory of each is gathered).
    """
    seconds = max(trained["seconds"], 1e-9)
    tokens_per_s = trained["tokens"] / seconds
    summary: dict[str, Any] = {
        "tokens_per_s": round(tokens_per_s, 2),
        "samples_per_s": round(trained["samples"] / seconds, 3),
        "train_step_seconds": round(trained["seconds"], 2),
        "peak_memory_bytes_per_rank": context.all_gather_object(peak_memory_bytes(context.device)),
    }
    if meter is not None and trained["samples"]:
        seq_len = trained["tokens"] / trained["samples"]
        summary |= {
            "mfu": round(meter.mfu(tokens_per_s, seq_len), 5),
            "model_flops_per_token": meter.flops_per_token(seq_len),
            "peak_flops_per_rank": meter.peak_flops_per_rank,
            "peak_source": meter.peak_source,
        }
    return summary


def finish(
    job: Job,
    engine: Engine,
    checkpoints: CheckpointManager,
    state: RunState,
    evaluated: dict[int, dict[str, Any]],
    train_seconds: float,
    metrics_log: MetricsLogger,
    progress: Progress,
    context: RuntimeContext,
    parameters: dict[str, Any] | None = None,
    steps_per_epoch: int = 1,
    throughput: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Reload the best checkpoint, score validation and test, export, and write ``results.json``."""
    config, task, data = job.config, job.task, job.data
    best = checkpoints.best
    if best is not None and state.best_step != state.step:
        log.info("loading the best checkpoint %s", best)
        checkpoints.load(engine, best)
    results: dict[str, Any] = {
        "task": task.name,
        "steps": state.step,
        "epochs": round(state.step / steps_per_epoch, 3),
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "train_seconds": round(train_seconds, 2),
        "tokens_seen": state.tokens_seen,
        "world_size": context.world_size,
        "parameters": parameters,
        "throughput": throughput,
    }
    for split, key in (("validation", "dev"), ("test", "test")):
        if split == "validation" and state.best_step in evaluated:
            results[key] = evaluated[state.best_step]
        elif split in data.splits:
            metrics = evaluate(
                engine,
                task,
                data.splits[split].read(),
                job.labels,
                context,
                batch_size=config.eval.batch_size,
                progress=progress,
                desc=split,
            )
            results[key] = metrics
            metrics_log.log(
                "final",
                state.step,
                split=split,
                **{k: v for k, v in metrics.items() if not isinstance(v, dict)},
            )
    export_dir = job.run_dir / "export"
    engine.export(export_dir)
    if context.is_main:
        job.tokenizer.save_pretrained(export_dir)
        write_export_extras(engine.module, export_dir)
        gazetteer.copy_into_export(getattr(job.config.data, "gazetteer", None), export_dir)
        results["export"] = context.durable_location(job.run_dir, "export")
        (job.run_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    if context.is_main and config.track.report:
        write_run_report(job.run_dir)
    metrics_log.log_artifacts(export_dir, job.run_dir / "report")  # MLflow keeps them; a no-op otherwise
    metrics_log.close()
    context.persist(job.run_dir, final=True)
    context.barrier()  # no rank tears its process group down while rank 0 still writes the outputs
    context.report({"step": state.step, "done": True})
    return results


def results_summary(results: dict[str, Any], run_dir: Path, format_report) -> str:
    """The closing text a user reads: the report of the test (else dev) split and where things are."""
    split = "test" if "test" in results else "dev" if "dev" in results else None
    lines = []
    if split:
        lines += [f"\n{split} set:", format_report(results[split])]
    lines += [
        f"\nrun directory: {run_dir}",
        f"exported model: {results.get('export', Path(run_dir) / 'export')}",
    ]
    return "\n".join(lines)
