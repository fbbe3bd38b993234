"""Peak host memory of building a model for ZeRO-3: partitioned (``zero.Init``) vs whole on every rank.

``run(spec, workdir)`` launches, per round and in ABBA order, ``torchrun --nproc_per_node W`` of this file's
worker in both variants and tabulates per rank: the share of parameter elements the rank holds right
after construction and the growth of its peak RSS while the model was built and loaded
(``ru_maxrss`` after minus RSS before; DeepSpeed, torch and transformers are imported before the
baseline). ``unpartitioned`` builds outside the engine's construction context: the whole model on every
rank, the path ``deepspeed.initialize`` partitions only afterwards.

Worker: ``torchrun --nproc_per_node 2 benchmarks/zero3_load.py MODEL OUT_DIR [--unpartitioned] [--lora]``
writes ``OUT_DIR/rank-R.json``. With ``--lora`` the model also gets LoRA adapters, is prepared by the
DeepSpeed engine and exported while every ``deepspeed.zero.GatheredParameters`` call is counted (trainable
vs frozen parameters): the test of the adapter export runs this worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

MiB = 1024**2
VARIANTS = ("partitioned", "unpartitioned")


# --------------------------------------------------------------------------- worker (one rank)
def anon_bytes() -> int:
    """Anonymous resident memory (``RssAnon``): what this rank holds itself, page cache excluded."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Samples ``RssAnon`` every few milliseconds in a thread; ``read`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import threading

        self.peak, self._stop = anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, anon_bytes())

    def read(self) -> int:
        self.peak = max(self.peak, anon_bytes())
        return self.peak

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.read()


def held_elements(model: Any) -> tuple[int, int]:
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


def count_gathers(deepspeed_module: Any, record: dict[str, int]) -> None:
    """Wrap ``deepspeed.zero.GatheredParameters`` so every gathered parameter is counted."""
    original = deepspeed_module.zero.GatheredParameters

    def counting(params: Any, *args: Any, **kwargs: Any) -> Any:
        for param in params if isinstance(params, list | tuple) else [params]:
            key = "trainable" if param.requires_grad else "frozen"
            record[key] = record.get(key, 0) + 1
        return original(params, *args, **kwargs)

    deepspeed_module.zero.GatheredParameters = counting


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--unpartitioned", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="train.mixed_precision=bf16 (16-bit module)")
    args = parser.parse_args(argv)

    import deepspeed  # imported before the baseline: its own memory is not the model's

    from distributed_ft.config.load import validate
    from distributed_ft.engine import build_engine
    from distributed_ft.modeling.build import build_model, model_hidden_size
    from distributed_ft.modeling.peft import apply_peft
    from distributed_ft.runtime.context import create_context
    from distributed_ft.train.measure import peak_rss_bytes, rss_bytes

    context = create_context(use_gpu=False)
    config = validate(
        {
            "task": "causal_lm",
            "model": {"name": args.model},
            "run": {"engine": "deepspeed", "use_gpu": False},
            "deepspeed": {"zero_stage": 3},
            "peft": {"method": "lora" if args.lora else "none", "target_modules": ["q_proj", "v_proj"]},
            "train": {"mixed_precision": "bf16" if args.bf16 else "no"},
        }
    )
    engine = build_engine(config, context)
    hidden = model_hidden_size(config.model)
    context.barrier()
    before, anon_before, sampler = rss_bytes(), anon_bytes(), AnonPeak()
    if args.unpartitioned:
        model = build_model("causal_lm", config.model)
    else:
        with engine.model_construction(hidden):
            model = build_model("causal_lm", config.model)
    peak, anon_construction = peak_rss_bytes(), sampler.read()
    held, total = held_elements(model)
    if args.lora:
        model = apply_peft(model, config)
    engine.prepare(model, total_steps=1)  # both variants end partitioned here
    settled = anon_bytes()
    record: dict[str, Any] = {
        "rank": context.rank,
        "world_size": context.world_size,
        "held_elements": held,
        "total_elements": total,
        "rss_before_bytes": before,
        "peak_rss_after_construction_bytes": peak,
        "anon_before_bytes": anon_before,
        "peak_anon_construction_bytes": anon_construction,
        "peak_anon_through_prepare_bytes": sampler.close(),
        "anon_after_prepare_bytes": settled,
    }
    if args.lora:
        gathered: dict[str, int] = {}
        count_gathers(deepspeed, gathered)
        engine.export(args.out / "export")
        record["gathered"] = gathered
        record["trainable_parameters"] = sum(1 for p in engine.module.parameters() if p.requires_grad)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{context.rank}.json").write_text(json.dumps(record, indent=2))
    return 0


# --------------------------------------------------------------------------- experiment (driver)
def launch(
    model: str, out: Path, workers: int, unpartitioned: bool, bf16: bool, timeout_s: int
) -> list[dict]:
    """One torchrun of the worker; the ranks' records."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", str(workers), __file__, model, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        command + (["--unpartitioned"] if unpartitioned else []) + (["--bf16"] if bf16 else []),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    if done.returncode:
        raise RuntimeError(f"zero3_load worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(workers)]


def _growth_mib(rank: dict[str, Any], key: str, base: str) -> float:
    return (rank[key] - rank[base]) / MiB


def run(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from benchmarks.common import interleaved, paired_ratios
    from distributed_ft.testing import make_tiny_llama

    params = spec["params"]
    model = spec["job"]["overrides"].get("model.name", "builtin:smollm2-135m")
    if model == "bench:tiny-llama":
        model = str(make_tiny_llama(workdir / "tiny-llama"))
    workers, rounds = int(params.get("workers", 2)), int(params.get("rounds", 2))
    precisions = list(params.get("precisions", ["fp32", "bf16"]))
    variants = [f"{v} {p}" for p in precisions for v in VARIANTS]
    records: list[dict[str, Any]] = []
    rows = []
    for repeat, variant in interleaved(variants, rounds):
        kind, precision = variant.split()
        out = workdir / f"{kind}-{precision}-{repeat}"
        timeout = int(params.get("timeout_s", 900))
        ranks = launch(model, out, workers, kind == "unpartitioned", precision == "bf16", timeout)
        for r in ranks:
            rows.append(
                [
                    variant,
                    repeat,
                    r["rank"],
                    f"{r['held_elements'] / r['total_elements']:.3f}",
                    round(_growth_mib(r, "peak_anon_construction_bytes", "anon_before_bytes")),
                    round(_growth_mib(r, "peak_anon_through_prepare_bytes", "anon_before_bytes")),
                    round(_growth_mib(r, "anon_after_prepare_bytes", "anon_before_bytes")),
                    round(_growth_mib(r, "peak_rss_after_construction_bytes", "rss_before_bytes")),
                ]
            )
        records.append(
            {
                "repeat": repeat,
                "variant": variant,
                "model_fp32_mib": ranks[0]["total_elements"] * 4 / MiB,
                **{
                    f"{key}_mib": max(_growth_mib(r, f"{key}_bytes", "anon_before_bytes") for r in ranks)
                    for key in ("peak_anon_construction", "peak_anon_through_prepare")
                },
            }
        )
    ratios = []
    for precision in precisions:
        for metric in ("peak_anon_construction_mib", "peak_anon_through_prepare_mib"):
            ratio = paired_ratios(records, metric, f"partitioned {precision}", f"unpartitioned {precision}")
            ratio["note"] = "largest rank; goal <= 0.6"
            ratios.append(ratio)
    medians = {
        v: statistics.median(r["peak_anon_through_prepare_mib"] for r in records if r["variant"] == v)
        for v in variants
    }
    caption = (
        "Growth over the rank's memory before construction (DeepSpeed, torch and transformers already "
        "imported). Anonymous memory (RssAnon, sampled every 5 ms) is what a rank holds itself; memory-"
        "mapped weight files are page cache, shared by the ranks of a node. 'Through prepare' ends when "
        "deepspeed.initialize has partitioned the model (both variants end in the same state; it includes "
        "the fp32 master partition). Median peak through prepare, largest rank: "
        + ", ".join(f"{v} {m:.0f} MiB" for v, m in medians.items())
        + f"; the model is {records[0]['model_fp32_mib']:.0f} MiB in fp32 ({workers} processes, CPU)."
    )
    columns = [
        "variant",
        "repeat",
        "rank",
        "share held after construction",
        "peak anon MiB: construction",
        "peak anon MiB: through prepare",
        "anon MiB after prepare",
        "peak RSS growth MiB: construction",
    ]
    return {
        "model": model,
        "workers": workers,
        "records": records,
        "ratios": ratios,
        "tables": [
            {"title": "Model construction per rank", "columns": columns, "rows": rows, "caption": caption}
        ],
    }


if __name__ == "__main__":
    raise SystemExit(worker(sys.argv[1:]))
