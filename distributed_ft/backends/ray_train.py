"""Ray Train backend: the same loop on Ray Train workers, data through Ray Data, fault tolerance.

The only module that imports ``ray``. The driver (``dft train ... run.backend=ray``) prepares the data once,
reads the prepared Parquet shards with ``ray.data.read_parquet`` and starts a ``TorchTrainer`` whose workers
run :func:`train_worker`: a :class:`RayContext` around the library's own loop.

Data: the driver reads the prepared shards with Ray Data and puts the Arrow blocks in the object store;
every worker fetches them (no shared filesystem needed) and takes its disjoint batches with the library's
deterministic per-rank batch plan. Ray Data's ``streaming_split`` / ``get_dataset_shard`` assign blocks to
workers dynamically, so a restarted worker could not find its place in the epoch again (ray #37633,
#46814); the deterministic plan makes the restored data position exact. (Running Ray Data's executor inside
the workers also starved for CPU on small nodes where the workers reserve every CPU.) The cost: each worker
holds the whole tokenized split in memory, fine for fine-tuning corpora up to a few GB.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from distributed_ft.config.load import validate
from distributed_ft.config.schema import JobConfig
from distributed_ft.data.prepare import PreparedDataset, PreparedSplit
from distributed_ft.errors import LaunchError
from distributed_ft.runtime.context import GPU_BACKEND, ProcessGroupContext, set_intra_op_threads

log = logging.getLogger("distributed_ft")


class RayContext(ProcessGroupContext):
    """A Ray Train worker: rank and device from Ray, process group set up by ``TorchTrainer``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        super().__init__(
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            local_rank=context.get_local_rank(),
            device=ray.train.torch.get_device(),
        )
        self._restored: Path | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Report metrics; a checkpoint directory is uploaded to ``run.storage_path`` (shards merged)."""
        import ray.train

        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        name = checkpoint_dir.name if checkpoint_dir else None
        ray.train.report(numbers, checkpoint=checkpoint, checkpoint_dir_name=name)

    def resume_checkpoint(self) -> Path | None:
        """The latest checkpoint Ray holds for this run (after a worker failure or a re-submission)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if self._restored is None:
            local = Path(tempfile.mkdtemp(prefix="dft-restore-")) / Path(checkpoint.path).name
            checkpoint.to_directory(str(local))
            self._restored = local
        return self._restored

    def stop_requested_locally(self) -> bool:
        """SIGTERM, or Ray announced the pre-emption of a node of this run (asked once per log window)."""
        import ray.train

        preempted = ray.train.get_preemption_info() is not None  # a barrier: every rank always asks
        return super().stop_requested_locally() or preempted


class RaySplit(PreparedSplit):
    """A prepared split delivered through Ray's object store instead of read from local shards."""

    def __init__(self, name: str, stats: Any, blocks: list[Any]) -> None:
        super().__init__(name, [], stats)
        self.blocks = blocks

    def read(self) -> pa.Table:
        import ray

        return pa.concat_tables(ray.get(self.blocks)).sort_by("example_id")


def train_worker(payload: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker: run the library's loop with a :class:`RayContext`."""
    import transformers

    from distributed_ft.runtime.tracking import setup_logging
    from distributed_ft.train.loop import train

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = validate(payload["config"])
    context = RayContext()
    setup_logging(context)
    # Ray sets OMP_NUM_THREADS to the CPUs the worker reserved: that is this worker's share
    log.info(set_intra_op_threads(config.run.num_threads, local_world_size=1))
    prepared = payload["prepared"]
    splits = {
        name: RaySplit(name, stats, prepared["blocks"][name]) for name, stats in prepared["stats"].items()
    }
    data = PreparedDataset(Path(prepared["directory"]), splits, prepared["labels"], reused=True)
    train(config, context, payload["name"], data=data)


def ray_use_gpu(use_gpu: bool | str, cluster_resources: dict[str, float]) -> bool:
    """``run.use_gpu`` for Ray workers: ``auto`` takes GPUs when the cluster has some now.

    An autoscaling cluster may have no GPU node yet: set ``run.use_gpu=true`` there, and Ray waits for
    the autoscaler to add one.
    """
    if use_gpu == "auto":
        return cluster_resources.get("GPU", 0) > 0
    return bool(use_gpu)


def _ray_init(num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a local Ray for this process ("local" avoids a stale cluster file after `ray stop`)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def _parquet_paths(split: PreparedSplit) -> list[str]:
    """Shard paths Ray Data can read: ``local://`` ones are read on the driver's node (no shared FS)."""
    return [
        f"local://{p.resolve()}" if os.environ.get("RAY_ADDRESS") else str(p.resolve()) for p in split.shards
    ]


def train_on_ray(config: JobConfig, name: str) -> tuple[dict[str, Any], str]:
    """Prepare the data, then train with ``run.num_workers`` Ray Train workers; returns results, run dir."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distributed_ft.modeling.build import load_tokenizer
    from distributed_ft.runtime.context import LocalContext
    from distributed_ft.runtime.tracking import setup_logging
    from distributed_ft.tasks import get_task
    from distributed_ft.train.job import data_splits, resolve_run_dir

    driver = LocalContext()
    setup_logging(driver)
    run_dir = resolve_run_dir(config, name, driver).resolve()
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": str(run_dir)})})
    tokenizer = load_tokenizer(config.model.name, config.model.revision)
    prepared = get_task(config).prepare_data(tokenizer, data_splits(config))
    log.info("data: %s (%s)", prepared.directory, "reused cache" if prepared.reused else "prepared")

    run = config.run
    _ray_init(None if os.environ.get("RAY_ADDRESS") else max(run.num_workers, os.cpu_count() or 1))
    ray.data.DataContext.get_current().enable_progress_bars = False
    blocks = {  # read once by the driver; the workers only fetch the Arrow blocks from the object store
        split.name: ray.data.read_parquet(_parquet_paths(split)).to_arrow_refs()
        for split in prepared.splits.values()
    }
    storage = run.storage_path or str(run_dir / "ray")
    use_gpu = ray_use_gpu(run.use_gpu, ray.cluster_resources())
    log.info("Ray workers: %d x %s", run.num_workers, "GPU" if use_gpu else "CPU")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "name": name,
            "prepared": {
                "directory": str(prepared.directory),
                "labels": prepared.labels,
                "stats": {n: s.stats for n, s in prepared.splits.items()},
                "blocks": blocks,
            },
        },
        scaling_config=ScalingConfig(
            num_workers=run.num_workers, use_gpu=use_gpu, resources_per_worker=run.resources_per_worker
        ),
        # GPU workers: NCCL for tensors, gloo for the pickled objects of object collectives.
        torch_config=TorchConfig(backend=GPU_BACKEND if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run.ray_run_name or run_dir.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints + 1),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; say where the logs are
        raise LaunchError(f"the Ray Train run failed: {exc}\n(run directory: {run_dir})") from exc
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        raise LaunchError(
            f"the Ray run finished but {results_file} is missing; run.output_dir must be on storage the "
            "rank-0 worker and the driver share (or read results from the Ray checkpoint in "
            f"{result.path})"
        )
    import json

    return json.loads(results_file.read_text()), str(run_dir)
