"""Fine-tuning techniques against the plain run of the same job: test metric, its spread, and time.

Every variant is the experiment's job plus the variant's own overrides (``train.layer_lr_decay``,
``data.augment.multiplier``, ``data.shots_per_label``, ...), trained in this process by the library's own
loop once per seed and scored on the test split. ``data.gazetteer: "{train_gazetteer}"`` is a gazetteer
built from the job's training split only (as ``dft data gazetteer`` does), so the test set stays unseen.
``hf`` (and any variant named ``hf_*``) is Hugging Face ``Trainer`` on the same prepared data and settings
(``benchmarks/loops.py``'s set-up: no evaluation during training, length-grouped batches, fused AdamW); its
overrides are ``TrainingArguments`` fields (``train_sampling_strategy: random`` gives ``run_ner.py``'s
random batches). Variants run in ABBA order over the seeds, so slow drift of a
shared machine falls on every variant alike; the table gives each variant's mean, min and max over
seeds, its difference to ``baseline`` and the time ratio.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import StepRecorder, interleaved, job_config, median, overrides_list

HF = "hf"
"""The name (or ``hf_`` prefix) of a variant that is Hugging Face ``Trainer``."""


def is_hf(variant: str) -> bool:
    """Whether ``variant`` runs Hugging Face ``Trainer`` (its overrides are ``TrainingArguments`` fields)."""
    return variant == HF or variant.startswith(f"{HF}_")


TRAIN_GAZETTEER = "{train_gazetteer}"
"""A variant's ``data.gazetteer`` value for a gazetteer built from the job's own training split."""


def train_gazetteer(spec: dict[str, Any], workdir: Path) -> Path:
    """The job's training-split mentions as a gazetteer file (``dft data gazetteer``), built once."""
    from distributed_ft.data.gazetteer import write_gazetteer
    from distributed_ft.tasks import get_task

    path = workdir / "train-gazetteer.tsv"
    if not path.is_file():
        config = job_config(spec["job"])
        write_gazetteer(get_task(config).training_gazetteer(), path, str(config.data.train))
    return path


def _variant_overrides(spec: dict[str, Any], variant: str, seed: int, workdir: Path) -> list[str]:
    overrides = dict(spec["params"]["variants"][variant] or {})
    if overrides.get("data.gazetteer") == TRAIN_GAZETTEER:
        overrides["data.gazetteer"] = str(train_gazetteer(spec, workdir))
    return [*overrides_list({"overrides": overrides}), f"train.seed={seed}"]


def run_variant(spec: dict[str, Any], variant: str, seed: int, workdir: Path) -> dict[str, Any]:
    """One training run of ``variant`` with ``seed``; its test metrics and times."""
    from distributed_ft.runtime.context import LocalContext
    from distributed_ft.train.loop import train

    run_dir = workdir / f"{variant}-seed{seed}"
    extra = [*_variant_overrides(spec, variant, seed, workdir), f"run.output_dir={run_dir}"]
    extra.append("run.resume=never")
    config = job_config(spec["job"], *extra)
    started = time.perf_counter()
    results = train(config, LocalContext(), f"quality-{variant}")
    wall = time.perf_counter() - started
    return {"test": results["test"], "train_seconds": results["train_seconds"], "wall_seconds": wall}


def run_hf_variant(spec: dict[str, Any], variant: str, seed: int, workdir: Path) -> dict[str, Any]:
    """Hugging Face ``Trainer`` on the job's prepared data with the job's settings and ``seed``."""
    from benchmarks.loops import run_hf
    from distributed_ft.runtime.context import LocalContext
    from distributed_ft.train.job import data_splits, load_task

    config = job_config(spec["job"], f"train.seed={seed}")
    context = LocalContext()
    tokenizer, task = load_task(config)
    prepared = task.prepare_data(tokenizer, data_splits(config))
    recorder = StepRecorder()
    started = time.perf_counter()
    arguments = dict(spec["params"]["variants"][variant] or {})
    out = workdir / f"{variant}-seed{seed}"
    scores = run_hf(config, context, prepared, recorder, task, tokenizer, out, arguments)
    wall = time.perf_counter() - started
    train_seconds = recorder.ends[-1] - recorder.start if recorder.ends and recorder.start else None
    return {"test": scores, "train_seconds": train_seconds, "wall_seconds": wall}


def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Every variant once per seed (ABBA over the seeds); the comparison table against ``baseline``."""
    import transformers

    transformers.logging.set_verbosity_error()
    params = spec["params"]
    variants = list(params["variants"])
    seeds = [int(s) for s in params.get("seeds", [42])]
    metric = params.get("metric", "f1")
    records, failures = [], []
    for index, variant in interleaved(variants, len(seeds)):
        seed = seeds[index]
        try:
            if is_hf(variant):
                outcome = run_hf_variant(spec, variant, seed, workdir)
            else:
                outcome = run_variant(spec, variant, seed, workdir)
        except Exception as exc:  # record and go on: the other variants still compare
            failures.append({"variant": f"{variant} (seed {seed})", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        records.append(
            {
                "variant": variant,
                "seed": seed,
                "repeat": index,
                metric: outcome["test"].get(metric),
                "train_seconds": outcome["train_seconds"],
                "wall_seconds": outcome["wall_seconds"],
            }
        )
    return summarize(records, variants, failures, params.get("baseline", variants[0]), metric, spec)


def summarize(
    records: list[dict[str, Any]],
    variants: list[str],
    failures: list[dict[str, str]],
    baseline: str,
    metric: str,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Per-variant mean / min / max of the test metric over seeds, its difference to ``baseline``, times."""

    def values(variant: str, key: str) -> list[float]:
        return [r[key] for r in records if r["variant"] == variant and r.get(key) is not None]

    base_metric, base_wall = values(baseline, metric), median(values(baseline, "wall_seconds"))
    base_train = median(values(baseline, "train_seconds"))
    rows = []
    for variant in variants:
        scores, walls = values(variant, metric), values(variant, "wall_seconds")
        if not scores:
            continue
        mean, train_s = statistics.fmean(scores), median(values(variant, "train_seconds"))
        overrides = spec["params"]["variants"][variant] or {}
        rows.append(
            [
                variant,
                ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or "-",
                len(scores),
                round(mean, 4),
                f"{min(scores):.4f}-{max(scores):.4f}",
                round(mean - statistics.fmean(base_metric), 4) if base_metric else None,
                None if train_s is None else round(train_s, 1),
                round(train_s / base_train, 2) if train_s and base_train else None,
                round(median(walls), 1),
                round(median(walls) / base_wall, 2) if base_wall else None,
            ]
        )
    return {
        "records": records,
        "failures": failures,
        "tables": [
            {
                "title": f"Test {metric} per variant (seeds {sorted({r['seed'] for r in records})})",
                "columns": [
                    "variant",
                    "overrides",
                    "runs",
                    f"test {metric} mean",
                    "min-max",
                    f"vs {baseline}",
                    "train s",
                    f"train / {baseline}",
                    "wall s",
                    f"wall / {baseline}",
                ],
                "rows": rows,
                "caption": (
                    "train s: the loop's training time (evaluations excluded); wall s: the whole run "
                    "(preparation from the cache, evaluation, test, export), medians over seeds. hf: "
                    "transformers.Trainer, no evaluation during training, scored by the same evaluation; "
                    "its train s runs from its first batch to its last optimizer step."
                ),
            }
        ],
    }
