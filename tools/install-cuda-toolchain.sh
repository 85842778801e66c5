#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, cicc, ptxas, headers) from PyPI into a venv and
# prints the CUDA_HOME to build with:
#
#   export CUDA_HOME="$(tools/install-cuda-toolchain.sh)"
#   cargo build --features cuda
#
# Every package is pinned: newer nvcc emits PTX (ISA > 9.0) that the GPU machines' driver 580
# rejects, and an unpinned dependency pulls in 13.x parts of mixed versions. Installs with
# --no-deps so pip cannot resolve anything beyond this list.
#
# Idempotent: a finished install (stamp file naming exactly these pins, nvcc answering) is
# reused. Progress goes to stderr; stdout carries the CUDA_HOME path alone.
# Location: ${REPSHIELD_HOME:-~/.cache/repshield}/cuda-toolchain, `cuda` inside it is CUDA_HOME.
set -euo pipefail

PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)

ROOT="${REPSHIELD_HOME:-$HOME/.cache/repshield}/cuda-toolchain"
VENV="$ROOT/venv"
STAMP="$ROOT/installed-pins.txt"
CUDA_HOME_LINK="$ROOT/cuda"
PYTHON="${PYTHON:-python3}"

log() { echo "install-cuda-toolchain: $*" >&2; }

# A tiny kernel that exercises what the real ones need: bf16 headers, the async-copy pipeline
# header and inline PTX for tensor-core mma, down to SASS for sm_80 and sm_90.
check_toolchain() {
  local home="$1" tmp
  [ -x "$home/bin/nvcc" ] && [ -x "$home/bin/ptxas" ] || return 1
  tmp="$(mktemp -d)"
  cat >"$tmp/probe.cu" <<'EOF'
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
extern "C" __global__ void probe_bf16(const __nv_bfloat16* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __bfloat162float(x[i]) * 2.0f;
}
EOF
  if ! "$home/bin/nvcc" -ptx -arch=compute_80 -o "$tmp/probe.ptx" "$tmp/probe.cu" >"$tmp/log" 2>&1 ||
    ! "$home/bin/ptxas" -arch=sm_80 -o "$tmp/probe80.cubin" "$tmp/probe.ptx" >>"$tmp/log" 2>&1 ||
    ! "$home/bin/ptxas" -arch=sm_90 -o "$tmp/probe90.cubin" "$tmp/probe.ptx" >>"$tmp/log" 2>&1; then
    cat "$tmp/log" >&2
    rm -rf "$tmp"
    return 1
  fi
  rm -rf "$tmp"
}

want_stamp="$(printf '%s\n' "${PINS[@]}")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] && check_toolchain "$CUDA_HOME_LINK"; then
  log "already installed ($("$CUDA_HOME_LINK/bin/nvcc" --version | tail -n 2 | head -n 1))"
  echo "$CUDA_HOME_LINK"
  exit 0
fi

command -v "$PYTHON" >/dev/null || {
  log "$PYTHON not found: a Python 3 with pip is needed to install nvcc from PyPI"
  exit 1
}

mkdir -p "$ROOT"
rm -f "$STAMP"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  if ! "$PYTHON" -m venv "$VENV" >&2; then
    log "python3 -m venv failed (Debian: apt-get install python3-venv)"
    exit 1
  fi
fi

log "installing ${PINS[*]}"
"$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
  --no-deps "${PINS[@]}" >&2

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
REAL_HOME="$SITE/nvidia/cu13"
[ -x "$REAL_HOME/bin/nvcc" ] || {
  log "nvcc not found at $REAL_HOME/bin/nvcc after the install"
  exit 1
}
# nvcc finds cicc (nvvm/bin), libdevice, its headers and ptxas relative to itself through
# bin/nvcc.profile, so the wheel layout works as a CUDA_HOME as it is; the link only gives it
# a path that does not depend on the Python version.
ln -sfn "$REAL_HOME" "$CUDA_HOME_LINK"

if ! check_toolchain "$CUDA_HOME_LINK"; then
  log "the installed nvcc cannot compile a probe kernel to PTX and SASS (sm_80, sm_90)"
  exit 1
fi
echo "$want_stamp" >"$STAMP"
log "ok: $("$CUDA_HOME_LINK/bin/nvcc" --version | tail -n 2 | head -n 1)"
echo "$CUDA_HOME_LINK"
