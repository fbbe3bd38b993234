"""RuntimeContext: the one seam through which the loop learns where it runs.

The loop never reads ``RANK``/``LOCAL_RANK`` itself: the device, the rank and the collectives come from
the context (Ray and DeepSpeed disagree about ``LOCAL_RANK``; DESIGN.md "Known traps").

GPU rules, held here once: the device is always indexed (``cuda:<local_rank>``, never bare ``cuda``);
every tensor collective goes through :meth:`ProcessGroupContext.all_reduce`, which refuses a tensor that is
not on ``context.device`` (NCCL has no CPU backend: a CPU tensor there dies at the first step); process
groups on GPUs are created as ``cpu:gloo,cuda:nccl`` so object collectives (pickles, on the CPU) and tensor
collectives (on the GPU) both have a backend.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from distributed_ft.errors import LaunchError
from distributed_ft.runtime import signals
from distributed_ft.runtime.watchdog import CollectiveLog

UseGpu = bool | Literal["auto"]
GPU_BACKEND = "cpu:gloo,cuda:nccl"
"""Process-group backend on GPUs: NCCL for tensors on CUDA, gloo for object collectives (CPU pickles)."""
EXIT_BARRIER_TIMEOUT = timedelta(seconds=30)
"""How long a rank leaving the job waits for its peers before it destroys its process groups anyway."""


@runtime_checkable
class RuntimeContext(Protocol):
    """What the training loop needs to know about its process and its peers."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    checkpoints_are_durable: bool
    """Whether checkpoints in the run directory survive a restart (``False``: node-local scratch, Ray)."""
    collectives: CollectiveLog
    """The last collectives this rank entered and left (read by the hang watchdog's report)."""

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def broadcast_object(self, obj: Any) -> Any: ...

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, files: list[Path] | None = None
    ) -> None:
        """Hand metrics (and this rank's ``files`` of a finished checkpoint) to the orchestrator.

        A no-op outside Ray. ``files`` are relative to ``checkpoint_dir``; ``None`` means all of them.
        """
        ...

    def resume_checkpoint(self) -> Path | None:
        """A checkpoint the orchestrator wants the job to resume from (Ray after a restart)."""
        ...

    def persist(self, run_dir: Path, final: bool = False) -> None:
        """Copy what a user keeps from ``run_dir`` to durable storage (Ray); a no-op where it already is."""
        ...

    def durable_location(self, run_dir: Path, name: str) -> str:
        """Where ``name`` of the run directory is kept once persisted (Ray: under ``run.storage_path``)."""
        ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` (on ``device``) across ranks in place and return it; world size 1: unchanged."""
        ...

    def tensor(self, values: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A tensor of ``values`` on ``device``: the only way the loop makes tensors for collectives."""
        ...

    def stop_requested_locally(self) -> bool:
        """Whether this rank was asked to stop (SIGTERM, pre-emption notice); no collective.

        The loop agrees on the answer across ranks by adding it to the reduction it does at each log
        window (see ``train/loop.py``), so asking costs no extra synchronisation.
        """
        ...


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class ProcessGroupContext:
    """A context backed by ``torch.distributed`` when initialised; safe at world size 1."""

    checkpoints_are_durable = True

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device) -> None:
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.collectives = CollectiveLog()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self._distributed:
            with self.collectives.track("barrier"):
                dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        with self.collectives.track("all_gather_object"):
            dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        if not self._distributed:
            return obj
        box = [obj]
        with self.collectives.track("broadcast_object"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, files: list[Path] | None = None
    ) -> None:
        del metrics, checkpoint_dir, files

    def resume_checkpoint(self) -> Path | None:
        return None

    def persist(self, run_dir: Path, final: bool = False) -> None:
        del run_dir, final

    def durable_location(self, run_dir: Path, name: str) -> str:
        return str(run_dir / name)

    def tensor(self, values: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce in place across ranks (``sum``, ``max`` or ``min``).

        Raises:
            ValueError: ``tensor`` is not on this context's device (on NCCL that is a crash or a hang).
        """
        if tensor.device != self.device:
            raise ValueError(
                f"collective on a tensor on {tensor.device}, but this rank's device is {self.device}; "
                "allocate it with context.tensor(...)"
            )
        if self._distributed:
            with self.collectives.track(f"all_reduce({op})"):
                dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
        return tensor

    def stop_requested_locally(self) -> bool:
        return signals.stop_requested_locally()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, device={self.device})"


def choose_device(use_gpu: UseGpu, local_rank: int) -> torch.device:
    """The one place a device is decided: ``cuda:<local_rank>`` or the CPU.

    ``auto`` takes a GPU when one is present; ``True`` insists on one.

    Raises:
        LaunchError: ``use_gpu=True`` without a CUDA device, or more local ranks than GPUs.
    """
    available = torch.cuda.is_available()
    if use_gpu is True and not available:
        raise LaunchError(
            "run.use_gpu=true but torch sees no CUDA device (torch.cuda.is_available() is False); "
            "set run.use_gpu=auto (GPU when present) or run.use_gpu=false, or install a CUDA build of torch"
        )
    if not (available and use_gpu):
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise LaunchError(
            f"local rank {local_rank} but only {torch.cuda.device_count()} CUDA devices on this node; "
            "start at most one process per GPU (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def share_of_cores(local_world_size: int, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Torch intra-op threads for one of ``local_world_size`` processes on this node, and why.

    ``OMP_NUM_THREADS`` (set by the user, or by Ray to the CPUs a worker reserved) wins; otherwise each
    process takes its share of the node's usable cores. Two ranks on a 2-core node each spinning two
    OpenMP threads were measured up to ~20x slower than one thread each.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(local_world_size, 1)), f"{cores} cores / {local_world_size} local processes"


def set_intra_op_threads(threads: int | None, local_world_size: int) -> str:
    """Set torch's intra-op threads (``run.num_threads``, else this process's share); returns a log line."""
    why = "run.num_threads"
    if threads is None:
        threads, why = share_of_cores(local_world_size)
    torch.set_num_threads(threads)
    return f"torch threads: {threads} ({why})"


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu (N threads)``, for the log line that says where a job runs."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


class LocalContext(ProcessGroupContext):
    """One process, no process group: tests, debugging, laptops."""

    def __init__(self, use_gpu: UseGpu = False) -> None:
        device = choose_device(use_gpu, local_rank=0)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        super().__init__(rank=0, world_size=1, local_rank=0, device=device)


class TorchrunContext(ProcessGroupContext):
    """A process started by ``torchrun``, ``accelerate launch`` or the ``deepspeed`` launcher (``env://``).

    Rank, world size and local rank come from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the process group
    (gloo on CPU, NCCL on GPUs) is created here from ``MASTER_ADDR``/``MASTER_PORT``. The device is
    ``cuda:LOCAL_RANK`` with ``run.use_gpu`` and a GPU, else the CPU; nothing else guesses it.

    World-size rule (``expected_world_size`` is ``run.num_workers``): the launcher decides how many
    processes run. ``None`` or ``1`` (the default) accepts whatever it started; any other number must
    equal ``WORLD_SIZE`` or the job is refused with a :class:`LaunchError` before any work is done.
    """

    def __init__(
        self, use_gpu: UseGpu = False, expected_world_size: int | tuple[int, int] | None = None
    ) -> None:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_world_size(expected_world_size, world_size)
        device = choose_device(use_gpu, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(process_group_backend(device), timeout=timedelta(minutes=30))
            # the group the ranks leave through, made now while every rank is alive to join it
            exit_group = dist.new_group(backend="gloo", timeout=EXIT_BARRIER_TIMEOUT)
            atexit.register(_destroy_process_group, exit_group)  # before the interpreter tears down
        super().__init__(rank, world_size, local_rank, device)
        self._check_world_agrees()

    def _check_world_agrees(self) -> None:
        """Refuse N independent trainings that all believe they are one job (Accelerate's silent mode)."""
        if self.world_size > 1 and dist.get_world_size() != self.world_size:
            raise LaunchError(
                f"WORLD_SIZE={self.world_size} but the process group has {dist.get_world_size()} members; "
                "the launcher and the environment disagree: launch with torchrun or accelerate launch "
                "--config_file cluster_configs/accelerate/cpu_2proc.yaml (see launchers/README.md)"
            )


def process_group_backend(device: torch.device) -> str:
    """``cpu:gloo,cuda:nccl`` on GPUs (tensors on NCCL, pickled objects on gloo), ``gloo`` on the CPU."""
    return GPU_BACKEND if device.type == "cuda" else "gloo"


def _destroy_process_group(exit_group: dist.ProcessGroup) -> None:
    """At exit: wait for the peers (``EXIT_BARRIER_TIMEOUT`` at most), then destroy the process groups.

    A rank that destroys its gloo group while a peer still works aborts now and then (SIGABRT, "terminate
    called without an active exception"), so the ranks leave together, through a barrier on ``exit_group``:
    a gloo group whose timeout is ``EXIT_BARRIER_TIMEOUT``, so the wait is bounded on every rank (the
    timeout of ``monitored_barrier`` bounds rank 0 only). On an error path peers may be gone or stuck in
    a collective: a failed or timed-out wait is ignored.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):  # peers gone, stuck or slow: leave anyway (never raise at exit)
        dist.barrier(group=exit_group)
    dist.destroy_process_group()


LAUNCH_HINT = (
    "launch one process per worker with the same run.num_workers, e.g. "
    "torchrun --nproc_per_node {n} -m distributed_ft train ... run.num_workers={n} "
    "(launchers/README.md lists torchrun, accelerate launch and deepspeed commands)"
)


def check_world_size(expected: int | tuple[int, int] | None, world_size: int) -> None:
    """Refuse a launcher world size that contradicts an explicit ``run.num_workers``.

    Raises:
        LaunchError: ``expected`` is neither ``None``, ``1`` (accept the launcher's) nor ``world_size``,
            or ``world_size`` is outside an elastic ``[min, max]``.
    """
    if isinstance(expected, tuple | list):
        low, high = expected
        if not low <= world_size <= high:
            raise LaunchError(
                f"run.num_workers=[{low}, {high}] but the launcher started WORLD_SIZE={world_size} "
                f"processes; start between {low} and {high} (torchrun --nnodes {low}:{high} for elastic "
                "nodes)"
            )
        return
    if expected not in (None, 1, world_size):
        raise LaunchError(
            f"run.num_workers={expected} but the launcher started WORLD_SIZE={world_size} processes; "
            + LAUNCH_HINT.format(n=expected)
        )


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def check_single_process_launch(
    expected: int | tuple[int, int] | None, env: Mapping[str, str] | None = None
) -> None:
    """Refuse a process without ``env://`` variables that is not meant to train alone.

    Caught here: ``run.num_workers > 1``; ``accelerate launch`` whose config asked for several processes
    but started one (a ``MULTI_CPU`` config on one machine: Accelerate sets ``MASTER_ADDR`` only for
    several processes); MPI (``mpirun -np N``) started ``N`` copies that would each train alone.

    Raises:
        LaunchError: With the command that launches the job correctly.
    """
    env = os.environ if env is None else env
    if isinstance(expected, tuple | list):  # elastic: one process is fine when the range allows it
        expected = None if expected[0] == 1 else expected[0]
    if expected not in (None, 1):
        raise LaunchError(
            f"run.num_workers={expected} but this is a single process without RANK/WORLD_SIZE; "
            + LAUNCH_HINT.format(n=expected)
            + ", or use run.backend=ray"
        )
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env:  # both set by accelerate launch
        raise LaunchError(
            "accelerate launch was asked for several processes but started one without RANK/WORLD_SIZE "
            "(a MULTI_CPU config on one machine does that); use "
            "accelerate launch --config_file cluster_configs/accelerate/cpu_2proc.yaml -m distributed_ft "
            "train ... (a MULTI_GPU config: on CPU it starts real gloo processes), or torchrun"
        )
    copies = _int_env(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
    if copies is not None and copies > 1:
        raise LaunchError(
            f"{copies} copies of this process were started by MPI without RANK/WORLD_SIZE; each would train "
            "alone on all the data. Start torchrun once per node instead: " + LAUNCH_HINT.format(n=copies)
        )


def launched_distributed() -> bool:
    """Whether this process was started by a multi-process launcher (``env://`` variables present)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes of this job on this node (``LOCAL_WORLD_SIZE`` from torchrun / accelerate; else 1)."""
    env = os.environ if env is None else env
    value = env.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def create_context(
    use_gpu: UseGpu = False, expected_world_size: int | tuple[int, int] | None = None
) -> ProcessGroupContext:
    """The context for a process started from the command line (local or by a launcher).

    Raises:
        LaunchError: The launch contradicts ``expected_world_size`` (``run.num_workers``) or started
            processes that would train independently (see :func:`check_single_process_launch`).
    """
    signals.install_stop_handler()
    if launched_distributed():
        context: ProcessGroupContext = TorchrunContext(
            use_gpu=use_gpu, expected_world_size=expected_world_size
        )
    else:
        check_single_process_launch(expected_world_size)
        context = LocalContext(use_gpu=use_gpu)
    return context


def ensure_process_group(context: RuntimeContext) -> None:
    """Create a one-member gloo process group for a single process if none exists.

    Libraries that always talk to ``torch.distributed`` (DeepSpeed) need a group even at world size 1.
    A multi-process context must already have one (the launcher's or the orchestrator's).
    """
    if dist.is_initialized():
        return
    if context.world_size != 1:
        raise LaunchError(
            f"world size {context.world_size} but no torch.distributed process group; "
            + LAUNCH_HINT.format(n=context.world_size)
        )
    dist.init_process_group(
        process_group_backend(context.device), store=dist.HashStore(), rank=0, world_size=1
    )
    atexit.register(_destroy_own_group)  # before the interpreter tears down (see _destroy_process_group)


def _destroy_own_group() -> None:
    """At exit: destroy the one-member group :func:`ensure_process_group` made, if it is still there.

    A gloo group left to the interpreter's teardown can abort the process ("terminate called without an
    active exception"): the likely cause of an abort seen once in CI after a finished single-process
    DeepSpeed run (not reproduced in 11 runs on an idle machine).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
