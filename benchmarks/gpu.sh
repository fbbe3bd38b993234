#!/usr/bin/env bash
# The GPU check, prepared for a lent GPU machine (one NVIDIA H200, no network), run from the repository root:
#
#   make gpu-wheels                       # here, once: builds .gpu-wheels/ (about 49 MiB)
#   run(command="bash benchmarks/gpu.sh", carry=[".gpu-wheels"], timeout_s=540)   # the device tool
#
# 1. installs the carried wheels that the machine lacks (deepspeed, seqeval, pydantic, ...; offline, no
#    dependencies resolved) and the repository itself (editable; PYTHONPATH covers a failed install);
# 2. prints nvidia-smi;
# 3. runs the GPU test suite: python -m pytest -m gpu tests/gpu -q -rs   (output also in $OUT/gpu-suite.txt);
# 4. runs the GPU benchmark: python benchmarks/gpu_bench.py --out ${OUT:-benchmarks/results}.
# The benchmark runs even when a test fails; the exit status is non-zero when either failed. The whole
# script stays under GPU_BUDGET_S seconds (470 by default: under 8 minutes). GPU_QUICK=1 runs the
# benchmark's --quick variant; PYTHON=... picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
BUDGET_S=${GPU_BUDGET_S:-470}
SUITE_TIMEOUT_S=${GPU_SUITE_TIMEOUT_S:-240}
PY=${PYTHON:-$(command -v python3 || command -v python)}
RESULTS=${OUT:-benchmarks/results}
SUITE_LOG=${OUT:+$OUT/gpu-suite.txt}
SUITE_LOG=${SUITE_LOG:-${TMPDIR:-/tmp}/gpu-suite.txt}
SITE=${TMPDIR:-/tmp}/dft-gpu-site
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elapsed() { echo $(($(date +%s) - START)); }

echo "== $(date -Is) $(hostname): $PY ($("$PY" --version 2>&1)), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# ---------------------------------------------------------------- 1. offline installs
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  # only the wheels whose distribution is not installed already (the image's own versions win)
  mapfile -t MISSING < <("$PY" - <<'EOF'
import glob
import importlib.metadata as metadata
import os

for path in sorted(glob.glob(".gpu-wheels/*.whl")):
    name = os.path.basename(path).split("-")[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(path)
EOF
  )
  if [ "${#MISSING[@]}" -gt 0 ]; then
    echo "== installing ${#MISSING[@]} carried wheels: ${MISSING[*]##*/}"
    if ! "$PY" -m pip install --quiet --no-deps --no-index "${MISSING[@]}"; then
      echo "   pip could not install into the interpreter's site-packages; using --target $SITE"
      "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" "${MISSING[@]}"
      export PYTHONPATH="$PYTHONPATH:$SITE"
    fi
  else
    echo "== every carried wheel is installed already"
  fi
else
  echo "== no .gpu-wheels/ (build it with: make gpu-wheels; carry it with the run): nothing installed"
fi
if "$PY" -m pip install --quiet --no-deps --no-index --find-links .gpu-wheels/build -e . 2>/dev/null \
  || "$PY" -m pip install --quiet --no-deps --no-index --no-build-isolation -e . 2>/dev/null; then
  echo "== installed the repository (editable)"
else
  echo "== could not pip install the repository offline; it is used from PYTHONPATH=$PWD"
fi
# seqeval imports sklearn.exceptions only; if scikit-learn cannot be imported here (its wheels were left
# out, or they do not match this numpy), a stand-in module with that one warning class takes its place.
if ! "$PY" -c "import seqeval.metrics" 2>/dev/null && "$PY" -c "import seqeval" 2>/dev/null; then
  mkdir -p "$SITE-shim/sklearn"
  : >"$SITE-shim/sklearn/__init__.py"
  echo "class UndefinedMetricWarning(UserWarning): ..." >"$SITE-shim/sklearn/exceptions.py"
  export PYTHONPATH="$PYTHONPATH:$SITE-shim"
  echo "== scikit-learn is not importable: seqeval uses a stand-in sklearn.exceptions ($SITE-shim)"
fi
"$PY" - <<'EOF'
import importlib
import importlib.metadata as metadata

for name in ("torch", "transformers", "accelerate", "peft", "pydantic", "seqeval", "deepspeed", "ray"):
    try:
        importlib.import_module(name)
        print(f"   {name} {metadata.version(name)}")
    except Exception as exc:  # noqa: BLE001 - report, do not stop
        print(f"   {name}: not importable ({type(exc).__name__}: {exc})")
import torch

print(f"   CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s), available={torch.cuda.is_available()}")
EOF

# ---------------------------------------------------------------- 2. the device
echo "== nvidia-smi"
nvidia-smi || echo "   nvidia-smi failed (exit $?)"

# ---------------------------------------------------------------- 3. the GPU suite
echo "== GPU suite (timeout ${SUITE_TIMEOUT_S} s), output also in $SUITE_LOG   [$(elapsed) s]"
timeout --kill-after=15 "$SUITE_TIMEOUT_S" "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 \
  | tee "$SUITE_LOG"
SUITE_RC=${PIPESTATUS[0]}
echo "== GPU suite exit $SUITE_RC   [$(elapsed) s]"

# ---------------------------------------------------------------- 4. the benchmark
LEFT=$((BUDGET_S - $(elapsed)))
if [ "$LEFT" -lt 60 ]; then
  echo "== GPU benchmark not run: only $LEFT s of the ${BUDGET_S} s budget left"
  BENCH_RC=1
else
  echo "== GPU benchmark (budget $((LEFT - 15)) s) -> $RESULTS"
  timeout --kill-after=15 "$LEFT" "$PY" benchmarks/gpu_bench.py --out "$RESULTS" --budget-s $((LEFT - 15)) \
    ${GPU_QUICK:+--quick}
  BENCH_RC=$?
fi
echo "== done in $(elapsed) s: GPU suite exit $SUITE_RC, GPU benchmark exit $BENCH_RC"
[ "$SUITE_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
