#!/bin/sh
# llama.cpp's CMake flags for this machine: what `-march=native` would use, but never AMX.
#
# llama-cpp-python compiles llama.cpp on install, by default with GGML_NATIVE
# (-march=native). Where the CPU reports AMX but the OS does not grant it (seen
# in gVisor sandboxes), ggml's AMX kernels die on their first `tileloadd` with
# SIGILL. So on x86-64 Linux this prints GGML_NATIVE=OFF plus each instruction
# set /proc/cpuinfo lists, AMX left out; elsewhere nothing (llama.cpp's default).
# ggml's own thread pool instead of OpenMP: torch's OpenMP runtime shares the process.
# The Makefile passes it as CMAKE_ARGS unless CMAKE_ARGS is already set (GPU
# builds: CMAKE_ARGS="-DGGML_CUDA=on").
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
case "$(uname -m)" in x86_64 | amd64) ;; *) exit 0 ;; esac
[ -n "$flags" ] || exit 0
args="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
    avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case " $flags " in *" ${pair%%:*} "*) args="$args -DGGML_${pair#*:}=ON" ;; esac
done
echo "$args"
