#!/usr/bin/env bash
# Build .gpu-wheels/ HERE (a machine that reaches the package registry) for benchmarks/gpu.sh.
#
# The lent GPU machine has no network; its Python 3.12 image has torch (CUDA), transformers, accelerate,
# peft, pyarrow, tensorboard, psutil and pytest, but not what else the library and its GPU tests import:
#   deepspeed (+ hjson, ninja, py-cpuinfo, msgpack, einops, pydantic at import), seqeval (+ scikit-learn,
#   whose sklearn.exceptions it imports, + scipy, joblib, threadpoolctl), pydantic (+ pydantic-core,
#   annotated-types, typing-inspection).
# deepspeed and seqeval ship as source only and are built into py3-none-any wheels; the rest are
# downloaded as cp312 manylinux x86_64 wheels. setuptools goes to .gpu-wheels/build/ (not installed
# there: the isolated build of `pip install -e .` finds it with --find-links). Ray's wheel (~79 MB) is not
# carried: the Ray GPU test reports itself as not run. Everything must stay under GPU_WHEELS_LIMIT_MIB
# (60 MiB by default): the device tool carries at most 64 MiB per call, the repository included.
#
# Usage: bash benchmarks/gpu_wheels.sh   (or: make gpu-wheels); PYTHON=... picks the interpreter (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.gpu-wheels
LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-60}
TARGET=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)

# The version installed here (tested with the library) when there is one, else the newest.
pin() {
  local version
  version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null) || true
  if [ -n "$version" ]; then echo "$1==$version"; else echo "$1"; fi
}

# pip's warnings about this machine's own index settings are noise here
quiet_pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

rm -rf "$OUT"
mkdir -p "$OUT/build"
echo "== building deepspeed and seqeval (source-only) into py3-none-any wheels"
quiet_pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8 seqeval==1.2.2
echo "== downloading cp312 manylinux x86_64 wheels"
quiet_pip download --quiet "${TARGET[@]}" -d "$OUT" \
  "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
  "$(pin hjson)" "$(pin ninja)" "$(pin py-cpuinfo)" "$(pin msgpack)" "$(pin einops)" \
  "$(pin scikit-learn)" "$(pin scipy)" "$(pin joblib)" "$(pin threadpoolctl)"
quiet_pip download --quiet --only-binary=:all: --no-deps -d "$OUT/build" "$(pin setuptools)"

wheels=("$OUT"/*.whl "$OUT"/build/*.whl)
for wheel in "${wheels[@]}"; do
  awk -v b="$(wc -c <"$wheel")" -v f="$wheel" 'BEGIN { printf "%10.2f MiB  %s\n", b / 1048576, f }'
done
bytes=$(cat "${wheels[@]}" | wc -c)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "total: $mib MiB in ${#wheels[@]} wheels (limit $LIMIT_MIB MiB)"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: .gpu-wheels/ is larger than $LIMIT_MIB MiB; the device tool cannot carry it" >&2
  exit 1
fi
