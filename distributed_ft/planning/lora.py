"""LoRA on a model shape: which modules PEFT would wrap and how many parameters the adapters add."""

from __future__ import annotations

import re
from collections.abc import Iterable

from distributed_ft.errors import ConfigError
from distributed_ft.modeling.targets import LORA_TARGETS
from distributed_ft.planning.models import ModelShape, ModuleSpec


def _is_output_layer(spec: ModuleSpec, shape: ModelShape) -> bool:
    return spec.kind != "embedding" and spec.out_features == shape.output_size and "." not in spec.name


def lora_target_modules(shape: ModelShape, targets: Iterable[str] | str | None) -> list[ModuleSpec]:
    """The modules PEFT would wrap with LoRA for ``targets``.

    A list matches a module whose name equals an entry or ends with ``.<entry>``; a single string other
    than ``all-linear`` is a full-match regular expression; ``all-linear`` is every Linear/Conv1D except
    the output layer; ``None`` uses PEFT's default for the architecture.
    """
    if targets is None:
        if shape.model_type not in LORA_TARGETS:
            raise ConfigError(
                f"no default LoRA targets for model type {shape.model_type!r}; set peft.target_modules"
            )
        targets = LORA_TARGETS[shape.model_type]
    if isinstance(targets, str) and targets != "all-linear":
        pattern = re.compile(targets)
        return [m for m in shape.modules if pattern.fullmatch(m.name)]
    wanted = [targets] if isinstance(targets, str) else list(targets)
    if "all-linear" in wanted:
        return [m for m in shape.modules if m.kind != "embedding" and not _is_output_layer(m, shape)]
    return [m for m in shape.modules if any(m.name == t or m.name.endswith("." + t) for t in wanted)]


def lora_trainable_params(shape: ModelShape, r: int, targets: Iterable[str] | str | None = None) -> int:
    """LoRA adapter parameters: ``r * (in + out)`` per targeted module (A is r x in, B is out x r).

    Raises:
        ConfigError: when no module matches ``targets``.
    """
    matched = lora_target_modules(shape, targets)
    if not matched:
        raise ConfigError(f"peft.target_modules {targets!r} match no module of {shape.name}")
    return sum(r * (m.in_features + m.out_features) for m in matched)
