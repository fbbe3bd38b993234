"""Engines: how one optimisation step is executed (plain torch / DDP, or DeepSpeed ZeRO)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed_ft.config.schema import JobConfig
    from distributed_ft.engine.base import Engine
    from distributed_ft.runtime.context import RuntimeContext


def build_engine(config: JobConfig, context: RuntimeContext) -> Engine:
    """The engine ``run.engine`` names; DeepSpeed is imported only when asked for."""
    if config.run.engine == "deepspeed":
        from distributed_ft.engine.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(config, context)
    from distributed_ft.engine.torch_engine import TorchEngine

    return TorchEngine(config, context)
