"""Render the DeepSpeed JSON from the typed job config, optionally starting from a user's JSON file.

The job config is the single source of truth for every value the loop also depends on (micro-batch,
accumulation, clipping, precision, ZeRO stage, offload, optimizer hyper-parameters). A user file given
with ``deepspeed.config=FILE.json`` may add anything else (bucket sizes, ``overlap_comm``, ...); a value
in it that is also set by the job config must agree with it, or rendering fails with a
:class:`ConfigError` naming both keys and both values. ``"auto"`` (the Hugging Face convention) takes the
job's value. Nothing is left as ``"auto"`` in the result.

The ``optimizer`` and ``scheduler`` sections of a user file are checked and then dropped: the engine
always passes torch's ``AdamW`` and the schedule of ``train.scheduler`` to ``deepspeed.initialize``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_ft.config.schema import JobConfig
from distributed_ft.errors import ConfigError

AUTO = "auto"
QUIET_STEPS = 2**31 - 1
"""``steps_per_print``: DeepSpeed's own progress lines are silenced (the loop logs)."""
TORCH_ADAMW = {"betas": [0.9, 0.999], "eps": 1e-8}
"""torch.optim.AdamW defaults (not configurable in the job config)."""
_ADAM_TYPES = {"adam", "adamw"}


@dataclass(frozen=True)
class _Tie:
    """A key of the DeepSpeed JSON whose value the job config determines."""

    file_key: str
    job_key: str
    job_value: Any
    ds_value: Any
    same: Callable[[Any, Any], bool] = lambda file_value, ds_value: file_value == ds_value


def _offload_on(file_value: Any, ds_value: Any) -> bool:
    """An offload ``device`` agrees when both offload (``cpu``/``nvme``) or neither does (``none``)."""
    return (str(file_value).lower() in ("cpu", "nvme")) == (ds_value != "none")


def _close(file_value: Any, ds_value: Any) -> bool:
    if isinstance(file_value, list | tuple) and isinstance(ds_value, list | tuple):
        return len(file_value) == len(ds_value) and all(map(_close, file_value, ds_value))
    if isinstance(file_value, bool) or not isinstance(file_value, int | float):
        return False
    return math.isclose(float(file_value), float(ds_value), rel_tol=1e-12, abs_tol=0.0)


def _ties(config: JobConfig, world_size: int) -> list[_Tie]:
    train, ds = config.train, config.deepspeed
    precision = train.mixed_precision
    return [
        _Tie("train_micro_batch_size_per_gpu", "train.batch_size", train.batch_size, train.batch_size),
        _Tie("gradient_accumulation_steps", "train.grad_accum", train.grad_accum, train.grad_accum),
        _Tie(
            "train_batch_size",
            f"train.batch_size x train.grad_accum x world size {world_size}",
            train.batch_size * train.grad_accum * world_size,
            train.batch_size * train.grad_accum * world_size,
        ),
        _Tie(
            "gradient_clipping",
            "train.max_grad_norm",
            train.max_grad_norm,
            train.max_grad_norm or 0.0,
            _close,
        ),
        _Tie("zero_optimization.stage", "deepspeed.zero_stage", ds.zero_stage, ds.zero_stage),
        _Tie(
            "zero_optimization.offload_optimizer.device",
            "deepspeed.offload_optimizer",
            ds.offload_optimizer,
            "cpu" if ds.offload_optimizer else "none",
            _offload_on,
        ),
        _Tie(
            "zero_optimization.offload_param.device",
            "deepspeed.offload_param",
            ds.offload_param,
            "cpu" if ds.offload_param else "none",
            _offload_on,
        ),
        _Tie("bf16.enabled", "train.mixed_precision", precision, precision == "bf16"),
        _Tie("fp16.enabled", "train.mixed_precision", precision, precision == "fp16"),
        _Tie("optimizer.params.lr", "train.lr", train.lr, train.lr, _close),
        _Tie(
            "optimizer.params.weight_decay",
            "train.weight_decay",
            train.weight_decay,
            train.weight_decay,
            _close,
        ),
        _Tie(
            "optimizer.params.betas",
            "(torch AdamW betas)",
            TORCH_ADAMW["betas"],
            TORCH_ADAMW["betas"],
            _close,
        ),
        _Tie("optimizer.params.eps", "(torch AdamW eps)", TORCH_ADAMW["eps"], TORCH_ADAMW["eps"], _close),
        _Tie(
            "zero_force_ds_cpu_optimizer",
            "run.engine=deepspeed (torch AdamW, also with offload)",
            False,
            False,
        ),
    ]


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _from_job(config: JobConfig, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config the job config alone implies."""
    train, ds = config.train, config.deepspeed
    if train.mixed_precision == "fp16" and device_type != "cuda":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    pin = device_type == "cuda"
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "fp16": {"enabled": train.mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def read_user_config(path: str) -> dict[str, Any]:
    """The JSON object in ``path`` (``deepspeed.config``)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"deepspeed.config={path!r} does not exist; give a DeepSpeed JSON file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config={path!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config={path!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_optimizer_sections(user: dict[str, Any], name: str) -> None:
    optimizer = user.get("optimizer")
    if optimizer is not None:
        kind = str(optimizer.get("type", AUTO))
        if kind != AUTO and kind.lower() not in _ADAM_TYPES:
            raise ConfigError(
                f"{name}: optimizer.type={kind!r} conflicts with run.engine=deepspeed, which trains with "
                "torch AdamW (train.lr, train.weight_decay); remove the optimizer section or use AdamW"
            )
        unknown = sorted(
            set(optimizer.get("params", {})) - {"lr", "weight_decay", "betas", "eps", "torch_adam"}
        )
        if unknown:
            raise ConfigError(
                f"{name}: optimizer.params {unknown} have no job-config counterpart (torch AdamW is used); "
                "remove them from the file"
            )
    scheduler = user.get("scheduler")
    if scheduler is not None:
        fixed = {k: v for k, v in scheduler.get("params", {}).items() if v != AUTO}
        if fixed:
            raise ConfigError(
                f"{name}: scheduler.params {fixed} conflict with the job's schedule (train.scheduler, "
                'train.warmup_ratio, train.lr); remove the scheduler section or set its params to "auto"'
            )


def _merge_untied(target: dict[str, Any], user: dict[str, Any], prefix: str = "") -> None:
    """Copy the user's values into ``target`` except ``auto`` ones (tied keys are checked before)."""
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if dotted in ("optimizer", "scheduler"):
            continue
        if isinstance(value, dict):
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
            _merge_untied(child, value, f"{dotted}.")
        elif value != AUTO:
            target[key] = value
        elif key not in target:
            target[key] = AUTO  # resolved (or refused) by _resolve_auto


def _resolve_auto(rendered: dict[str, Any], hidden_size: int | None, name: str) -> None:
    """Replace the ``auto`` bucket sizes Hugging Face configs use; refuse any other ``auto``."""
    zero = rendered.get("zero_optimization", {})
    if hidden_size:
        sizes = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "allgather_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
        for key, value in sizes.items():
            if zero.get(key) == AUTO:
                zero[key] = value
    left = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value == AUTO and not (hidden_size is None and prefix == "zero_optimization."):
                left.append(f"{prefix}{key}")

    walk(rendered, "")
    if left:
        raise ConfigError(f'{name}: cannot resolve "auto" for {", ".join(left)}; give numbers in the file')


def render_deepspeed_config(
    config: JobConfig, world_size: int, device_type: str = "cpu", hidden_size: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize``.

    Args:
        config: The job config.
        world_size: Data-parallel ranks (``train_batch_size`` = micro-batch x accumulation x ranks).
        device_type: ``cuda`` or ``cpu`` (fp16 and pinned memory need a GPU).
        hidden_size: The model's hidden size, to resolve ``"auto"`` bucket sizes of a user file
            (``hidden_size**2`` like Hugging Face). ``None`` leaves them ``"auto"``: a conflict check
            before the model is loaded.

    Raises:
        ConfigError: A value of the user file conflicts with the job config, or cannot be resolved.
    """
    rendered = _from_job(config, world_size, device_type)
    if config.deepspeed.config is None:
        return rendered
    name = config.deepspeed.config
    user = read_user_config(name)
    _check_optimizer_sections(user, name)
    for tie in _ties(config, world_size):
        value = _get(user, tie.file_key)
        if value is None or value == AUTO:
            continue
        if not tie.same(value, tie.ds_value):
            raise ConfigError(
                f"{name}: {tie.file_key}={json.dumps(value)} conflicts with {tie.job_key}={tie.job_value!r} "
                f"of the job config; make them agree (change {tie.job_key} or remove {tie.file_key} from "
                'the file; "auto" takes the job\'s value)'
            )
    merged = copy.deepcopy(rendered)
    _merge_untied(merged, user)
    for tie in _ties(config, world_size):  # tied keys always carry the job's value in DeepSpeed's terms
        if tie.file_key.startswith(("optimizer.", "zero_optimization.offload")):
            continue
        _set(merged, tie.file_key, tie.ds_value)
    for section in ("offload_optimizer", "offload_param"):  # the job decides whether offload is on
        if _get(rendered, f"zero_optimization.{section}") is None:
            merged["zero_optimization"].pop(section, None)
    _resolve_auto(merged, hidden_size, name)
    return merged
