#!/usr/bin/env bash
# Compile-only check of csrc/ for CI machines without a GPU: every .cu for sm_80 and sm_90 with the installed nvcc,
# and bindings.cpp with the host compiler, against the headers of the torch 2.11.0 wheel (the cu130 build the GPU
# machines run), with the flags torch's CUDAExtension uses. Objects only: a CPU torch cannot link a CUDAExtension.
#
# The headers are downloaded once (pip download, ~530 MB wheel, only torch/include is kept, ~60 MB) into
# ${XDG_CACHE_HOME:-~/.cache}/ceu. Exits non-zero on any compile error; skips (exit 0) where nvcc is absent.
# Environment: NVCC, CXX, PYTHON (for pip and Python.h), JOBS (parallel compiles, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/ceu"
HEADERS="$CACHE_DIR/torch-$TORCH_VERSION-include"
NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
CXX="${CXX:-c++}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
started=$SECONDS

if [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: SKIPPED, nvcc not found (set NVCC or CUDA_HOME to check the CUDA sources)"
  exit 0
fi

unpack_headers() {  # $1: a staging directory; downloads the wheel there and extracts only torch/include
  "$PYTHON" -m pip download -q "torch==$TORCH_VERSION" --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d "$1" &&
    "$PYTHON" -c '
import sys
import zipfile

wheel, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    archive.extractall(target, [name for name in archive.namelist() if name.startswith("torch/include/")])
' "$1"/torch-*.whl "$1"
}

fetch_headers() {
  echo "check_cuda_compile: fetching the torch==$TORCH_VERSION headers into $HEADERS (once)"
  mkdir -p "$CACHE_DIR"
  local staging
  staging="$(mktemp -d "$CACHE_DIR/fetch.XXXXXX")"
  if ! unpack_headers "$staging"; then
    rm -rf "$staging"
    echo "check_cuda_compile: FAILED to fetch the torch==$TORCH_VERSION wheel"
    exit 1
  fi
  # A concurrent run may have published its copy first; either one is complete.
  mv -T "$staging/torch/include" "$HEADERS" 2>/dev/null || [ -f "$HEADERS/torch/extension.h" ]
  rm -rf "$staging"
}

[ -f "$HEADERS/torch/extension.h" ] || fetch_headers

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
COMMON=(-std=c++17 -O3 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1
        -I"$HEADERS" -I"$HEADERS/torch/csrc/api/include")
NVCC_FLAGS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
            -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --compiler-options -fPIC)
PYTHON_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"

sources=(csrc/*.cpp csrc/*.cu)  # bindings.cpp first: the longest compile
skipped=()
if [ ! -f "$PYTHON_INCLUDE/Python.h" ]; then
  sources=(csrc/*.cu)
  skipped+=("csrc/*.cpp (no Python.h for $PYTHON)")
fi

compile() {
  local source="$1" name begin=$SECONDS status=0
  name="$(basename "$source")"
  case "$source" in
    *.cu) "$NVCC" "${NVCC_FLAGS[@]}" "${COMMON[@]}" -c "$source" -o "$OUT/$name.o" ;;
    *) "$CXX" "${COMMON[@]}" -fPIC -I"$PYTHON_INCLUDE" -c "$source" -o "$OUT/$name.o" ;;
  esac > "$OUT/$name.log" 2>&1 || status=$?
  echo "$status $((SECONDS - begin))" > "$OUT/$name.status"
}

for source in "${sources[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do
    wait -n || true
  done
  compile "$source" &
done
wait

failed=0
echo "check_cuda_compile: nvcc $("$NVCC" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)," \
  "torch $TORCH_VERSION headers, sm_80 + sm_90"
for source in "${sources[@]}"; do
  name="$(basename "$source")"
  read -r status seconds < "$OUT/$name.status"
  if [ "$status" -eq 0 ]; then
    echo "  ok      $source (${seconds}s)"
  else
    echo "  FAILED  $source (exit $status)"
    sed 's/^/    /' "$OUT/$name.log"
    failed=1
  fi
done
for note in "${skipped[@]}"; do
  echo "  skipped $note"
done
echo "check_cuda_compile: $([ "$failed" -eq 0 ] && echo passed || echo FAILED) in $((SECONDS - started))s"
exit "$failed"
