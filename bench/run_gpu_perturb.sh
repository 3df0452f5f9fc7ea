#!/usr/bin/env bash
# bench/run_gpu_perturb.sh -- on the GPU machine: build the CUDA perturb tests and bench for
# Hopper (Release), run the tests, run the bandwidth bench, then compute-sanitizer on one test.
#
#   bench/run_gpu_perturb.sh --prepare-deps   (here, on a machine that has the packages)
#       copies Eigen, doctest and nlohmann-json headers and their CMake configs into .deps/
#       (ignored through .git/info/exclude), so a GPU machine that lacks them can build:
#       carry .deps with the call.
#   bench/run_gpu_perturb.sh                  (there)
#       logs and JSON lines go to $OUT (or build-gpu/out when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [[ "${1:-}" == "--prepare-deps" ]]; then
  set -e
  rm -rf .deps
  mkdir -p .deps/include .deps/share/cmake .deps/lib/cmake
  cp -r /usr/include/eigen3 /usr/include/doctest /usr/include/nlohmann .deps/include/
  mkdir -p .deps/share/eigen3
  cp -r /usr/share/eigen3/cmake .deps/share/eigen3/
  cp -r /usr/lib/cmake/doctest .deps/lib/cmake/
  cp -r /usr/share/cmake/nlohmann_json .deps/share/cmake/
  grep -qx '/.deps/' .git/info/exclude 2>/dev/null || echo '/.deps/' >> .git/info/exclude
  du -sh .deps
  exit 0
fi

OUT=${OUT:-$ROOT/build-gpu/out}
mkdir -p "$OUT"
BUILD=$ROOT/build-gpu
JOBS=$(nproc)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
cmake --version | head -1; nvcc --version | tail -1; ${CXX:-g++} --version | head -1
for p in /usr/include/eigen3 /usr/include/doctest /usr/include/nlohmann; do
  [[ -d $p ]] && echo "system has $p" || echo "system lacks $p"
done

PREFIX=()
if [[ -d $ROOT/.deps ]]; then PREFIX=(-DCMAKE_PREFIX_PATH="$ROOT/.deps"); echo "using carried .deps"; fi

echo "== configure"
# -std=c++20 for nvcc: the project asks C++20 of CXX only (cxx_std_20), and CMake before 3.27
# or so does not know nvcc 13's C++20 support (cuda_std_20).
cmake -S . -B "$BUILD" -DZO2_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DZO2_BUILD_BENCH=ON \
  -DZO2_BUILD_EXAMPLES=OFF -DZO2_INSTALL=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-std=c++20 \
  "${PREFIX[@]}" > "$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }

echo "== build"
start=$(date +%s)
cmake --build "$BUILD" -j "$JOBS" --target test_cuda_test_perturb_kernels test_cuda_test_cuda_resident \
  perturb_bandwidth > "$OUT/build.log" 2>&1 || { grep -E "error|Error" -A5 "$OUT/build.log" | head -60; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

echo "== tests"
( cd "$BUILD" && timeout 90 ctest -R 'cuda_test_(perturb_kernels|cuda_resident)' -V ) > "$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "MESSAGE|normals:|theta|g over|bf16 loss|test cases|assertions|Passed|Failed|ERROR|error|SKIPPED|tests passed" \
  "$OUT/tests.log" | head -60
echo "tests rc=$tests_rc"

echo "== bench"
timeout 60 "$BUILD/bench/perturb_bandwidth" > "$OUT/perturb.jsonl" 2> "$OUT/bench.err"
echo "bench rc=$?"; cat "$OUT/bench.err"
python3 - "$OUT/perturb.jsonl" <<'EOF' || cat "$OUT/perturb.jsonl"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if r["op"] == "cudaMemcpy_d2d":
        print(f'{r["device"]}: cudaMemcpy d2d {r["gbps"]:.0f} GB/s')
        continue
    print(f'{r["op"]:>18} pend={str(r["pending_update"])[0]} {r["storage"]}->{r["out"]} chunks={r["chunks"]} minb={r.get("min_blocks",1)} '
          f'{r["ms"]:.3f} ms {r["gbps"]:7.0f} GB/s ratio {r["ratio"]:.2f}')
EOF

echo "== compute-sanitizer (memcheck) on test_cuda_test_perturb_kernels"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
timeout 90 "$SAN" --tool memcheck --error-exitcode 3 "$BUILD/tests/test_cuda_test_perturb_kernels" \
  > "$OUT/sanitizer.log" 2>&1
echo "sanitizer rc=$?"
tail -5 "$OUT/sanitizer.log"
exit $tests_rc
