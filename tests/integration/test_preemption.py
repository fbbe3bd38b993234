"""SIGTERM (spot pre-emption) writes a checkpoint and stops; the very same command resumes from it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _train_steps(metrics: Path) -> list[int]:
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [event["step"] for event in events if event["event"] == "train"]


def _run_until_steps(args: list[str], cwd: Path, metrics_glob: str, steps: int) -> tuple[str, Path]:
    """Start ``args``, SIGTERM it once its metrics hold ``steps`` more train steps; its output and metrics."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    before = {p: len(_train_steps(p)) for p in cwd.glob(metrics_glob)}
    job = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 240
    while True:
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-2000:]
        grown = [p for p in cwd.glob(metrics_glob) if len(_train_steps(p)) >= before.get(p, 0) + steps]
        if grown:
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 143, out[-2000:]
    return out, grown[0]


def test_sigterm_checkpoints_and_the_same_command_resumes_the_run(tiny_job, tmp_path):
    """Without run.output_dir: the rerun picks up the unfinished run under runs/ instead of a new one."""
    overrides = [o for o in tiny_job if not o.startswith("run.output_dir=")]
    args = [sys.executable, "-m", "distributed_ft", "-q", "train", "ner-conll2003", *overrides]
    args += ["train.epochs=200", "train.eval_each_epoch=false", "train.batch_size=4"]
    out, metrics = _run_until_steps(args, tmp_path, "runs/*/metrics.jsonl", 5)
    assert "run the same command again to resume" in out
    assert "resume with: dft -q train ner-conll2003 model.name=" in out
    run_dir = metrics.parent
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert stopped_at >= 5
    _run_until_steps(args, tmp_path, "runs/*/metrics.jsonl", 3)  # the same command again
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]
    steps = _train_steps(metrics)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= stopped_at + 3  # none retrained


def test_run_resume_never_starts_a_new_run_beside_an_unfinished_one(tiny_job, tmp_path):
    overrides = [o for o in tiny_job if not o.startswith("run.output_dir=")]
    args = [sys.executable, "-m", "distributed_ft", "-q", "train", "ner-conll2003", *overrides]
    args += ["train.epochs=200", "train.eval_each_epoch=false", "train.batch_size=4"]
    _run_until_steps(args, tmp_path, "runs/*/metrics.jsonl", 3)
    time.sleep(1.1)  # a new run directory is named by the second it starts
    _run_until_steps([*args, "run.resume=never"], tmp_path, "runs/*/metrics.jsonl", 1)
    assert len(list((tmp_path / "runs").iterdir())) == 2
