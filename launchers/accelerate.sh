#!/usr/bin/env bash
# Train under accelerate launch: launchers/accelerate.sh [RECIPE|CONFIG.yaml] [key=value ...]
# Config: ACCELERATE_CONFIG (default cluster_configs/accelerate/cpu_2proc.yaml: 2 processes on CPU);
# MAIN_PROCESS_PORT overrides the config's port. See launchers/README.md.
set -euo pipefail
exec accelerate launch \
  --config_file "${ACCELERATE_CONFIG:-$(dirname "$0")/../cluster_configs/accelerate/cpu_2proc.yaml}" \
  ${MAIN_PROCESS_PORT:+--main_process_port "$MAIN_PROCESS_PORT"} \
  -m distributed_ft train "$@"
