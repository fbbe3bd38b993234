"""The library on one (or more) CUDA GPUs: every launcher, engine and command that has a GPU path.

Each test runs ``dft`` as ``python -m distributed_ft -q ...`` in a subprocess (or under ``torchrun``),
like the multi-process tests, and checks the run-directory contract: ``results.json`` with test metrics,
``metrics.jsonl`` training events (``step``, ``loss``) whose loss falls, and an ``export/`` that plain
transformers loads. Models: the tiny BERT and CoNLL corpus of ``tests/conftest.py`` for the NER jobs;
MiniLM-L6 and SmolLM2-135M (offline packages where installed, else random models of their shapes, see
``conftest.py``) for the memory plan and LoRA. Skipped as a whole without CUDA; DeepSpeed and Ray tests
are skipped when those packages are not installed. Meant to finish in well under 4 minutes on one H200.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "scripts"))
import mp_helpers

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
GPU_BF16 = ("run.use_gpu=true", "train.mixed_precision=bf16")
DEVICE_LOG = re.compile(r"cuda:0|device[=: ]+cuda\b")
"""How a log line names the first CUDA device (``cuda:0``, ``device=cuda``, ``device cuda``)."""
MiB = 1024**2


# --------------------------------------------------------------------------- helpers
def _env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.setdefault("OMP_NUM_THREADS", "4")
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(command: list[str], env: dict[str, str | None] | None = None, timeout: int = TIMEOUT_S):
    """Run ``command`` from the repository root; output captured, ``.seconds`` attached."""
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout, check=False
    )
    done.seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return done


def dft(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """``python -m distributed_ft -q ARGS``."""
    return run([sys.executable, "-m", "distributed_ft", "-q", *args], env)


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m distributed_ft -q ARGS`` (NCCL for N > 1)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return run([*launcher, "-m", "distributed_ft", "-q", *args])


def describe(done: subprocess.CompletedProcess) -> str:
    """The tail of a launch's output, for assertion messages."""
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"


def train_losses(run_dir: Path) -> list[float]:
    """Losses of the ``train`` events of ``metrics.jsonl`` in step order (the last record of a step wins)."""
    by_step: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "train":
            by_step[int(record["step"])] = float(record["loss"])
    return [by_step[step] for step in sorted(by_step)]


def assert_loss_falls(run_dir: Path, factor: float = 0.9) -> list[float]:
    """The per-step losses, after checking that the mean of the last 3 is below ``factor`` x the first 3."""
    losses = train_losses(run_dir)
    assert len(losses) >= 6, losses
    assert sum(losses[-3:]) < factor * sum(losses[:3]), f"loss did not fall: {losses}"
    return losses


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def ner_job(bert: Path, conll: dict[str, Path], root: Path, *extra: str) -> list[str]:
    """Overrides for a short NER job on the tiny BERT and corpus (30 steps, 2 epochs, evaluated each)."""
    return mp_helpers.job_overrides(bert, conll, root, "train.max_steps=30", *extra)


def assert_ner_run(done: subprocess.CompletedProcess, run_dir: Path, world_size: int = 1) -> dict[str, Any]:
    """The NER run contract: exit 0, results with a test F1, falling loss, a loadable export."""
    assert done.returncode == 0, describe(done)
    assert (run_dir / "results.json").is_file(), describe(done)
    assert_loss_falls(run_dir)
    res = results(run_dir)
    assert res["world_size"] == world_size
    f1 = res["test"]["f1"]
    assert isinstance(f1, float) and 0.0 <= f1 <= 1.0, res["test"]
    assert (run_dir / "export" / "config.json").is_file()
    return res


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


# --------------------------------------------------------------------------- local, one GPU
@pytest.fixture(scope="module")
def local_run(tiny_bert, tiny_conll, tmp_path_factory):
    """One local 1-GPU bf16 NER training (train + evaluation + export); its run dir and the launch."""
    root = tmp_path_factory.mktemp("gpu-local")
    done = dft("train", *ner_job(tiny_bert, tiny_conll, root, *GPU_BF16))
    return root / "run", done


def test_local_bf16_ner_trains_and_evaluates(local_run, notes):
    run_dir, done = local_run
    res = assert_ner_run(done, run_dir)
    losses = train_losses(run_dir)
    notes(
        f"local bf16 NER: {res['steps']} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"test F1 {res['test']['f1']:.3f}, {done.seconds:.1f} s"
    )


def test_local_run_says_it_used_cuda_0(local_run):
    _, done = local_run
    assert done.returncode == 0, describe(done)
    output = done.stdout + done.stderr
    assert DEVICE_LOG.search(output), (
        "the training log does not name the device it ran on (expected 'cuda:0' or 'device=cuda'):\n"
        + output[-3000:]
    )


def test_predict_and_export_on_gpu(local_run, tiny_conll, tmp_path):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    run_dir, done = local_run
    assert done.returncode == 0, describe(done)
    predicted = tmp_path / "pred.conll"
    args = ["--input", str(tiny_conll["test"]), "--format", "conll", "--output", str(predicted)]
    launch = dft("predict", str(run_dir), *args, "run.use_gpu=true")
    assert launch.returncode == 0, describe(launch)
    sentences = [block for block in predicted.read_text().split("\n\n") if block.strip()]
    rows = [line.split() for block in sentences for line in block.splitlines()]
    labels = set(json.loads((run_dir / "export" / "config.json").read_text())["label2id"])
    assert all(len(row) == 3 and row[2] in labels for row in rows), rows[:5]
    assert len(sentences) == results(run_dir)["test"]["sentences"]

    out = tmp_path / "exported"
    launch = dft("export", str(run_dir), "--out", str(out))  # `dft export` takes no key=value overrides
    assert launch.returncode == 0, describe(launch)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model = AutoModelForTokenClassification.from_pretrained(str(out)).to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    inputs = tokenizer("john smith visited paris with nato", return_tensors="pt").to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    assert {model.config.id2label[int(i)] for i in logits.argmax(-1)[0]} <= labels


# --------------------------------------------------------------------------- torchrun (NCCL)
@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_nccl_ner(nproc, tiny_bert, tiny_conll, tmp_path, notes):
    count = _cuda_device_count()
    if count < nproc:
        pytest.skip(f"torchrun --nproc_per_node {nproc} needs {nproc} CUDA devices; this machine has {count}")
    job = ner_job(tiny_bert, tiny_conll, tmp_path, *GPU_BF16, f"run.num_workers={nproc}")
    done = torchrun(nproc, "train", *job)
    res = assert_ner_run(done, tmp_path / "run", world_size=nproc)
    notes(f"torchrun x{nproc} bf16 NER: test F1 {res['test']['f1']:.3f}, {done.seconds:.1f} s")


# --------------------------------------------------------------------------- DeepSpeed ZeRO
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_bf16_one_gpu(stage, tiny_bert, tiny_conll, tmp_path, notes):
    if _missing("deepspeed"):
        pytest.skip("deepspeed is not installed: the DeepSpeed GPU tests have not run")
    extra = (*GPU_BF16, "run.engine=deepspeed", f"deepspeed.zero_stage={stage}")
    done = dft("train", *ner_job(tiny_bert, tiny_conll, tmp_path, *extra))
    res = assert_ner_run(done, tmp_path / "run")
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    notes(f"DeepSpeed ZeRO-{stage} bf16 NER: test F1 {res['test']['f1']:.3f}, {done.seconds:.1f} s")


# --------------------------------------------------------------------------- LoRA on SmolLM2-135M
def test_lora_bf16_smollm2_instruction_tuning(smollm2_model, tmp_path, notes):
    overrides = [
        f"model.name={smollm2_model}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run.output_dir={tmp_path / 'run'}",
        *GPU_BF16,
        "data.max_length=256",
        "data.generate_samples=0",
        "data.max_eval_samples=null",
        "train.max_steps=24",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.warmup_ratio=0.0",
        "train.log_every=1",
        "train.eval_each_epoch=false",
        "eval.batch_size=16",
    ]
    done = dft("train", "instruction-tuning-lora", *overrides)
    run_dir = tmp_path / "run"
    assert done.returncode == 0, describe(done)
    losses = assert_loss_falls(run_dir, factor=1.0)
    res = results(run_dir)
    for split in ("dev", "test"):
        assert res[split]["perplexity"] > 0 and res[split]["tokens"] > 0, res[split]
    assert (run_dir / "export" / "adapter_config.json").is_file()
    trainable = (res.get("parameters") or {}).get("trainable")
    notes(
        f"LoRA bf16 SmolLM2-135M: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"test perplexity {res['test']['perplexity']:.1f}, {trainable} trainable, {done.seconds:.1f} s"
    )


# --------------------------------------------------------------------------- Ray Train
def test_ray_train_one_gpu_worker(tiny_bert, tiny_conll, tmp_path, notes):
    if _missing("ray"):
        pytest.skip("ray is not installed (its wheel is too big to carry): the Ray GPU test has not run")
    extra = (*GPU_BF16, "run.backend=ray", "run.num_workers=1", "train.save_every=10")
    env = {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": None}
    done = dft("train", *ner_job(tiny_bert, tiny_conll, tmp_path, *extra), env=env)
    res = assert_ner_run(done, tmp_path / "run")
    assert re.search(r"workers: \d+ x GPU", done.stdout + done.stderr), "Ray did not give its worker a GPU"
    notes(f"Ray Train 1 GPU worker: test F1 {res['test']['f1']:.3f}, {done.seconds:.1f} s")


# --------------------------------------------------------------------------- dft plan --validate
PLAN_WRAPPER = """
import json, sys, torch
from distributed_ft.cli import main
code = main(sys.argv[1:])
peak = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
print("\\nGPU_PEAK " + json.dumps({"exit": code, **peak}))
"""
"""``dft plan ...`` in-process, then this process's CUDA peaks (``validate_plan`` resets them first)."""


def test_plan_validate_peak_memory_within_10_percent(minilm_model, tiny_conll, tmp_path, notes):
    from distributed_ft.planning.throughput import device_spec

    overrides = [
        f"model.name={minilm_model}",
        *[f"data.{split}={path}" for split, path in tiny_conll.items()],
        *GPU_BF16,
        "train.batch_size=64",
        "data.max_length=256",
        "cluster.gpu_type=H200",
        "cluster.gpu_memory_gb=141",
    ]
    command = [sys.executable, "-c", PLAN_WRAPPER, "-q", "plan", "ner-conll2003", "--validate", "--json"]
    done = run([*command, *overrides, "--validate-steps", "4"])
    assert done.returncode == 0, describe(done)
    printed, marker, peak_line = done.stdout.rpartition("GPU_PEAK ")
    assert marker, describe(done)
    peak = json.loads(peak_line.strip())
    assert peak["exit"] == 0, describe(done)
    report, _ = json.JSONDecoder().raw_decode(printed[printed.index("{") :])
    assert report["setup"]["device"] == "cuda", report["setup"]

    per_gpu = report["plan"]["memory"]["per_gpu"]
    context = device_spec("H200").context_bytes  # CUDA context + workspaces: outside the allocator
    predicted = per_gpu["total"] - context
    measured = peak["allocated"]
    ratio = predicted / measured
    reserved = report["ranks"][0]["device_peak_reserved"]
    notes(
        f"plan --validate (MiniLM-L6, batch 64 x 256, bf16): predicted peak {predicted / MiB:,.0f} MiB "
        f"(plan total {per_gpu['total'] / MiB:,.0f} MiB less {context / MiB:,.0f} MiB context) vs "
        f"torch.cuda.max_memory_allocated {measured / MiB:,.0f} MiB: ratio {ratio:.3f}; "
        f"max_memory_reserved {reserved / MiB:,.0f} MiB; components {report['errors']}"
    )
    print(f"planner / measured peak per GPU: {ratio:.3f}")
    assert abs(ratio - 1) <= 0.10, f"predicted {predicted / MiB:.0f} MiB vs measured {measured / MiB:.0f} MiB"
