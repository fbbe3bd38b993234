"""RuntimeContext: the one seam through which the loop learns where it runs.

The loop never reads ``RANK``/``LOCAL_RANK`` itself: the device, the rank and the collectives come from
the context (Ray and DeepSpeed disagree about ``LOCAL_RANK``; DESIGN.md "Known traps").
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from distributed_ft.errors import LaunchError


@runtime_checkable
class RuntimeContext(Protocol):
    """What the training loop needs to know about its process and its peers."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def broadcast_object(self, obj: Any) -> Any: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Hand metrics (and a finished checkpoint) to the orchestrator; a no-op outside Ray."""
        ...

    def resume_checkpoint(self) -> Path | None:
        """A checkpoint the orchestrator wants the job to resume from (Ray after a restart)."""
        ...


class ProcessGroupContext:
    """A context backed by ``torch.distributed`` when initialised; safe at world size 1."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device) -> None:
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self._distributed:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        if not self._distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        del metrics, checkpoint_dir

    def resume_checkpoint(self) -> Path | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, device={self.device})"


class LocalContext(ProcessGroupContext):
    """One process, no process group: tests, debugging, laptops."""

    def __init__(self, use_gpu: bool = False) -> None:
        device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        super().__init__(rank=0, world_size=1, local_rank=0, device=device)


class TorchrunContext(ProcessGroupContext):
    """A process started by ``torchrun``, ``accelerate launch`` or the ``deepspeed`` launcher (``env://``)."""

    def __init__(self, use_gpu: bool = False, expected_world_size: int | None = None) -> None:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if expected_world_size is not None and expected_world_size != world_size:
            raise LaunchError(
                f"run.num_workers={expected_world_size} but the launcher started WORLD_SIZE={world_size}; "
                "launch as many processes as run.num_workers, e.g. "
                f"torchrun --nproc_per_node {expected_world_size} -m distributed_ft train ..."
            )
        cuda = use_gpu and torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
        super().__init__(rank, world_size, local_rank, device)
        self._check_world_agrees()

    def _check_world_agrees(self) -> None:
        """Refuse N independent trainings that all believe they are one job (Accelerate's silent mode)."""
        if self.world_size > 1 and dist.get_world_size() != self.world_size:
            raise LaunchError(
                f"WORLD_SIZE={self.world_size} but the process group has {dist.get_world_size()} members; "
                "the launcher and the environment disagree: launch with torchrun or accelerate launch "
                "--num_processes N --multi_gpu (ACCELERATE_USE_CPU=1 on CPU)"
            )


def launched_distributed() -> bool:
    """Whether this process was started by a multi-process launcher (``env://`` variables present)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def create_context(use_gpu: bool = False, expected_world_size: int | None = None) -> ProcessGroupContext:
    """The context for a process started from the command line (local or by a launcher)."""
    if launched_distributed():
        return TorchrunContext(use_gpu=use_gpu, expected_world_size=expected_world_size)
    if expected_world_size not in (None, 1):
        raise LaunchError(
            f"run.num_workers={expected_world_size} but this is a single process; start it with "
            f"torchrun --nproc_per_node {expected_world_size} -m distributed_ft train ..., "
            "or use run.backend=ray"
        )
    return LocalContext(use_gpu=use_gpu)
