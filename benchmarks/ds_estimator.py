"""DeepSpeed's own model-state memory estimators, for comparison with the planner and the measurement.

``estimate_zero2_model_states_mem_needs_all_live`` / ``estimate_zero3_model_states_mem_needs_all_live``
only print a table; their numbers come from ``estimate_zero{2,3}_model_states_mem_needs`` applied to
``model_to_params(model)``, which is what is called here (the printed table is kept as well). They assume
mixed-precision Adam (2 bytes of 16-bit weights, 16 of gradients + fp32 master + moments, spread over the
GPUs), count every parameter as trainable (so LoRA is estimated like full fine-tuning) and include no
activations. There is no estimator for ZeRO stages 0 and 1.

This module is outside the package on purpose: only ``engine/deepspeed_engine.py`` may import DeepSpeed
inside ``distributed_ft``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any


def deepspeed_estimate(model: Any, config: Any, world_size: int) -> dict[str, Any]:
    """DeepSpeed's estimate of the model-state bytes one rank holds (``validate_plan``'s ``reference``).

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
