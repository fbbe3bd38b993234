"""DeepSpeed ZeRO engine (stages 0-3, CPU offload): the only module that imports ``deepspeed``.

Selected by ``run.engine=deepspeed``. The DeepSpeed JSON is rendered from the job config by
:mod:`distributed_ft.config.deepspeed`. Design choices, each checked on CPU with 2 processes:

* **Optimizer**: torch's ``AdamW`` (fused where available) and the schedule of ``engine/optim.py`` are
  passed to ``deepspeed.initialize``; no DeepSpeed op is JIT-compiled for them. With
  ``offload_optimizer`` DeepSpeed would insist on its ``DeepSpeedCPUAdam`` (a 50-90 s compile); the
  rendered config sets ``zero_force_ds_cpu_optimizer: false`` so torch's AdamW steps the offloaded fp32
  partitions on the CPU instead. DeepSpeed's CPU shared-memory communication op (used only for
  inference all-reduce) is marked unavailable, so training on CPU compiles nothing at all.
* **Devices**: DeepSpeed's accelerator is pinned to the context's device type before anything else of
  DeepSpeed runs (``DS_ACCELERATOR`` / ``set_accelerator``), and ``device_rank`` is the context's
  ``cuda:<local_rank>`` index.
* **Accumulation**: the loop calls ``forward(batch, sync_grads=boundary)``, ``backward`` every micro-batch
  and ``step`` at the boundary (also on a partial window at the end of an epoch). ``forward`` hands the
  boundary to ``set_gradient_accumulation_boundary`` so DeepSpeed's micro-step counter never decides it.
  The loss arrives normalised over the whole window (``train/step.py``), so ``backward`` passes
  ``scale_wrt_gas=False``; DeepSpeed clips (``gradient_clipping``) itself, once.
* **ZeRO-3 construction**: :meth:`DeepSpeedEngine.model_construction` registers ``HfDeepSpeedConfig`` so
  ``from_pretrained`` builds under ``deepspeed.zero.Init``: each rank only ever holds its partitions.
* **Checkpoints**: ``save_checkpoint(dir, tag="engine", save_latest=False)`` into the staging directory the
  CheckpointManager renames afterwards; loading names the tag, so no DeepSpeed ``latest`` file is
  involved. ``engine/dft_engine.json`` records the world size and stage that wrote the shards. With frozen
  parameters (PEFT) they are left out (``exclude_frozen_parameters``; rebuilt from the base model) and the
  module is loaded non-strictly: adapter runs write adapter-sized checkpoints.
* **Export**: parameters are gathered one at a time (ZeRO-3) and only those that are saved: an adapter
  export (frozen base) gathers the trainable parameters alone. Mixed-precision runs (bf16/fp16 module
  weights) export the fp32 master weights DeepSpeed keeps for them (``safe_get_full_fp32_param``), cast to
  ``model.dtype`` (float32 by default): never 16-bit values upcast. Rank 0 writes ``save_pretrained``. A
  checkpoint from another world size or stage is consolidated with
  ``get_fp32_state_dict_from_zero_checkpoint`` (weights only).
* **Layout-free state** (ZeRO 1-3): beside DeepSpeed's shards every checkpoint holds each trainable
  parameter's full fp32 master and AdamW moments (``safe_get_full_fp32_param`` /
  ``safe_get_full_optimizer_state``; parameter ``i`` is written by rank ``i mod W``, so the ranks write one
  copy between them) and the step counters and schedule. A run resumed on another world size or ZeRO stage
  loads these into its own partitions (``safe_set_full_*``): weights, moments, Adam's step and the schedule
  continue exactly. Same layout: DeepSpeed's own ``load_checkpoint``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from distributed_ft.config.deepspeed import render_deepspeed_config
from distributed_ft.config.schema import JobConfig
from distributed_ft.engine.optim import build_optimizer, build_scheduler, scheduled_lr
from distributed_ft.errors import CheckpointError, ConfigError
from distributed_ft.runtime.context import RuntimeContext, ensure_process_group
from distributed_ft.runtime.safe_load import load_checked, verify_torch_files

log = logging.getLogger("distributed_ft")

LAYOUT_FREE_PART = "layout-free-part-{part}.safetensors"
"""Full fp32 masters and moments of every ``parts``-th trainable parameter (read by every rank)."""
LAYOUT_FREE_STATE = "layout-free-state.pt"
"""Adam's step, the schedule and DeepSpeed's step counters (``weights_only`` loadable)."""
MOMENTS = ("exp_avg", "exp_avg_sq")
TAG = "engine"
"""DeepSpeed checkpoint tag: a fixed sub-directory of each checkpoint, loaded by name."""
META_FILE = "dft_engine.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _import_deepspeed(device_type: str | None = None) -> Any:
    """``import deepspeed`` with its INFO chatter reduced to warnings.

    ``device_type`` pins DeepSpeed's accelerator to the context's device (``cuda`` or ``cpu``): left to
    itself, DeepSpeed picks CUDA whenever a GPU is visible and puts the model on ``cuda:0`` while the
    batches of a ``run.use_gpu=false`` job stay on the CPU.
    """
    if device_type is not None and "deepspeed" not in sys.modules:
        os.environ["DS_ACCELERATOR"] = device_type  # read by DeepSpeed's first get_accelerator()
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError(
            "run.engine=deepspeed needs DeepSpeed: pip install 'distributed_ft[deepspeed]'"
        ) from exc
    from deepspeed.utils import logger as ds_logger

    if not log.isEnabledFor(logging.DEBUG):
        ds_logger.setLevel(logging.WARNING)
    if device_type is not None:
        pin_accelerator(device_type)
    return deepspeed


def pin_accelerator(device_type: str) -> str:
    """Make DeepSpeed's accelerator the one of ``device_type``; returns its name (``cuda`` or ``cpu``)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"run.engine=deepspeed runs on cuda or cpu devices, not {device_type!r}")
    if get_accelerator().device_name() != device_type:
        if device_type == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        set_accelerator(Accelerator())
    return get_accelerator().device_name()


def _skip_cpu_shm_op(deepspeed: Any) -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op (30-100 s when cold).

    DeepSpeed builds it when its communication backend starts on the CPU accelerator, but only uses it
    for ``inference_all_reduce`` (tensor-parallel inference), never in ZeRO training. Marking it
    incompatible in ``deepspeed.ops.__compatible_ops__`` (a dict DeepSpeed documents as editable) keeps
    training compile-free and avoids the ~66 MB per rank it leaves in ``/dev/shm``.
    """
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def checkpoint_types() -> list[Any]:
    """The plain DeepSpeed types its checkpoint pickles hold, allowed by the safe loader.

    An enum, the loss scalers and the fragment addresses (objects of numbers, restored through their
    ``__dict__``): nothing that runs code on load. Found by scanning the pickles of ZeRO 0-3 checkpoints
    (fp32, bf16, offload) for their globals.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class _TensorTally:
    """Sums tensor bytes, counting each byte of memory once (overlapping views of flat buffers too)."""

    def __init__(self) -> None:
        self._covered: dict[int, list[tuple[int, int]]] = {}

    def _claim(self, storage: int, start: int, end: int) -> int:
        """Mark ``[start, end)`` of ``storage`` counted; returns how many bytes were new."""
        spans = self._covered.get(storage, [])  # sorted, disjoint
        new = (end - start) - sum(max(0, min(end, hi) - max(start, lo)) for lo, hi in spans)
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted([*spans, (start, end)]):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self._covered[storage] = merged
        return new

    def add(self, tensors: Any) -> int:
        total = 0
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            size = tensor.element_size()
            start = tensor.storage_offset() * size
            total += self._claim(tensor.untyped_storage().data_ptr(), start, start + tensor.numel() * size)
        return total


def _set_full_state(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """Keep this rank's partition of a full fp32 master (``key=None``) or AdamW moment ``key``.

    ZeRO 1-2: ``safe_set_full_*``. ZeRO-3 partitions are padded to equal sizes, and DeepSpeed 0.19's
    ``set_full_hp_param`` reads past the end of the value for the last rank of a padded parameter, so
    the partition is cut here from the value with its padding zeroed.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not hasattr(param, "ds_id"):
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * zero._get_param_partition_rank(param)
    piece = value.flatten()[start : start + part.numel()]
    part.data.zero_()
    part.data[: piece.numel()].copy_(piece)


def _flatten(value: Any) -> list[Any]:
    """Tensors inside nested lists, tuples and dicts (``None`` entries dropped)."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _flatten(v)]
    return [value] if isinstance(value, torch.Tensor) else []


def _record_dtype(config_file: Path, dtype: str) -> None:
    """Make ``config.json`` name the dtype the exported files hold.

    ``save_pretrained`` records the dtype of the live module's parameters (16-bit under mixed precision)
    even when the state dict it writes is the fp32 masters.
    """
    if not config_file.is_file():  # an adapter export: the base model's config is not written
        return
    saved = json.loads(config_file.read_text())
    if saved.get("dtype") != dtype:
        saved["dtype"] = dtype
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


class DeepSpeedEngine:
    """The Engine protocol on a ``deepspeed.DeepSpeedEngine`` (ZeRO 0-3, optional CPU offload)."""

    def __init__(self, config: JobConfig, context: RuntimeContext) -> None:
        self.config, self.context = config, context
        self.stage = config.deepspeed.zero_stage
        # Render once now so that a conflicting deepspeed.config fails before the model is loaded.
        self.ds_config = render_deepspeed_config(config, context.world_size, context.device.type)
        self._check_accelerate_env()
        self._ds: Any = None
        self._model: nn.Module | None = None
        self._hidden_size: int | None = None

    def _check_accelerate_env(self) -> None:
        """Refuse an ``accelerate launch`` DeepSpeed plugin whose ZeRO stage disagrees with the job."""
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is not None and stage.isdigit() and int(stage) != self.stage:
            raise ConfigError(
                f"accelerate launch was configured with zero_stage {stage} but deepspeed.zero_stage="
                f"{self.stage}; the job config decides: set deepspeed.zero_stage={stage} or launch with "
                "cluster_configs/accelerate/multi_gpu_deepspeed.yaml"
            )

    @property
    def module(self) -> nn.Module:
        assert self._model is not None, "prepare() first"
        return self._model

    def _start(self, hidden_size: int | None) -> Any:
        """Import DeepSpeed on the context's device, make sure a process group exists, render the JSON."""
        deepspeed = _import_deepspeed(self.context.device.type)
        if self.context.device.type == "cpu":
            _skip_cpu_shm_op(deepspeed)
        ensure_process_group(self.context)
        os.environ.setdefault("LOCAL_RANK", str(self.context.local_rank))  # DeepSpeed reads it
        # DeepSpeed's communication layer wraps the existing process group (zero.Init needs it before
        # deepspeed.initialize, which would otherwise create it)
        deepspeed.comm.init_distributed(dist_init_required=False, auto_mpi_discovery=False, verbose=False)
        if hidden_size is not None or self._hidden_size is None:
            self._hidden_size = hidden_size
            self.ds_config = render_deepspeed_config(
                self.config, self.context.world_size, self.context.device.type, hidden_size=hidden_size
            )
        return deepspeed

    @contextlib.contextmanager
    def model_construction(self, hidden_size: int | None) -> Any:
        """ZeRO-3: models loaded in here are partitioned as they are built (no rank holds the whole model).

        transformers' ``from_pretrained`` consults the registered ``HfDeepSpeedConfig`` and then constructs
        under ``deepspeed.zero.Init`` and loads each weight into its partitions (embedding resizes and PEFT
        adapter initialisation inside the block gather what they touch). The registration is process-wide
        in transformers, so it lasts only for this block: a later plain ``from_pretrained`` on one rank
        (``--merge-lora``) must not start a collective the other ranks never join.
        """
        self._start(hidden_size)
        if self.stage != 3:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        registration = HfDeepSpeedConfig(self.ds_config)  # registers itself (a weak reference)
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del registration

    def prepare(self, model: nn.Module, total_steps: int) -> None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        deepspeed = self._start(hidden if self._hidden_size is None else None)
        log.debug("DeepSpeed config: %s", json.dumps(self.ds_config))
        optimizer = build_optimizer(model, self.config.train, self.config.task)
        scheduler = build_scheduler(optimizer, self.config.train, total_steps)
        device = self.context.device
        # The device comes from the context (always indexed on CUDA), not from DeepSpeed's LOCAL_RANK
        # reading (Ray and DeepSpeed disagree about it).
        args = SimpleNamespace(device_rank=device.index if device.type == "cuda" else 0)
        if device.type == "cuda" and device.index is None:
            raise ConfigError(f"DeepSpeed needs an indexed CUDA device, got {device}")
        self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=args,
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self._model = self._ds.module

    def forward(self, batch: dict[str, torch.Tensor], sync_grads: bool = True, bare: bool = False) -> Any:
        batch = {k: v.to(self.context.device, non_blocking=True) for k, v in batch.items()}
        if bare:  # no output backward hooks: a partial backward must not enter DeepSpeed's accounting
            return self._model(**batch)
        if self._ds.training:
            self._ds.set_gradient_accumulation_boundary(sync_grads)
        return self._ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss, scale_wrt_gas=False)  # the loop normalised the loss over the window

    def step(self) -> float | None:
        self._ds.set_gradient_accumulation_boundary(True)
        self._ds.step()
        if self.config.train.max_grad_norm is None:
            return None
        return _as_float(self._ds.get_global_grad_norm())

    @property
    def lr(self) -> float:
        return float(scheduled_lr(self.scheduler, self.config.train.lr))

    def train(self, mode: bool = True) -> None:
        self._ds.train(mode)

    # ------------------------------------------------------------------ checkpoints
    def _has_frozen(self) -> bool:
        return any(not p.requires_grad for p in self.module.parameters())

    def save(self, directory: Path) -> None:
        frozen = self._has_frozen()
        self._ds.save_checkpoint(str(directory), tag=TAG, save_latest=False, exclude_frozen_parameters=frozen)
        if self.stage >= 1:
            self._save_layout_free(directory / TAG)
        if self.context.is_main:
            meta = {"world_size": self.context.world_size, "zero_stage": self.stage}
            (directory / TAG / META_FILE).write_text(json.dumps(meta))

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters by name, each once (tied weights under their first name)."""
        seen: set[int] = set()
        out = []
        for name, param in self.module.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                out.append((name, param))
        return out

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self._ds.optimizer, "optimizer", self._ds.optimizer)

    def _link_optimizer_states(self) -> None:
        """Make every AdamW state exist and be reachable through DeepSpeed's parameter mappings.

        torch's AdamW creates a parameter's state at its first step (a resumed engine has none yet: they
        are created here as zeros, in the form AdamW makes them). ZeRO 1-2 link their parameter fragments
        to those states once, after the first step of the first parameter group, when the other groups'
        states do not exist yet (so ``safe_get_full_optimizer_state`` fails for them): linked again here.
        """
        inner, zero = self._inner_optimizer(), self._ds.optimizer
        # the flat fp32 partitions AdamW steps (ZeRO swaps them into its param groups per step)
        flats = _flatten(getattr(zero, "single_partition_of_fp32_groups", None))  # ZeRO 1-2
        flats += _flatten(getattr(zero, "fp32_partitioned_groups_flat", None))  # ZeRO-3
        on_device = bool(inner.defaults.get("fused") or inner.defaults.get("capturable"))
        for flat in flats:
            state = inner.state[flat]
            if "exp_avg" not in state:
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=flat.device if on_device else "cpu"
                )
                for key in MOMENTS:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if hasattr(zero, "_hp_optimizer_states_linked"):  # ZeRO 1-2 (DeepSpeed 0.19)
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _save_layout_free(self, tag_dir: Path) -> None:
        """Write the layout-free state (module docstring); collective: every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link_optimizer_states()
        rank, parts = self.context.rank, self.context.world_size
        mine: dict[str, torch.Tensor] = {}
        for index, (name, param) in enumerate(self._trainable()):
            values = {"fp32": safe_get_full_fp32_param(param)}  # each call gathers: all ranks, same order
            values |= {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}
            if index % parts == rank:
                for key, value in values.items():
                    if value is None:
                        raise CheckpointError(f"DeepSpeed holds no {key} for parameter {name}")
                    mine[f"{name}::{key}"] = value.detach().to("cpu", copy=True).contiguous()
        save_file(mine, tag_dir / LAYOUT_FREE_PART.format(part=rank))
        if self.context.is_main:
            steps = {float(s["step"]) for s in self._inner_optimizer().state.values() if "step" in s}
            state = {
                "parts": parts,
                "adam_step": max(steps) if steps else 0.0,
                "scheduler": self.scheduler.state_dict(),
                # lr (the schedule's current value), betas, weight decay of each group: not in the schedule
                "param_groups": [
                    {k: v for k, v in group.items() if k != "params"}
                    for group in self._inner_optimizer().param_groups
                ],
                "global_steps": int(self._ds.global_steps),
                "global_samples": int(self._ds.global_samples),
                "skipped_steps": int(self._ds.skipped_steps),
            }
            torch.save(state, tag_dir / LAYOUT_FREE_STATE)

    def _saved_layout(self, directory: Path) -> dict[str, int]:
        meta = directory / TAG / META_FILE
        if not meta.is_file():
            raise CheckpointError(
                f"{directory} holds no DeepSpeed checkpoint ({TAG}/{META_FILE} is missing); was the run "
                "trained with run.engine=torch? Use the same run.engine to resume or export it"
            )
        return json.loads(meta.read_text())

    def load(self, directory: Path, weights_only: bool = False) -> None:
        """Restore a checkpoint written by :meth:`save`.

        Args:
            directory: The checkpoint directory (holding ``engine/``).
            weights_only: Only the model weights are needed (export, evaluation): a checkpoint written by
                another world size or ZeRO stage is then consolidated instead of refused.
        """
        saved = self._saved_layout(directory)
        verify_torch_files(directory / TAG, checkpoint_types())  # DeepSpeed unpickles with full pickle
        same = saved == {"world_size": self.context.world_size, "zero_stage": self.stage}
        if same:
            self._load_native(directory)
            return
        if not weights_only and saved["zero_stage"] == self.stage == 0:
            self._load_native(directory)  # stage 0 keeps whole optimizer states: any world size reads them
            return
        if not weights_only and (directory / TAG / LAYOUT_FREE_STATE).is_file() and self.stage >= 1:
            self._load_layout_free(directory / TAG, saved)
            return
        if not weights_only:
            why = (
                "it holds no layout-free state (written before it existed)"
                if saved["zero_stage"] >= 1 and self.stage >= 1
                else "ZeRO-0 and ZeRO 1-3 keep their optimizer states in different forms"
            )
            raise CheckpointError(
                f"{directory} was written by {saved['world_size']} ranks with ZeRO stage "
                f"{saved['zero_stage']}; this job has {self.context.world_size} ranks and stage "
                f"{self.stage}, and {why}. "
                f"Resume with a ZeRO stage of the same family (0, or 1-3; any number of ranks), or with "
                f"the same layout (torchrun --nproc_per_node {saved['world_size']} ... "
                f"deepspeed.zero_stage={saved['zero_stage']}); dft export reads any layout"
            )
        self._load_consolidated(directory, saved)

    def _load_native(self, directory: Path) -> None:
        path, _ = self._ds.load_checkpoint(
            str(directory),
            tag=TAG,
            load_module_strict=not self._has_frozen(),  # frozen weights are not in the checkpoint
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {directory / TAG}")

    def _load_layout_free(self, tag_dir: Path, saved: dict[str, int]) -> None:
        """Re-partition the layout-free state into this engine (another world size or ZeRO stage).

        Every rank reads the full value of each parameter (one at a time), then keeps its own partition.
        """
        from safetensors import safe_open

        deepspeed = _import_deepspeed()
        self._link_optimizer_states()
        state = load_checked(tag_dir / LAYOUT_FREE_STATE, map_location="cpu")
        files = [tag_dir / LAYOUT_FREE_PART.format(part=part) for part in range(state["parts"])]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{tag_dir} lacks {', '.join(missing)} of its layout-free state")
        device = self.context.device
        with contextlib.ExitStack() as stack:
            parts = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
            where = {key: part for part in parts for key in part.keys()}  # noqa: SIM118 (safe_open is no dict)
            for name, param in self._trainable():
                if f"{name}::fp32" not in where:
                    raise CheckpointError(
                        f"{tag_dir} holds no state for parameter {name}: the checkpoint is of another "
                        "model or PEFT setup"
                    )
                value = {k: where[f"{name}::{k}"].get_tensor(f"{name}::{k}") for k in ("fp32", *MOMENTS)}
                fp32 = value["fp32"].to(device)
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # the module's copy
                    if self.context.is_main or not hasattr(param, "ds_id"):
                        param.data.copy_(fp32.to(param.dtype))
                _set_full_state(param, fp32, None)  # the exact master, not a 16-bit copy of it
                for key in MOMENTS:
                    _set_full_state(param, value[key].to(device), key)
        for entry in self._inner_optimizer().state.values():
            if "step" in entry:
                step = entry["step"]
                entry["step"] = (
                    torch.full_like(step, state["adam_step"])
                    if isinstance(step, torch.Tensor)
                    else state["adam_step"]
                )
        groups = self._inner_optimizer().param_groups
        if len(groups) != len(state["param_groups"]):
            raise CheckpointError(
                f"{tag_dir} has {len(state['param_groups'])} optimizer parameter groups, this run "
                f"{len(groups)}: resume with the same train.* optimizer settings (layer_lr_decay, head_lr)"
            )
        for group, saved_group in zip(groups, state["param_groups"], strict=True):
            group.update(saved_group)
        self.scheduler.load_state_dict(state["scheduler"])
        self._ds.global_steps = state["global_steps"]
        self._ds.global_samples = state["global_samples"]
        self._ds.skipped_steps = state["skipped_steps"]
        log.info(
            "resumed the layout-free state of %s (written by %d ranks, ZeRO-%d) on %d ranks, ZeRO-%d",
            tag_dir.parent,
            saved["world_size"],
            saved["zero_stage"],
            self.context.world_size,
            self.stage,
        )

    def _load_consolidated(self, directory: Path, saved: dict[str, int]) -> None:
        """Load full fp32 weights from a checkpoint of any layout into this engine's parameters."""
        deepspeed = _import_deepspeed()
        if saved["zero_stage"] == 0:
            files = sorted((directory / TAG).glob("mp_rank_*_model_states.pt"))
            state = load_checked(files[0], extra_types=checkpoint_types())["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
        for name, param in self.module.named_parameters():
            if name not in state:
                continue
            partitioned = hasattr(param, "ds_id")  # ZeRO-3: rank 0 writes, DeepSpeed re-partitions
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if self.context.is_main or not partitioned:
                    param.data.copy_(state[name].to(param.dtype))
        restore = getattr(self._ds.optimizer, "_restore_from_bit16_weights", None)
        if callable(restore):  # keep the fp32 master partitions in step with the loaded weights
            restore()
        log.info(
            "loaded consolidated weights of %s (written by %d ranks, ZeRO-%d); optimizer state not restored",
            directory,
            saved["world_size"],
            saved["zero_stage"],
        )

    # ------------------------------------------------------------------ export
    def _full_value(self, deepspeed: Any, param: nn.Parameter) -> torch.Tensor | None:
        """The whole parameter on rank 0 (``None`` elsewhere); fp32 masters where DeepSpeed keeps them.

        Collective under ZeRO: every rank calls it for the same parameters in the same order.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        if param.requires_grad and param.dtype != torch.float32:
            master = safe_get_full_fp32_param(param)
            if master is not None:
                return master.detach().cpu() if self.context.is_main else None
        if hasattr(param, "ds_id"):  # ZeRO-3 partition: gather this one parameter, read-only
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.detach().cpu().clone() if self.context.is_main else None
        return param.detach().cpu() if self.context.is_main else None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The state dict that is exported, on rank 0 (``None`` elsewhere); every rank must call this.

        With frozen parameters (PEFT) only the trainable ones are gathered: an adapter export never pulls
        the frozen base model onto rank 0.
        """
        deepspeed = _import_deepspeed()
        frozen = self._has_frozen()
        gathered: dict[int, torch.Tensor | None] = {}
        for _, param in self.module.named_parameters():  # de-duplicated: tied weights once
            if not frozen or param.requires_grad:
                gathered[id(param)] = self._full_value(deepspeed, param)
        if not self.context.is_main:
            return None
        state: dict[str, torch.Tensor] = {}
        for key, tensor in self.module.state_dict(keep_vars=True).items():
            if id(tensor) in gathered:
                state[key] = gathered[id(tensor)]
            elif not frozen and not isinstance(tensor, nn.Parameter):  # buffers
                state[key] = tensor.detach().cpu()
        return state

    def export(self, directory: Path) -> None:
        state = self.full_state_dict()
        if self.context.is_main:
            dtype = _DTYPES[self.config.model.dtype]
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            directory.mkdir(parents=True, exist_ok=True)
            self.module.save_pretrained(directory, state_dict=state)
            _record_dtype(directory / "config.json", self.config.model.dtype)
        self.context.barrier()

    # ------------------------------------------------------------------ memory
    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameter, gradient and optimizer state this rank holds, counted from its tensors.

        Parameters: the module's tensors (under ZeRO-3 the partitions ``ds_tensor`` plus any gathered or
        persistent full tensors). Gradients: ``.grad`` of module parameters and of the fp32 partitions,
        and ZeRO's partitioned gradient buffers. Optimizer states: the fp32 master partitions and the
        AdamW moments. Memory shared between categories is counted once (parameters first).
        """
        tally = _TensorTally()
        params = list(self.module.parameters())
        held = [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]
        parameters = tally.add(held)
        zero = self._ds.optimizer
        masters = _flatten(getattr(zero, "single_partition_of_fp32_groups", None))
        masters += _flatten(getattr(zero, "fp32_partitioned_groups_flat", None))
        grads = [p.grad for p in params] + [m.grad for m in masters]
        grads += _flatten(getattr(zero, "averaged_gradients", None))
        grads += _flatten(getattr(zero, "grad_partitions_flat_buffer", None))
        gradients = tally.add(grads)
        inner = getattr(zero, "optimizer", zero)
        moments = [t for s in getattr(inner, "state", {}).values() for t in _flatten(s) if t.ndim > 0]
        optimizer_states = tally.add(masters + moments)
        return {"parameters": parameters, "gradients": gradients, "optimizer_states": optimizer_states}


# --------------------------------------------------------------------------- DeepSpeed's estimator
def deepspeed_estimate(model: nn.Module, config: JobConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's own estimate of the model-state bytes one rank holds (``dft plan --validate``).

    ``estimate_zero{2,3}_model_states_mem_needs`` on ``model_to_params(model)`` (the numbers behind the
    ``..._all_live`` tables, whose print-out is kept as well). They assume mixed-precision Adam, count every
    parameter as trainable (LoRA is estimated like full fine-tuning) and include no activations; there is
    no estimator for ZeRO stages 0 and 1.

    Args:
        model: The model before ``deepspeed.initialize`` (full parameters, PEFT applied).
        config: The job config (ZeRO stage and offload settings).
        world_size: Ranks, all on one node.
    """
    stage = config.deepspeed.zero_stage if config.run.engine == "deepspeed" else 0
    if stage < 2:
        return {
            "name": "DeepSpeed estimator",
            "model_states": None,
            "note": f"DeepSpeed has no estimator for ZeRO-{stage} (only ZeRO-2 and ZeRO-3)",
        }
    offload_opt, offload_param = config.deepspeed.offload_optimizer, config.deepspeed.offload_param
    printed = io.StringIO()
    if stage == 2:
        from deepspeed.runtime.zero import stage_1_and_2 as zero2

        total = zero2.model_to_params(model)
        host, device = zero2.estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=world_size, num_nodes=1, cpu_offload=offload_opt
        )
        with contextlib.redirect_stdout(printed):
            zero2.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=world_size)
        name, largest = "estimate_zero2_model_states_mem_needs_all_live", None
    else:
        from deepspeed.runtime.zero import stage3 as zero3

        total, largest = zero3.model_to_params(model)
        host, device, _ = zero3.estimate_zero3_model_states_mem_needs(
            total,
            largest,
            num_gpus_per_node=world_size,
            num_nodes=1,
            cpu_offload=offload_opt,
            cpu_offload_params=offload_param,
            zero_init=False,
        )
        with contextlib.redirect_stdout(printed):
            zero3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=world_size)
        name = "estimate_zero3_model_states_mem_needs_all_live"
    offloaded = offload_opt or offload_param
    per_rank = device + (host // world_size if offloaded else 0)
    note = "per-GPU figure" + (
        " + the node's host figure / ranks (offload; includes its 1.5x buffer factor)" if offloaded else ""
    )
    return {
        "name": name,
        "model_states": int(per_rank),
        "device_bytes": int(device),
        "host_bytes_per_node": int(host),
        "total_params": int(total),
        "largest_layer_params": largest,
        "note": note,
        "printed": printed.getvalue(),
    }
