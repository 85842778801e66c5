#!/usr/bin/env bash
# Builds the CPU emulator of the CUDA driver (tools/cuda-emu/README.md): every kernels/*.cu
# compiled for the host plus driver.cpp, as a libcuda.so.1 (with a libcuda.so link) in
# ${1:-target/cuda-emu}. Prints that directory: put it first in LD_LIBRARY_PATH.
#   EMU_CXXFLAGS   extra compiler flags (for example -fsanitize=address,undefined -O1)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-target/cuda-emu}"
mkdir -p "$out/obj"
cxx="${CXX:-g++}"
# -ffp-contract=off: no FMA contraction, so __fmul_rn & co. round once like on the GPU.
flags=(-std=c++17 -O2 -g -fPIC -ffp-contract=off -fno-strict-aliasing -Wall -Wno-unknown-pragmas
       -Wno-unused-function -I kernels -I tools/cuda-emu ${EMU_CXXFLAGS:-})
pids=()
for cu in kernels/*.cu; do
  obj="$out/obj/$(basename "$cu" .cu).o"
  "$cxx" "${flags[@]}" -include emu.h -x c++ -c "$cu" -o "$obj" & pids+=($!)
done
"$cxx" "${flags[@]}" -c tools/cuda-emu/driver.cpp -o "$out/obj/driver.o" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
"$cxx" -shared ${EMU_CXXFLAGS:-} -o "$out/libcuda.so.1" "$out"/obj/*.o -ldl -Wl,-soname,libcuda.so.1
ln -sf libcuda.so.1 "$out/libcuda.so"
cd "$out" && pwd
