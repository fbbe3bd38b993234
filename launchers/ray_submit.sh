#!/usr/bin/env bash
# Submit `dft train [RECIPE|CONFIG.yaml] [key=value ...]` as a Ray job and wait for it.
#   RAY_ADDRESS=http://HEAD:8265 launchers/ray_submit.sh ner-conll2003 run.num_workers=4 run.use_gpu=true
# The working directory (this repository) is uploaded without data, runs, results and virtualenvs; the job
# runs `python -m distributed_ft train ... run.backend=ray` on the cluster. Exits non-zero when the job fails.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME_ENV='{"excludes": [".git", ".venv", "venv", "runs", "data", "benchmarks/results", "*.parquet", "*.safetensors", "*.bin", "__pycache__"], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}'
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- python -m distributed_ft train "$@" run.backend=ray
