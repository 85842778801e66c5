#!/usr/bin/env bash
# The CUDA checks for a machine that has a GPU but no Rust toolchain, in two halves:
#
#   tools/gpu-suite.sh build   # here (Rust + the pinned nvcc): builds the CUDA test and bench
#                              # binaries with --features cuda,cublaslt into .device/bin
#                              # (gitignored), stripped, with the fixtures they read
#   tools/gpu-suite.sh run OUT # there, from the repository root (.device/bin carried along):
#                              # nvidia-smi, the CUDA parity suite, compute-sanitizer memcheck
#                              # and racecheck on one pass of it; logs and a summary.md land in OUT
#   tools/gpu-suite.sh quick OUT # there, when the loan is short: the parity suite, the sanitizers
#                              # on the GEMM/attention/decode tests and the headline benchmarks in
#                              # one call of about 9 minutes, every step capped (quick() below)
#   tools/gpu-suite.sh bench OUT # there too, a separate call: `bench kernels` at the llama3-8b
#                              # and smollm2 shapes, `bench generate` (prefill + greedy decode)
#                              # at the smollm2 shape and `bench train-step` at the Llama-3-8B
#                              # shape, with PyTorch alongside when the machine's python has
#                              # torch; OUT/bench.md
#
# The binaries embed the PTX, so the GPU machine needs only its driver (and compute-sanitizer
# from its CUDA install for the sanitizer passes, skipped with a note when absent). The
# cuBLASLt comparison (feature `cublaslt`: a parity test and a column of `bench kernels`) also
# needs libcublasLt.so.13; `run` and `bench` look for it (find_cublaslt) and say what they found.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  CUDA_HOME="$(bash tools/install-cuda-toolchain.sh)"
  export CUDA_HOME REPSHIELD_REQUIRE_NVCC=1
  local target="${CARGO_TARGET_DIR:-target}"
  cargo build --release --features cuda,cublaslt --bins
  local json
  json="$(cargo test --release --features cuda,cublaslt --test cuda_parity --no-run --message-format=json 2>/dev/null)"
  local test_bin
  test_bin="$(printf '%s\n' "$json" | grep -o '"executable":"[^"]*cuda_parity[^"]*"' | tail -n 1 | cut -d'"' -f4)"
  [ -x "$test_bin" ] || { echo "cuda_parity test binary not found" >&2; exit 1; }
  rm -rf .device/bin && mkdir -p .device/bin
  cp "$test_bin" .device/bin/cuda_parity
  cp "$target/release/repshield" .device/bin/repshield
  strip .device/bin/cuda_parity .device/bin/repshield
  du -sh .device/bin/* >&2
  echo "carry .device/bin; on the GPU machine run: bash tools/gpu-suite.sh quick \$OUT (short loan) or run \$OUT" >&2
}

# start TITLE FILE NEEDED_BINARY: checks the carried binary and writes the report's header
# (date, GPU, driver) to FILE.
start() {
  [ -x ".device/bin/$3" ] || { echo ".device/bin/$3 missing: run 'build' first and carry .device/bin" >&2; exit 1; }
  mkdir -p "$(dirname "$2")"
  {
    echo "# $1, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    echo '```'
  } > "$2"
}

# find_cublaslt FILE: makes libcublasLt.so.13 loadable for the cuBLASLt comparison. cudarc
# (bindings `cuda-13000`) dlopens libcublasLt.so, then libcublasLt.so.13, .so.12, ... by name,
# so the library must be where the loader looks. PyTorch's cu13 wheels bring it as the
# nvidia-cublas wheel (<site-packages>/nvidia/cu13/lib), which is not on the loader path: when
# the loader does not already find one, the folder of the first libcublasLt.so.13 in
# LD_LIBRARY_PATH, the site-packages of the machine's python (nvidia/cu13/lib,
# nvidia/cublas/lib, torch/lib) or /usr/local/cuda goes on LD_LIBRARY_PATH. What it found is
# appended to FILE and printed.
find_cublaslt() {
  local note cache
  # Read once: `ldconfig -p | grep -m 1` could die of SIGPIPE under pipefail.
  cache="$(ldconfig -p 2>/dev/null || true)"
  if grep -q 'libcublasLt\.so\.13 ' <<<"$cache"; then
    note="libcublasLt.so.13 on the loader path: $(grep -m 1 'libcublasLt\.so\.13 ' <<<"$cache" | sed 's/.*=> //')"
  else
    local py roots=() found=""
    py="$(command -v python3 || command -v python || true)"
    if [ -n "$py" ]; then
      mapfile -t roots < <("$py" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true)
    fi
    local dir lib
    for dir in ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }} "${roots[@]/%//nvidia/cu13/lib}" "${roots[@]/%//nvidia/cublas/lib}" \
      "${roots[@]/%//torch/lib}" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
      for lib in "$dir"/libcublasLt.so.13*; do
        [ -e "$lib" ] && { found="$lib"; break 2; }
      done
    done
    if [ -n "$found" ]; then
      dir="$(dirname "$found")"
      case ":${LD_LIBRARY_PATH:-}:" in
        *":$dir:"*) ;;
        *) export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
      esac
      note="found $found; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    else
      note="no libcublasLt.so.13 found (loader path, ${py:-no python}'s site-packages, /usr/local/cuda): the cuBLASLt test skips and bench kernels has no cuBLASLt column"
    fi
  fi
  printf '\ncuBLASLt: %s\n' "$note" | tee -a "$1" >&2
}

run() {
  local out="${1:?usage: tools/gpu-suite.sh run OUT}"
  local bin=.device/bin
  local s="$out/summary.md"
  start "CUDA suite" "$s" cuda_parity
  find_cublaslt "$s"
  # The suite: every test prints its own comparison; a GPU must be present, so any "skipping"
  # line here is a failure of the setup, not a pass.
  set +e
  "$bin/cuda_parity" --test-threads=1 --nocapture > "$out/parity.log" 2>&1
  local rc=$?
  set -e
  {
    echo
    echo "## cuda_parity (exit $rc)"
    echo
    grep -E '^test result|^test .* (FAILED|ok)$|skipping' "$out/parity.log" | sed 's/^/    /' | tail -n 60
    printf '\nfailed: %s\n' "$(failed_tests "$out/parity.log" | tr '\n' ' ')"
  } >> "$s"
  local sanitizer
  sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
  for tool in memcheck racecheck; do
    if [ -z "$sanitizer" ]; then
      printf '\n## compute-sanitizer %s\n\nnot found on this machine\n' "$tool" >> "$s"
      continue
    fi
    set +e
    "$sanitizer" --tool "$tool" --error-exitcode 99 "$bin/cuda_parity" --test-threads=1 > "$out/$tool.log" 2>&1
    local src=$?
    set -e
    {
      printf '\n## compute-sanitizer %s (exit %s)\n\n' "$tool" "$src"
      grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^test result' "$out/$tool.log" | sed 's/^/    /' | tail -n 10
    } >> "$s"
  done
  cat "$s"
}

# Benchmarks, a separate call (each fits a 10-minute limit): kernels against their floors at
# the llama3-8b and smollm2 shapes, prefill + greedy decode (`bench generate`: tok/s, launches
# per decode token) at the smollm2 shape, then one triplet training step at the Llama-3-8B
# shape (batch 4 x (512 + 512)), each side by side with PyTorch + transformers on the same GPU
# when the machine's python has torch. `bench generate` at llama3-8b builds 8B random weights on
# both sides (host RNG here, device init in transformers) on top of train-step's: opt in with
# GPU_SUITE_GENERATE_SHAPES="smollm2 llama3-8b" when the call has the time. Results land in
# OUT/bench.md.
bench() {
  local out="${1:?usage: tools/gpu-suite.sh bench OUT}"
  local bin=.device/bin
  local s="$out/bench.md"
  start "CUDA benchmarks" "$s" repshield
  find_cublaslt "$s"
  local py
  py="$(command -v python3 || command -v python || true)"
  local kcmp=() gcmp=() tcmp=()
  if [ -n "$py" ] && "$py" -c 'import torch' 2>/dev/null; then
    kcmp=(--compare-python "$py" --script tools/bench_kernels_torch.py)
    gcmp=(--compare-python "$py" --script tools/bench_transformers.py)
    tcmp=(--compare-python "$py" --script tools/bench_train_step.py)
  fi
  for shape in ${GPU_SUITE_SHAPES:-llama3-8b smollm2}; do
    set +e
    "$bin/repshield" bench kernels --device cuda --shape "$shape" ${GPU_SUITE_KERNEL_ARGS:-} "${kcmp[@]}" \
      --json "$out/kernels-$shape.json" > "$out/kernels-$shape.md" 2>&1
    local krc=$?
    set -e
    {
      printf '\n## bench kernels --shape %s (exit %s)\n\n' "$shape" "$krc"
      grep -E '^\||^tokens|^#|^cuBLASLt' "$out/kernels-$shape.md"
    } >> "$s"
  done
  for shape in ${GPU_SUITE_GENERATE_SHAPES:-smollm2}; do
    set +e
    "$bin/repshield" bench generate --device cuda --shape "$shape" ${GPU_SUITE_GENERATE_ARGS:-} "${gcmp[@]}" \
      > "$out/generate-$shape.md" 2>&1
    local grc=$?
    set -e
    {
      printf '\n## bench generate --shape %s (exit %s)\n\n' "$shape" "$grc"
      grep -E '^\||^# |^device|^bf16 peak|^copy bandwidth|^repshield|^decode floor|^kernel launches|^transformers|^error' "$out/generate-$shape.md"
    } >> "$s"
  done
  if [ -z "${GPU_SUITE_SKIP_TRAIN:-}" ]; then
    set +e
    "$bin/repshield" bench train-step --device cuda ${GPU_SUITE_TRAIN_ARGS:---shape llama3-8b --batch 4 --prompt-len 512 --response-len 512} \
      "${tcmp[@]}" > "$out/train-step.md" 2>&1
    local trc=$?
    set -e
    {
      printf '\n## bench train-step (exit %s)\n\n' "$trc"
      grep -E '^\||^# |^PyTorch' "$out/train-step.md"
    } >> "$s"
  fi
  cat "$s"
}

# capped SECONDS LOG CMD...: runs CMD with output to LOG, killed after SECONDS; prints its exit
# status, "timed out after Ns" when the cap ended it.
capped() {
  local secs="$1" log="$2"
  shift 2
  set +e
  timeout -k 10 "$secs" "$@" > "$log" 2>&1
  local rc=$?
  set -e
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "timed out after ${secs}s"; else echo "exit $rc"; fi
}

# failed_tests LOG: the names of the tests a libtest log says FAILED, one a line. With
# --nocapture a test's own output can sit between "test NAME ... " and its "FAILED".
failed_tests() {
  awk '/^test [A-Za-z0-9_]+ \.\.\. /{name=$2} /FAILED$/{if (name != "") print name; name=""}' "$1"
}

# without_wgmma LOG OUT SUMMARY: when the parity run in LOG failed tests, runs those tests
# again twice, first without the TMA GEMM alone (REPSHIELD_CUDA_NO_TMA=1), then without every
# Hopper kernel (REPSHIELD_CUDA_NO_WGMMA=1), each capped at QUICK_RETRY_S (90), logs in
# OUT/parity-no-tma.log and OUT/parity-no-wgmma.log, and adds to SUMMARY which of them pass that
# way: the one call then tells a fault of the TMA kernel, of the other wgmma kernels and of
# anything else apart.
without_wgmma() {
  local log="$1" out="$2" s="$3"
  local failed=()
  mapfile -t failed < <(failed_tests "$log")
  [ "${#failed[@]}" -gt 0 ] || return 0
  local st var retry
  for var in REPSHIELD_CUDA_NO_TMA REPSHIELD_CUDA_NO_WGMMA; do
    retry="$out/parity-$(echo "${var#REPSHIELD_CUDA_}" | tr 'A-Z_' 'a-z-').log"
    st="$(capped "${QUICK_RETRY_S:-90}" "$retry" env "$var=1" .device/bin/cuda_parity --test-threads=1 \
      --exact "${failed[@]}")"
    {
      printf '\n## the %s failed test(s) again, %s=1 (%s)\n\n' "${#failed[@]}" "$var" "$st"
      grep -E '^test result|^test .* (FAILED|ok)$|panicked' "$retry" | sed 's/^/    /' | tail -n 30
    } >> "$s"
  done
}

# The checks that matter most, in one call that fits a short loan of a GPU: every step has a
# cap (seconds, overridable), about 9 minutes in all, so a 15-minute device budget leaves room
# for the machine's start and a rerun. In order: the parity suite (QUICK_PARITY_S, 180), its
# failed tests again without the TMA GEMM, then without any Hopper GEMM (without_wgmma, only
# when some failed), then
# compute-sanitizer memcheck and racecheck on the tensor-core GEMMs, both attention paths and
# the replayed decode (QUICK_SANITIZER_S, 75 each), then `bench kernels` at the llama3-8b shape
# for the GEMMs (the 4096^3 square one and the dX one with the mma.sync kernel beside them,
# cuBLASLt beside the projections, a LoRA pair's thin GEMMs, the f32 logits gradient through
# lm_head),
# attention and the norms (QUICK_KERNELS_S, 100), then `bench generate` at the smollm2 shape
# (QUICK_GENERATE_S, 100), both with PyTorch / transformers alongside when python has torch.
# OUT/summary.md collects the headlines; each step's full log sits next to it.
quick() {
  local out="${1:?usage: tools/gpu-suite.sh quick OUT}"
  local bin=.device/bin
  local s="$out/summary.md"
  start "CUDA quick check" "$s" cuda_parity
  [ -x "$bin/repshield" ] || { echo "$bin/repshield missing: run 'build' first" >&2; exit 1; }
  find_cublaslt "$s"
  local st
  st="$(capped "${QUICK_PARITY_S:-180}" "$out/parity.log" "$bin/cuda_parity" --test-threads=1 --nocapture)"
  {
    printf '\n## cuda_parity (%s)\n\n' "$st"
    grep -E '^test result|^test .* (FAILED|ok)$|skipping|panicked' "$out/parity.log" | sed 's/^/    /' | tail -n 70
    printf '\nfailed: %s\n' "$(failed_tests "$out/parity.log" | tr '\n' ' ')"
  } >> "$s"
  without_wgmma "$out/parity.log" "$out" "$s"
  local sanitizer
  sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
  local filter=(tensor_core_gemms kv_store_and_attention replayed_decode recorded_decode)
  for tool in memcheck racecheck; do
    if [ -z "$sanitizer" ]; then
      printf '\n## compute-sanitizer %s\n\nnot found on this machine\n' "$tool" >> "$s"
      continue
    fi
    st="$(capped "${QUICK_SANITIZER_S:-75}" "$out/$tool.log" "$sanitizer" --tool "$tool" --error-exitcode 99 \
      "$bin/cuda_parity" --test-threads=1 "${filter[@]}")"
    {
      printf '\n## compute-sanitizer %s on %s (%s)\n\n' "$tool" "${filter[*]}" "$st"
      grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^test result|^test ' "$out/$tool.log" | sed 's/^/    /' | tail -n 12
    } >> "$s"
  done
  local py kcmp=() gcmp=()
  py="$(command -v python3 || command -v python || true)"
  if [ -n "$py" ] && "$py" -c 'import torch' 2>/dev/null; then
    kcmp=(--compare-python "$py" --script tools/bench_kernels_torch.py)
    gcmp=(--compare-python "$py" --script tools/bench_transformers.py)
  fi
  st="$(capped "${QUICK_KERNELS_S:-100}" "$out/kernels-llama3-8b.md" "$bin/repshield" bench kernels --device cuda \
    --shape llama3-8b --repeats 10 --only "matmul,gemm,attention,rmsnorm" "${kcmp[@]}" --json "$out/kernels-llama3-8b.json")"
  {
    printf '\n## bench kernels --shape llama3-8b, GEMMs, attention, norms (%s)\n\n' "$st"
    grep -E '^\||^tokens|^#|^cuBLASLt' "$out/kernels-llama3-8b.md"
  } >> "$s"
  st="$(capped "${QUICK_GENERATE_S:-100}" "$out/generate-smollm2.md" "$bin/repshield" bench generate --device cuda \
    --shape smollm2 "${gcmp[@]}")"
  {
    printf '\n## bench generate --shape smollm2 (%s)\n\n' "$st"
    grep -E '^\||^# |^device|^bf16 peak|^copy bandwidth|^repshield|^decode floor|^kernel launches|^transformers|^error' "$out/generate-smollm2.md"
  } >> "$s"
  cat "$s"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  bench) shift; bench "$@" ;;
  quick) shift; quick "$@" ;;
  *) echo "usage: tools/gpu-suite.sh build | run OUT | bench OUT | quick OUT" >&2; exit 2 ;;
esac
