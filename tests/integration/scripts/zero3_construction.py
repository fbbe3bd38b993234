"""Build a causal LM for ZeRO-3 and measure what each rank holds (tests and benchmarks).

Usage: ``torchrun --nproc_per_node 2 zero3_construction.py MODEL OUT_DIR [--unpartitioned] [--lora]``.

Each rank records, right after the model is built: parameter elements it holds (``ds_tensor`` partitions
under ZeRO-3, whole tensors otherwise), the model's total elements, and its RSS before and its peak RSS
after construction. ``--unpartitioned`` builds the model outside the engine's construction context (the
whole model on every rank, partitioned only by ``deepspeed.initialize``: the path before zero.Init).
With ``--lora`` the model gets LoRA adapters, is prepared by the DeepSpeed engine and exported while every
``deepspeed.zero.GatheredParameters`` call is counted, split into trainable and frozen parameters.
Writes ``OUT_DIR/rank-R.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

from distributed_ft.config.load import validate
from distributed_ft.engine import build_engine
from distributed_ft.modeling.build import build_model, model_hidden_size
from distributed_ft.modeling.peft import apply_peft
from distributed_ft.runtime.context import create_context


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def held_elements(model) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model), parameters de-duplicated."""
    held = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):
            held += param.ds_tensor.numel()
            total += param.ds_numel
        else:
            held += param.numel()
            total += param.numel()
    return held, total


def count_gathers(deepspeed_module, record: dict[str, int]) -> None:
    """Wrap ``deepspeed.zero.GatheredParameters`` so every gathered parameter is counted."""
    original = deepspeed_module.zero.GatheredParameters

    def counting(params, *args, **kwargs):
        for param in params if isinstance(params, list | tuple) else [params]:
            key = "trainable" if param.requires_grad else "frozen"
            record[key] = record.get(key, 0) + 1
        return original(params, *args, **kwargs)

    deepspeed_module.zero.GatheredParameters = counting


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--unpartitioned", action="store_true")
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    context = create_context(use_gpu=False)
    config = validate(
        {
            "task": "causal_lm",
            "model": {"name": args.model},
            "run": {"engine": "deepspeed", "use_gpu": False},
            "deepspeed": {"zero_stage": 3},
            "peft": {"method": "lora" if args.lora else "none", "target_modules": ["q_proj", "v_proj"]},
        }
    )
    engine = build_engine(config, context)
    hidden = model_hidden_size(config.model)
    import deepspeed  # imported before the baseline is taken: its own memory is not the model's

    del deepspeed
    context.barrier()
    before = rss_bytes()
    if args.unpartitioned:
        model = build_model("causal_lm", config.model)
    else:
        with engine.model_construction(hidden):
            model = build_model("causal_lm", config.model)
    peak = peak_rss_bytes()
    held, total = held_elements(model)
    record = {
        "rank": context.rank,
        "world_size": context.world_size,
        "held_elements": held,
        "total_elements": total,
        "rss_before_bytes": before,
        "peak_rss_after_construction_bytes": peak,
    }
    if args.lora:
        import deepspeed

        model = apply_peft(model, config)
        engine.prepare(model, total_steps=1)
        gathered: dict[str, int] = {}
        count_gathers(deepspeed, gathered)
        engine.export(args.out / "export")
        record["gathered"] = gathered
        record["trainable_parameters"] = sum(1 for p in engine.module.parameters() if p.requires_grad)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{context.rank}.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
