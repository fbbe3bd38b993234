#!/usr/bin/env bash
# Train under the deepspeed launcher: launchers/deepspeed.sh [RECIPE|CONFIG.yaml] [key=value ...]
# Pass run.engine=deepspeed (and deepspeed.*) among the overrides. Processes: NUM_ACCELERATORS
# (default: every GPU; on a machine without GPUs set it, e.g. NUM_ACCELERATORS=2, or the launcher
# starts one process per NUMA node). Several nodes: HOSTFILE. See launchers/README.md.
set -euo pipefail
exec deepspeed \
  ${HOSTFILE:+--hostfile "$HOSTFILE"} \
  ${NUM_ACCELERATORS:+--num_accelerators "$NUM_ACCELERATORS"} \
  --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank \
  --module distributed_ft train "$@"
