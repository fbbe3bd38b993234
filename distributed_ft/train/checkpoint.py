"""Resumable run state and atomic checkpoints.

A checkpoint is a directory ``checkpoints/step-NNNNNNN`` holding the engine's state (model, optimizer,
schedule; sharded under DeepSpeed), ``run_state.json`` (step, epoch, data position, early-stopping state)
and each rank's RNG states. It is written into ``.tmp-step-NNNNNNN`` and renamed into place only when
every rank has finished; the ``latest`` pointer moves last. A crash at any point leaves the previous
checkpoint complete and ``latest`` pointing at it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_ft.engine.base import Engine
from distributed_ft.errors import CheckpointError
from distributed_ft.runtime.context import RuntimeContext
from distributed_ft.runtime.safe_load import load_checked

STATE_FILE = "run_state.json"
LATEST = "latest"
BEST = "best"
PREFIX = "step-"
CLAIM = ".finalizing"


@dataclass
class RunState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    source: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "position": 0})
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    tokens_seen: int = 0


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    """Every RNG state of this process as tensors and numbers only (loadable with ``weights_only``)."""
    version, python_state, gauss = random.getstate()
    kind, mt, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "state": torch.from_numpy(mt.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    mt = numpy_state["state"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy_state["kind"], mt, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_OWNER = re.compile(r"(?:zero_pp_rank_|rng-rank)(\d+)")


def file_owner(name: str) -> int | None:
    """The rank whose shard a checkpoint file is, or ``None`` for a file every rank reads.

    DeepSpeed names each rank's shards ``*zero_pp_rank_R_*``, and RNG states are ``rng-rankR.pt``;
    everything else (model states of stages 0-2, metadata, run state) is written by rank 0 and read by all.
    """
    match = _OWNER.search(Path(name).name)
    return int(match.group(1)) if match else None


def owned_files(checkpoint: Path, rank: int) -> list[Path]:
    """The files of ``checkpoint`` that ``rank`` wrote (relative paths)."""
    files = sorted(p.relative_to(checkpoint) for p in checkpoint.rglob("*") if p.is_file())
    return [path for path in files if (file_owner(path.name) or 0) == rank]


def needed_files(names: list[str], rank: int) -> list[str]:
    """The files of a checkpoint (relative names) that ``rank`` reads to resume: shared ones and its own."""
    return [name for name in names if file_owner(name) in (None, rank)]


def is_complete(directory: Path) -> bool:
    """A checkpoint directory is complete when its run state exists (written last, before the rename)."""
    return (directory / STATE_FILE).is_file() and not directory.name.startswith(".")


class CheckpointManager:
    """Writes, finds, loads and prunes the checkpoints of one run directory."""

    def __init__(self, directory: Path, context: RuntimeContext, keep: int = 2) -> None:
        self.directory, self.context, self.keep = directory, context, keep

    def _pointer(self, name: str) -> Path | None:
        path = self.directory / name
        if not path.is_file():
            return None
        target = self.directory / path.read_text().strip()
        return target if is_complete(target) else None

    @property
    def latest(self) -> Path | None:
        """The newest complete checkpoint (the ``latest`` pointer, or a scan if it is missing)."""
        pointed = self._pointer(LATEST)
        if pointed is not None:
            return pointed
        complete = sorted(p for p in self.directory.glob(f"{PREFIX}*") if is_complete(p))
        return complete[-1] if complete else None

    @property
    def best(self) -> Path | None:
        return self._pointer(BEST)

    def save(
        self, engine: Engine, state: RunState, is_best: bool = False, metrics: dict[str, Any] | None = None
    ) -> Path:
        """Write a checkpoint of ``engine`` and ``state`` at ``state.step`` (every rank calls this).

        Works on one shared disk and on node-local disks alike: every rank writes into the staging directory
        on its own disk; rank 0 finalizes its disk, then one rank of every other disk (the first to claim it)
        finalizes that one. The finished checkpoint is handed to the orchestrator (``context.report``) with
        ``metrics``: each rank reports only the files it wrote, so each file is uploaded once.
        """
        name = f"{PREFIX}{state.step:07d}"
        final, staging = self.directory / name, self.directory / f".tmp-{name}"
        if self.context.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        self.context.barrier()
        staging.mkdir(parents=True, exist_ok=True)  # every rank: its node's disk may not be rank 0's
        engine.save(staging)
        torch.save(_rng_state(), staging / f"rng-rank{self.context.rank}.pt")
        self.context.barrier()
        if self.context.is_main:
            self._finalize(staging, final, state, is_best)
        self.context.barrier()
        if staging.exists() and self._claim(staging):  # another disk: one rank there finalizes it
            self._finalize(staging, final, state, is_best)
            (final / CLAIM).unlink(missing_ok=True)
        self.context.barrier()
        self.context.report(
            {"step": state.step, **(metrics or {})}, final, owned_files(final, self.context.rank)
        )
        self.context.persist(self.directory.parent)  # metrics so far, next to the checkpoint (Ray)
        return final

    @staticmethod
    def _claim(staging: Path) -> bool:
        """Whether this rank is the first on its disk to claim ``staging`` for finalizing."""
        try:
            (staging / CLAIM).open("x").close()
        except (FileExistsError, FileNotFoundError):
            return False
        return True

    def _finalize(self, staging: Path, final: Path, state: RunState, is_best: bool) -> None:
        """Make a fully written staging directory the checkpoint, then move the pointers."""
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        if final.exists():  # re-saving the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(staging, final)
        if is_best:
            _write_text_atomic(self.directory / BEST, final.name)
        _write_text_atomic(self.directory / LATEST, final.name)
        self._prune()

    def _prune(self) -> None:
        complete = sorted(p for p in self.directory.glob(f"{PREFIX}*") if is_complete(p))
        protected = {self.best, self.latest}
        for old in complete[: -self.keep]:
            if old not in protected:
                shutil.rmtree(old, ignore_errors=True)
        for leftover in self.directory.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint ``run.resume`` asks for: ``auto`` (latest, if any), ``never``, or a path."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest
        path = Path(resume)
        if not is_complete(path):
            what = f"is not a complete checkpoint (no {STATE_FILE})" if path.is_dir() else "does not exist"
            raise CheckpointError(
                f"run.resume={resume!r} {what}; give a step-NNNNNNN directory of a run's checkpoints/, "
                "run.resume=auto (the newest complete checkpoint of run.output_dir) or run.resume=never"
            )
        return path

    @staticmethod
    def read_state(directory: Path) -> RunState:
        """The run state of a checkpoint (no engine needed: read before the engine is built)."""
        return RunState(**json.loads((directory / STATE_FILE).read_text()))

    def load(self, engine: Engine, directory: Path) -> RunState:
        """Restore ``engine``, this rank's RNG states and the run state from ``directory``."""
        engine.load(directory)
        rng = directory / f"rng-rank{self.context.rank}.pt"
        if rng.is_file():
            _set_rng_state(load_checked(rng))
        return self.read_state(directory)


def agree_on_resume(context: RuntimeContext, checkpoints: CheckpointManager, resume: str) -> Path | None:
    """The checkpoint every rank resumes from: rank 0 decides, every rank checks that it has it.

    The orchestrator's checkpoint (Ray's, from storage) comes first. Otherwise ``run.resume`` is looked up
    in the run directory, unless the context says its run directory is scratch (Ray: a restarted worker may
    find a stale checkpoint there that its peers on other nodes do not have).

    Raises:
        CheckpointError: A rank does not hold the checkpoint rank 0 chose (node-local disks that diverged).
    """
    mine = context.resume_checkpoint()
    if mine is None and context.checkpoints_are_durable:
        mine = checkpoints.find_resume(resume)
    chosen = context.broadcast_object(mine.name if mine is not None else None)
    if chosen is None:
        return None
    if mine is None or mine.name != chosen or not is_complete(mine):
        have = mine.name if mine is not None else "none"
        raise CheckpointError(
            f"rank 0 resumes from {chosen} but rank {context.rank} holds {have}: the ranks do not share "
            "their checkpoints. Put run.output_dir on a disk every node shares, use run.backend=ray with "
            "run.storage_path, or pass run.resume=PATH of a checkpoint every rank can read"
        )
    return mine
