"""The planner's per-rank model states vs the tensors two DeepSpeed ranks actually hold.

One ``torchrun --nproc_per_node 2`` launch runs this file as a worker: for ZeRO 0-3 x full fine-tuning /
LoRA (ZeRO-3 twice: DeepSpeed's default persistence threshold, under which every tensor of the tiny model
stays whole on each rank, and threshold 0, under which everything is partitioned) it calls
``distributed_ft.train.measure.validate_plan``: the library's model and ``DeepSpeedEngine``, two
optimizer steps, ``engine.state_bytes()`` before the second optimizer step. Parameters, gradients and
optimizer states must each be within 5% of the prediction on every rank. DeepSpeed's own estimator is
printed beside it (it is not held to anything: it assumes mixed precision and no PEFT).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent / "scripts"))

TOLERANCE = 0.05
LABELS = ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]
CASES = {
    f"{method} ZeRO-{stage}{suffix}": (method, stage, threshold)
    for method in ("none", "lora")
    for stage, suffix, threshold in (
        (0, "", None),
        (1, "", None),
        (2, "", None),
        (3, "", None),
        (3, " p0", 0),
    )
}
"""name -> (peft.method, ZeRO stage, stage3_param_persistence_threshold or None for DeepSpeed's default)."""


def _worker(model: str, out: Path, work: Path) -> None:
    """One rank: validate every case; rank 0 writes the reports."""
    import transformers

    from distributed_ft.config.load import load_config
    from distributed_ft.runtime.context import create_context
    from distributed_ft.train.measure import validate_plan

    transformers.logging.set_verbosity_error()
    context = create_context()
    reports = {}
    for name, (method, stage, threshold) in CASES.items():
        overrides = [
            f"model.name={model}",
            "run.engine=deepspeed",
            f"deepspeed.zero_stage={stage}",
            f"peft.method={method}",
            "data.max_length=32",
            "train.batch_size=4",
        ]
        if threshold is not None:
            ds_file = work / f"zero3-threshold{threshold}.json"
            if context.is_main:
                ds_file.write_text(
                    json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": threshold}})
                )
            context.barrier()
            overrides.append(f"deepspeed.config={ds_file}")
        config, _ = load_config("ner-conll2003", overrides)
        report = validate_plan(config, context, labels=LABELS, steps=2)
        reports[name] = report.to_json()
    if context.is_main:
        out.write_text(json.dumps(reports, default=str))
    context.barrier()


def _rank_errors(report: dict) -> list[dict[str, float]]:
    """Per rank: relative error of the planner for each model-state component."""
    errors = []
    for rank in report["ranks"]:
        errors.append(
            {
                key: (report["predicted"][key] - rank["state_bytes"][key]) / rank["state_bytes"][key]
                for key in ("parameters", "gradients", "optimizer_states")
            }
        )
    return errors


@pytest.mark.multiproc
def test_planner_model_states_match_two_deepspeed_ranks(tiny_bert, tmp_path):
    import mp_helpers

    out = tmp_path / "reports.json"
    args = ["--worker", str(tiny_bert), str(out), str(tmp_path)]
    done = mp_helpers.torchrun(args, nproc=2, script=Path(__file__), env={"PYTHONPATH": str(REPO)})
    print(f"torchrun with {len(CASES)} cases took {done.seconds:.1f} s")
    assert done.returncode == 0, mp_helpers.describe(done)
    reports = json.loads(out.read_text())
    assert set(reports) == set(CASES)

    lines = [f"{'case':<18}{'planner err (worst rank, P/G/O)':>36}{'DeepSpeed estimator err':>26}"]
    failures = []
    for name, report in reports.items():
        assert len(report["ranks"]) == 2
        errors = _rank_errors(report)
        worst = {k: max((e[k] for e in errors), key=abs) for k in errors[0]}
        ds = report["reference_error"]
        lines.append(
            f"{name:<18}{' / '.join(f'{v:+.2%}' for v in worst.values()):>36}"
            f"{'n/a (no estimator)' if ds is None else f'{ds:+.1%}':>26}"
        )
        failures += [f"{name} {k}: {v:+.2%}" for k, v in worst.items() if abs(v) > TOLERANCE]
    print("\n".join(lines))
    assert not failures, "planner off by more than 5%: " + "; ".join(failures)

    # the cases really differ: ZeRO shards optimizer states, then gradients, then parameters (ZeRO-1 also
    # holds only its gradient partition once the backward pass has reduced them, where they are measured)
    states = {name: r["ranks"][0]["state_bytes"] for name, r in reports.items()}
    assert states["none ZeRO-1"]["optimizer_states"] < states["none ZeRO-0"]["optimizer_states"]
    assert states["none ZeRO-2"]["gradients"] < states["none ZeRO-0"]["gradients"]
    assert states["none ZeRO-3 p0"]["parameters"] < states["none ZeRO-2"]["parameters"]
    assert states["lora ZeRO-0"]["optimizer_states"] < states["none ZeRO-0"]["optimizer_states"] / 10


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
