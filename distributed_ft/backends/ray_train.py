"""Ray Train backend: the same loop on Ray Train workers, data through Ray's object store, fault tolerance.

The only module that imports ``ray``. The driver (``dft train ... run.backend=ray``) prepares the data once,
puts the prepared Parquet shards in Ray's object store (``ray.put`` from the driver: no task has to run on
the head node, which a cluster usually starts with ``--num-cpus=0``) and starts a ``TorchTrainer`` whose
workers run :func:`train_worker`: a :class:`RayContext` around the library's own loop.

Data: each worker fetches only the shards its share of the epoch touches (``ray.get`` of those objects; no
shared filesystem needed), following the library's deterministic per-rank plan
(:mod:`distributed_ft.data.shards`), and holds about two windows of rows at a time. Ray Data's
``streaming_split`` / ``get_dataset_shard`` assign blocks to workers dynamically, so a restarted worker could
not find its place in the epoch again (ray #37633, #46814); the deterministic plan makes the restored data
position exact. Evaluation splits are still fetched whole by every worker.

Storage: a worker's run directory is node-local scratch (``$TMPDIR/dft-runs/...``, removed when the run
ends). Checkpoints reach ``run.storage_path`` through ``ray.train.report``; rank 0 uploads ``config.yaml``,
``labels.json`` and ``metrics.jsonl`` with each checkpoint and, at the end, ``results.json`` and
``export/`` (:mod:`distributed_ft.runtime.storage`). The driver reads the results from storage and keeps a
local copy in ``run.output_dir``; nothing assumes that the driver and rank 0 share a disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from distributed_ft.config.load import validate
from distributed_ft.config.schema import JobConfig
from distributed_ft.data.prepare import PreparedDataset, PreparedSplit
from distributed_ft.data.shards import ShardReader, TableShards
from distributed_ft.errors import ConfigError, LaunchError
from distributed_ft.runtime import storage, watchdog
from distributed_ft.runtime.context import GPU_BACKEND, ProcessGroupContext, set_intra_op_threads
from distributed_ft.train.checkpoint import needed_files

log = logging.getLogger("distributed_ft")


class RayContext(ProcessGroupContext):
    """A Ray Train worker: rank and device from Ray, process group set up by ``TorchTrainer``."""

    checkpoints_are_durable = False  # the run directory is scratch: resume only from Ray's checkpoints

    def __init__(self, outputs: str, scratch: Path) -> None:
        """``outputs``: where rank 0 persists the run's files; ``scratch``: this node's run directory."""
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        super().__init__(
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            local_rank=context.get_local_rank(),
            device=ray.train.torch.get_device(),
        )
        self.outputs, self.scratch = outputs, scratch
        self._restored: Path | None = None

    def persist(self, run_dir: Path, final: bool = False) -> None:
        """Rank 0 uploads the run's files (and at the end ``export/``) to ``run.storage_path``."""
        if self.is_main:
            storage.persist_run(run_dir, self.outputs, final)

    def durable_location(self, run_dir: Path, name: str) -> str:
        return storage.join(self.outputs, name)

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, files: list[Path] | None = None
    ) -> None:
        """Report metrics, and upload this rank's ``files`` of a checkpoint to ``run.storage_path``.

        Ray merges what every rank reports for one step into one checkpoint directory in storage; each
        rank hands over only the files it wrote (hard links in a directory of its own), so each file is
        uploaded once, whether or not the ranks share a disk.
        """
        import ray.train

        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}
        if checkpoint_dir is None:
            ray.train.report(numbers)
            return
        own = checkpoint_dir.parent / f".report-{checkpoint_dir.name}-rank{self.rank}"
        shutil.rmtree(own, ignore_errors=True)
        for relative in files or ():  # the files this rank wrote (CheckpointManager's owned_files)
            (own / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(checkpoint_dir / relative, own / relative)
        own.mkdir(parents=True, exist_ok=True)
        try:
            checkpoint = ray.train.Checkpoint.from_directory(str(own))
            ray.train.report(
                numbers,
                checkpoint=checkpoint,
                checkpoint_dir_name=checkpoint_dir.name,
                checkpoint_upload_fn=None if storage.is_uri(self.outputs) else self._link_into_storage,
            )
        finally:
            shutil.rmtree(own, ignore_errors=True)

    def _link_into_storage(self, checkpoint: Any, dir_name: str) -> Any:
        """Ray's upload of a checkpoint to a local (or NFS) ``run.storage_path``: hard links, not a copy.

        The default storage of a single-node run is on the disk the checkpoint was written to, where
        Ray's own upload copies every byte (seconds per GB, in the training step); files on another
        filesystem are copied.
        """
        import ray.train

        destination = storage.local_path(storage.join(self.outputs, dir_name))
        copied = storage.link_tree(Path(checkpoint.path), destination)
        if copied:
            log.debug("checkpoint %s: %d bytes copied (storage on another filesystem)", dir_name, copied)
        return ray.train.Checkpoint.from_directory(str(destination))

    def resume_checkpoint(self) -> Path | None:
        """The latest checkpoint Ray holds for this run (after a worker failure or a re-submission)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if self._restored is None:  # inside the node's scratch directory: removed with it
            local = Path(tempfile.mkdtemp(prefix=f"restore-rank{self.rank}-", dir=self.scratch))
            self._restored = local / Path(checkpoint.path).name
            fetch_checkpoint(checkpoint.filesystem, checkpoint.path, self._restored, self.rank)
        return self._restored

    def stop_requested_locally(self) -> bool:
        """SIGTERM, or Ray announced the pre-emption of a node of this run (asked once per log window)."""
        return super().stop_requested_locally() or preemption_noticed()


def preemption_noticed() -> bool:
    """Whether Ray's pre-emption watcher has announced the reclaim of a node of this run.

    Ray fans the notice out to every worker, and the loop agrees on stopping in its own reduction, so
    this worker's copy is read where Ray keeps it. The public ``ray.train.get_preemption_info()`` is a
    barrier through Ray on every call (2-3 ms each on 2 local CPU workers, measured with Ray 2.60); it is
    the fallback where a Ray version keeps the notice elsewhere (the same on every rank).
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except (ImportError, AttributeError):
        import ray.train

        return ray.train.get_preemption_info() is not None


def fetch_checkpoint(filesystem: Any, root: str, target: Path, rank: int) -> list[str]:
    """Download the files of the checkpoint at ``root`` that ``rank`` reads (not the other ranks' shards)."""
    import pyarrow.fs as pafs

    listing = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    names = sorted(info.path[len(root) :].lstrip("/") for info in listing if info.type == pafs.FileType.File)
    wanted = needed_files(names, rank)
    for name in wanted:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            f"{root}/{name}",
            str(target / name),
            source_filesystem=filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
    return wanted


class RaySplit(PreparedSplit):
    """A prepared split delivered through Ray's object store (one object per shard) instead of files."""

    def __init__(self, name: str, stats: Any, blocks: list[Any], rows: list[int]) -> None:
        super().__init__(name, [], stats, rows)
        self.blocks = blocks

    def read(self) -> pa.Table:
        import ray

        return pa.concat_tables(ray.get(self.blocks)).sort_by("example_id")

    def shard_reader(self) -> ShardReader:
        """Fetches only the shards the rank's share touches (``ray.get`` of those objects)."""
        import ray

        return TableShards(self.rows, lambda shard: ray.get(self.blocks[shard]))


def train_worker(payload: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker: run the library's loop with a :class:`RayContext`."""
    import transformers

    from distributed_ft.runtime.tracking import setup_logging
    from distributed_ft.train.loop import train

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = validate(payload["config"])
    # the run directory is node-local scratch; what the user keeps goes to storage (RayContext.persist)
    # .../dft-runs/<run id>/<run name>: the run directory keeps the run's name (trackers, reports)
    scratch = Path(tempfile.gettempdir()) / "dft-runs" / payload["scratch_id"] / payload["run_name"]
    scratch.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": str(scratch)})})
    if _driver_logs_mlflow(config):  # a local store here would stay in scratch: the driver replays the run
        config = config.model_copy(update={"track": config.track.model_copy(update={"mlflow": False})})
    context = RayContext(payload["outputs"], scratch)
    setup_logging(context)
    # Ray sets OMP_NUM_THREADS to the CPUs the worker reserved: that is this worker's share
    log.info(set_intra_op_threads(config.run.num_threads, local_world_size=1))
    prepared = payload["prepared"]
    splits = {
        name: RaySplit(name, stats, prepared["blocks"][name], prepared["rows"][name])
        for name, stats in prepared["stats"].items()
    }
    data = PreparedDataset(
        Path(prepared["directory"]), splits, prepared["labels"], reused=True, meta=prepared["meta"]
    )
    if context.is_main:
        continue_metrics(payload["outputs"], scratch)
    train(config, context, payload["name"], data=data)
    context.barrier()  # every rank is done with its node's scratch directory
    # every rank removes it: Ray counts local ranks per IP address, which is no disk identity
    shutil.rmtree(scratch.parent, ignore_errors=True)


def continue_metrics(outputs: str, run_dir: Path) -> None:
    """A restarted rank 0 (possibly on a new node) continues the persisted ``metrics.jsonl``.

    Without this, its fresh scratch directory would start an empty file and the next upload would drop
    every record from before the restart.
    """
    local = run_dir / "metrics.jsonl"
    persisted = storage.join(outputs, "metrics.jsonl")
    if not local.exists() and storage.read_text(persisted) is not None:
        storage.download(persisted, local)


def report_hangs(outputs: str, run_dir: Path, num_workers: int, since: float) -> list[str]:
    """Log which ranks the hang watchdog ended during this run, and where each was stuck.

    The workers upload ``hangs/rank-N.txt`` to storage before they exit (their run directory is
    scratch); reports older than ``since`` (an earlier submission of the same run) are left out. Each
    report found is copied to the driver's ``run_dir/hangs/``. Returns the lines logged.
    """
    lines = []
    for rank in range(num_workers):
        location = storage.join(outputs, watchdog.report_name(rank))
        try:
            text = storage.read_text(location)
        except (OSError, ConfigError) as exc:  # never hide the run's own outcome behind this
            log.warning("hang watchdog: cannot read %s: %s", location, exc)
            continue
        if text is None:
            continue
        fields = watchdog.parse_report(text)
        try:
            written = float(fields.get("time", "0"))
        except ValueError:
            written = 0.0
        if written < since:
            continue
        local = run_dir / watchdog.report_name(rank)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
        lines.append(watchdog.describe(fields, location))
    for line in lines:
        log.warning("hang watchdog: %s", line)
    return lines


def ray_use_gpu(use_gpu: bool | str, cluster_resources: dict[str, float]) -> bool:
    """``run.use_gpu`` for Ray workers: ``auto`` takes GPUs when the cluster has some now.

    An autoscaling cluster may have no GPU node yet: set ``run.use_gpu=true`` there, and Ray waits for
    the autoscaler to add one.
    """
    if use_gpu == "auto":
        return cluster_resources.get("GPU", 0) > 0
    return bool(use_gpu)


def trainer_class(local_without_dashboard: bool) -> type:
    """``TorchTrainer``, or on a Ray this process started without a dashboard one without the cleaner.

    Ray 2.60 starts a detached ``PlacementGroupCleaner`` actor per run that asks the State API (served by
    the dashboard) every second whether the controller still lives, to remove the placement group of a
    controller that died. On the local Ray of ``run.backend=ray`` without ``RAY_ADDRESS`` there is no
    dashboard: every query fails and logs a warning, one more process starts and stops with the run, and
    the placement group goes with the local Ray anyway. There the callback is left out. On a cluster
    (``RAY_ADDRESS``, a dashboard, ``ray job submit``) Ray's default stands.
    """
    from ray.train.torch import TorchTrainer

    if not local_without_dashboard:
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray version: its defaults
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    return LocalTorchTrainer


def ray_init(num_cpus: int | None) -> bool:
    """Connect to ``RAY_ADDRESS``, or start a local Ray without a dashboard; whether this call did either.

    A Ray this process already initialised (a test's, a notebook's) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a local Ray for this process ("local" avoids a stale cluster file after `ray stop`)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def train_on_ray(config: JobConfig, name: str) -> tuple[dict[str, Any], str]:
    """Prepare the data, then train with ``run.num_workers`` Ray Train workers; returns results, run dir.

    A ``[min, max]`` range is Ray Train's elastic scaling: the worker group starts with as many workers as
    it gets (at least ``min``) and restarts from the last checkpoint with the survivors when a node is
    lost, or with more when nodes join; each start resumes on its own world size (``train/layout.py``).
    """
    import pyarrow.parquet as pq
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from distributed_ft.runtime.context import LocalContext
    from distributed_ft.runtime.tracking import setup_logging
    from distributed_ft.train.job import data_splits, load_task, resolve_run_dir

    driver = LocalContext()
    setup_logging(driver)
    run_dir = resolve_run_dir(config, name, driver).resolve()
    config = config.model_copy(update={"run": config.run.model_copy(update={"output_dir": str(run_dir)})})
    tokenizer, task = load_task(config)
    prepared = task.prepare_data(tokenizer, data_splits(config))
    log.info("data: %s (%s)", prepared.directory, "reused cache" if prepared.reused else "prepared")
    for note in prepared.meta.get("training_set", []):
        log.info("  train: %s", note)

    run = config.run
    low, high = run.worker_range
    connected = ray_init(None if os.environ.get("RAY_ADDRESS") else max(high, os.cpu_count() or 1))
    blocks: dict[str, list[Any]] = {}  # read once by the driver; each worker fetches the shards it reads
    rows: dict[str, list[int]] = {}
    for split in prepared.splits.values():
        blocks[split.name], rows[split.name] = [], []
        for shard in split.shards:
            table = pq.read_table(shard)
            blocks[split.name].append(ray.put(table))
            rows[split.name].append(table.num_rows)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and run.storage_path is None:
        raise LaunchError(
            f"this Ray cluster has {len(nodes)} nodes but run.storage_path is not set: checkpoints and "
            "results would land on disks the driver and the other nodes cannot read. Set run.storage_path "
            "to storage every node reaches: s3://BUCKET/PATH (AWS), gs://BUCKET/PATH, or a shared NFS path "
            "(KubeRay: a bucket or a ReadWriteMany volume)"
        )
    storage_path = run.storage_path or str(run_dir / "ray")
    ray_name = run.ray_run_name or run_dir.name
    outputs = storage.join(storage_path, ray_name)
    use_gpu = ray_use_gpu(run.use_gpu, ray.cluster_resources())
    kind = "GPU" if use_gpu else "CPU"
    if run.elastic:  # Ray Train's elastic scaling: starts with what it gets, restarts on the survivors
        log.info("Ray workers: %d-%d x %s (elastic; the global batch is that of %d)", low, high, kind, high)
        if run.max_failures == 0:
            log.warning("run.max_failures=0: a lost worker ends the elastic run instead of resizing it")
    else:
        log.info("Ray workers: %d x %s", high, kind)
    trainer = trainer_class(local_without_dashboard=not os.environ.get("RAY_ADDRESS"))(
        train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "name": name,
            "outputs": outputs,
            "scratch_id": f"{ray_name}-{uuid.uuid4().hex[:8]}",
            "run_name": ray_name,
            "prepared": {
                "directory": str(prepared.directory),
                "labels": prepared.labels,
                "meta": prepared.meta,  # task assets (class weights, ...): the workers never prepare
                "stats": {n: s.stats for n, s in prepared.splits.items()},
                "blocks": blocks,
                "rows": rows,
            },
        },
        scaling_config=ScalingConfig(
            num_workers=(low, high) if run.elastic else high,
            use_gpu=use_gpu,
            resources_per_worker=run.resources_per_worker,
        ),
        # GPU workers: NCCL for tensors, gloo for the pickled objects of object collectives.
        torch_config=TorchConfig(backend=GPU_BACKEND if use_gpu else "gloo"),
        run_config=RunConfig(
            name=ray_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints + 1),
        ),
    )
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; say where the logs are
        report_hangs(outputs, run_dir, high, since=started)
        raise LaunchError(f"the Ray Train run failed: {exc}\n(run directory: {run_dir})") from exc
    report_hangs(outputs, run_dir, high, since=started)
    results = storage.read_text(storage.join(outputs, "results.json"))
    if results is None:
        raise LaunchError(
            f"the Ray run finished but {storage.join(outputs, 'results.json')} is missing; the worker logs "
            f"say why (checkpoints: {result.path})"
        )
    storage.fetch_run(outputs, run_dir)  # the driver's copy (no checkpoints); storage keeps the original
    if connected:  # the Ray this call started or joined, as soon as the results are in (not at exit)
        ray.shutdown()
    log.info("run outputs: %s (local copy without checkpoints: %s)", outputs, run_dir)
    if _driver_logs_mlflow(config):
        from distributed_ft.runtime.trackers import replay_mlflow

        log.info("MLflow: run %s in %s", replay_mlflow(run_dir, config), run_dir / "mlruns")
    return json.loads(results), str(run_dir)


def _driver_logs_mlflow(config: JobConfig) -> bool:
    """``track.mlflow`` with the default local store: under Ray the driver logs the run, from its record."""
    return config.track.mlflow and config.track.mlflow_tracking_uri is None
