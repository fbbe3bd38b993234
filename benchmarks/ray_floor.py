"""Ray Train's own start-up and tail on this machine: a job whose workers do nothing.

``python -m benchmarks.ray_floor WORKERS STAMPS_DIR`` starts a local Ray runtime (as ``dft train
run.backend=ray`` does), runs a ``TorchTrainer`` of ``WORKERS`` CPU workers whose training function only
writes the time it started and ended, shuts Ray down and exits. Against the launch and exit times the caller
records, that gives the floor no Ray job can go below here:

* **start-up floor**: launch to the first worker function starting (interpreter, ``import ray``, the local
  cluster, the worker group and its torch process group);
* **tail floor**: the last worker function ending to process exit (Ray Train's teardown, ``ray.shutdown``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _worker(config: dict) -> None:
    started = time.time()
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    Path(config["stamps"], f"rank{rank}.json").write_text(
        json.dumps({"started": started, "ended": time.time()})
    )


def main() -> None:
    workers, stamps = int(sys.argv[1]), Path(sys.argv[2])
    stamps.mkdir(parents=True, exist_ok=True)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="local", num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"stamps": str(stamps)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="ray-floor", storage_path=str(stamps / "ray")),
    )
    trainer.fit()
    ray.shutdown()


def floor_times(launched: float, exited: float, stamps: Path) -> dict[str, float]:
    """``startup_s`` and ``tail_s`` of one floor run from its workers' stamp files."""
    records = [json.loads(p.read_text()) for p in sorted(stamps.glob("rank*.json"))]
    if not records:
        raise RuntimeError(f"{stamps}: no worker wrote its time stamps")
    return {
        "startup_s": min(r["started"] for r in records) - launched,
        "tail_s": exited - max(r["ended"] for r in records),
    }


if __name__ == "__main__":
    main()
