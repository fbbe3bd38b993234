"""Loading checkpoint files without running code from them.

A checkpoint can come from shared storage or a ``run.resume=PATH`` someone else wrote; a pickle in it
may call anything on load. Every ``torch.load`` of this project goes through :func:`load_checked`
(``weights_only=True``: tensors, containers and numbers only). DeepSpeed reads its own shards with a full
unpickler, so :func:`verify_torch_files` first checks each of them the same way (memory-mapped: the
tensors are not read), allowing only the few plain DeepSpeed types its checkpoints hold (named by the
DeepSpeed engine, the one module that imports DeepSpeed).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from distributed_ft.errors import CheckpointError


def _refuse(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path}: it is not a plain tensor file ({exc}). A checkpoint whose pickle "
        "would run code is never loaded; use checkpoints written by this run, or re-export the model"
    )


def load_checked(path: Path, map_location: Any = "cpu", extra_types: Iterable[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)``; a file that needs more than that is refused.

    Raises:
        CheckpointError: The pickle references anything besides tensors, containers and numbers.
    """
    try:
        with torch.serialization.safe_globals(list(extra_types)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise _refuse(path, exc) from exc


def verify_torch_files(directory: Path, extra_types: Iterable[Any] = ()) -> None:
    """Check that every ``*.pt`` file under ``directory`` loads with ``weights_only=True``.

    Files are memory-mapped, so this reads the pickles, not the tensor data.

    Raises:
        CheckpointError: Naming the first file that would execute code when unpickled.
    """
    for path in sorted(directory.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(list(extra_types)):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
            raise _refuse(path, exc) from exc
