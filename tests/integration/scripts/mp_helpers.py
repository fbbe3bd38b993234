"""Helpers for the multi-process tests: launch ``dft`` under torchrun / accelerate / deepspeed, read runs.

Every launch gets its own free rendezvous port (other test sessions may share the machine),
``OMP_NUM_THREADS=1`` (2 processes on 2 cores) and keeps ``TORCH_EXTENSIONS_DIR`` from the environment so
DeepSpeed's one JIT-compiled op (the CPU shared-memory communication op) is compiled once and reused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
SCRIPTS = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 240


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_overrides(bert: Path, conll: dict[str, Path], root: Path, *extra: str) -> list[str]:
    """Overrides for a short NER job on the tiny BERT and corpus of ``tests/conftest.py``."""
    return [
        "ner-conll2003",
        f"model.name={bert}",
        f"data.train={conll['train']}",
        f"data.validation={conll['validation']}",
        f"data.test={conll['test']}",
        f"data.cache_dir={root / 'cache'}",
        "data.max_train_samples=null",
        "data.max_eval_samples=null",
        "data.max_length=64",
        f"run.output_dir={root / 'run'}",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.max_steps=8",
        "track.report=false",
        *extra,
    ]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run(
    command: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run ``command`` and return it with ``.seconds`` (wall time) attached; output is captured."""
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    done.seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return done


def torchrun(
    args: list[str], nproc: int = 2, script: Path | None = None, env=None
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m distributed_ft ARGS`` (or ``torchrun ... SCRIPT ARGS``)."""
    target = [str(script)] if script else ["-m", "distributed_ft", "-q"]
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *target]
    return run([*command, *args], env)


def describe(done: subprocess.CompletedProcess) -> str:
    """The tail of a launch's output, for assertion messages."""
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"


def train_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """``metrics.jsonl`` training events by step (the last record of a step wins: a resumed run)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "train":
            records[record["step"]] = record
    return records


def assert_loss_falls(run_dir: Path) -> list[float]:
    """The per-step losses of a run, after checking that they fall (first 3 steps vs last 3)."""
    losses = [r["loss"] for _, r in sorted(train_records(run_dir).items())]
    assert len(losses) >= 6, losses
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), f"loss did not fall: {losses}"
    return losses


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def load_tensors(model_dir: Path) -> dict[str, Any]:
    """The tensors of a ``save_pretrained`` directory (one safetensors file)."""
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))
