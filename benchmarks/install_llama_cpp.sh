#!/bin/bash
# llama.cpp (llama-cpp-python) in its own venv, never a project dependency: the peer of benchmarks/decode.py
# --llama-cpp-python. usage: benchmarks/install_llama_cpp.sh [DIR]   (default /tmp/llama-cpp-peer; ~8 min on 2 cores)
# Built for this CPU's vector width without -march=native (GGML_NATIVE=OFF) and with AMX off: these VMs list AMX
# in /proc/cpuinfo, but its instructions fault (SIGILL).
set -euo pipefail
DIR=${1:-/tmp/llama-cpp-peer}
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX=ON -DGGML_F16C=ON"
has avx2 && args+=" -DGGML_AVX2=ON -DGGML_FMA=ON"
has avx512f && has avx512bw && has avx512vl && args+=" -DGGML_AVX512=ON"
has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
python3 -m venv "$DIR/venv"
"$DIR/venv/bin/pip" install -q -U pip
CMAKE_ARGS="$args" "$DIR/venv/bin/pip" install -q --no-cache-dir llama-cpp-python==0.3.36
echo "llama.cpp built with: $args"
"$DIR/venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
