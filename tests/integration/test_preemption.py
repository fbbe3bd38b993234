"""SIGTERM (spot pre-emption) writes a checkpoint and stops; the same command resumes from it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_checkpoints_then_the_rerun_resumes(tiny_job, tmp_path):
    args = [
        sys.executable,
        "-m",
        "distributed_ft",
        "-q",
        "train",
        "ner-conll2003",
        *tiny_job,
        "train.epochs=200",
        "train.eval_each_epoch=false",
        "train.batch_size=4",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    job = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 5):
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-2000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 143, out[-2000:]
    assert "run the same command again to resume" in out
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.removeprefix("step-"))
    assert stopped_at >= 5
    resumed = subprocess.run(
        [*args, "train.max_steps=" + str(stopped_at + 3)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    steps = [
        json.loads(line)["step"]
        for line in metrics.read_text().splitlines()
        if json.loads(line)["event"] == "train"
    ]
    assert steps[-3:] == [stopped_at + 1, stopped_at + 2, stopped_at + 3]
