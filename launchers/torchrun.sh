#!/usr/bin/env bash
# Train under torchrun: launchers/torchrun.sh [RECIPE|CONFIG.yaml] [key=value ...]
# Processes per node: NPROC_PER_NODE (default auto: one per GPU, else one per CPU core).
# Several nodes: run it on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set.
# Restarts (e.g. after run.hang_timeout_s fires): MAX_RESTARTS (default 0); each resumes from the last checkpoint.
# See launchers/README.md.
set -euo pipefail
# restarted gloo ranks otherwise may dial peers of the previous attempt (pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec torchrun \
  --max-restarts "${MAX_RESTARTS:-0}" \
  --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" \
  --nproc_per_node "${NPROC_PER_NODE:-auto}" \
  -m distributed_ft train "$@"
