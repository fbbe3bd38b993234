#!/usr/bin/env bash
# Train under torchrun: launchers/torchrun.sh [RECIPE|CONFIG.yaml] [key=value ...]
# Processes per node: NPROC_PER_NODE (default auto: one per GPU, else one per CPU core).
# Several nodes: run it on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set.
# See launchers/README.md.
set -euo pipefail
exec torchrun \
  --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" \
  --nproc_per_node "${NPROC_PER_NODE:-auto}" \
  -m distributed_ft train "$@"
