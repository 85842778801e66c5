#!/usr/bin/env bash
# Builds and runs the emulator's self-test (selftest.cpp): mbarriers, TMA copies, tensor maps and by-value struct
# parameters, without the Rust side, in both thread orders. Its kernels and driver.cpp make a libcuda.so.1 of their
# own in ${1:-target/cuda-emu-selftest}. Prints one line per case and exits nonzero if any failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-target/cuda-emu-selftest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cxx="${CXX:-g++}"
flags=(-std=c++17 -O2 -g -fPIC -ffp-contract=off -fno-strict-aliasing -Wall -Wno-unknown-pragmas
       -Wno-unused-function -I tools/cuda-emu ${EMU_CXXFLAGS:-})
"$cxx" "${flags[@]}" -c tools/cuda-emu/driver.cpp -o "$out/driver.o" & p1=$!
"$cxx" "${flags[@]}" -include emu.h -c tools/cuda-emu/selftest.cpp -o "$out/selftest.o" & p2=$!
wait "$p1"; wait "$p2"
"$cxx" -shared ${EMU_CXXFLAGS:-} -o "$out/libcuda.so.1" "$out/driver.o" "$out/selftest.o" -ldl -Wl,-soname,libcuda.so.1
echo 'extern "C" int emu_selftest(int, char**); int main(int c, char** v) { return emu_selftest(c, v); }' |
  "$cxx" ${EMU_CXXFLAGS:-} -x c++ - -x none -o "$out/selftest" "$out/libcuda.so.1" -Wl,-rpath,"$out"

ulimit -c 0  # the trap cases abort
failed=0
# ok CASE [ORDER]: passes (exit 0) in forward and reverse thread order, or in ORDER only.
ok() {
  for order in ${2:-forward reverse}; do
    if log="$(REPSHIELD_EMU_ORDER=$order "$out/selftest" "$1" 2>&1)"; then
      echo "ok    $1 ($order)"
    else
      echo "FAIL  $1 ($order):"; echo "$log" | sed 's/^/      /'; failed=1
    fi
  done
}
# trap CASE TEXT: aborts with the emulator's message containing TEXT, in both orders.
trap_case() {
  for order in forward reverse; do
    if log="$(REPSHIELD_EMU_ORDER=$order "$out/selftest" "$1" 2>&1)"; then
      echo "FAIL  $1 ($order): no trap"; failed=1
    elif grep -qF -- "$2" <<<"$log"; then
      echo "ok    $1 ($order): $(grep -F 'cuda-emu:' <<<"$log" | head -1 | cut -c1-150)"
    else
      echo "FAIL  $1 ($order): want \"$2\":"; echo "$log" | sed 's/^/      /'; failed=1
    fi
  done
}
ok pipeline
ok graph
ok wgmma
ok encode
ok read-early
ok release-early forward
ok ok
trap_case deadlock "selftest_pipeline: deadlock"
trap_case uninit "which mbarrier.init has not initialised in this block"
trap_case count0 "mbarrier.init with count 0"
trap_case misaligned "is not 8-byte aligned"
trap_case double-init "already initialised in this block"
trap_case arrivals "more arrivals than its count"
trap_case tx-overflow "above 2^20-1"
trap_case parity "parity 2 (0 or 1)"
trap_case tma-align128 "is not 128-byte aligned"
trap_case tma-align1024 "is not 1024-byte aligned"
trap_case tma-map "not written by the emulator's cuTensorMapEncodeTiled"
trap_case tma-bounds "the box is not inside the launch's dynamic shared memory"
trap_case tma-uninit-bar "cp.async.bulk.tensor on the mbarrier at dynamic shared memory offset"
trap_case in-flight "ended with 1 TMA copies in flight"
trap_case overwrite "was overwritten since mbarrier.init"
trap_case overlap "overlaps the mbarrier"
trap_case tx-excess "arrive.expect_tx announced less than its copies bring"
exit "$failed"
