#!/usr/bin/env bash
# Runs the HostOffload CUDA test and the offload step bench on the GPU machine (device `run`),
# from binaries built here (the GPU machine may lack Eigen/doctest/nlohmann-json):
#
#   cmake -S . -B build-off -DZO2_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
#         -DZO2_BUILD_EXAMPLES=OFF -DZO2_BUILD_BENCH=ON -DCMAKE_BUILD_TYPE=Release \
#         -DCMAKE_CUDA_FLAGS=-std=c++20      # CMake 3.25 passes no -std for nvcc 13
#   cmake --build build-off --target test_cuda_test_host_offload offload_step
#   run(command="bash bench/run_gpu_offload.sh", carry=["build-off/bench/offload_step",
#       "build-off/tests/test_cuda_test_host_offload"])
#
# Writes JSON lines to $OUT/offload.jsonl (bench) and logs to $OUT/*.log.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/bench/results}
mkdir -p "$out"
cuda_lib=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")/../lib64
export LD_LIBRARY_PATH="${cuda_lib}:/usr/local/cuda/lib64:/usr/local/cuda-13.0/lib:/usr/local/cuda-13.0/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/env.log"
grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$out/env.log"
nproc | tee -a "$out/env.log"

bin=$root/build-off
timeout 60 "$bin/tests/test_cuda_test_host_offload" -s > "$out/test_host_offload.log" 2>&1
echo "test_host_offload rc=$?"
grep -E "test cases|assertions|ERROR|SKIPPED|overlap|loss|used|reference" "$out/test_host_offload.log" | head -40
sed -n '/group kind/,/^$/p' "$out/test_host_offload.log" | head -12

# OPT-1.3B and 6.7B with every codec, then 13B (26 GB pinned in bf16) while time is left.
timeout 150 "$bin/bench/offload_step" --models 1.3b,6.7b --codecs bf16,int8,fp32 --steps 4 --deadline 100 \
  > "$out/offload.jsonl" 2> "$out/offload_timeline.log"
echo "offload_step rc=$?"
timeout 100 "$bin/bench/offload_step" --models 13b --codecs bf16,int8 --steps 3 --deadline 40 --timeline none \
  >> "$out/offload.jsonl" 2>> "$out/offload_timeline.log"
echo "offload_step 13b rc=$?"
cat "$out/offload.jsonl"
head -60 "$out/offload_timeline.log"
