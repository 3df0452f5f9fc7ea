#!/usr/bin/env bash
# bench/gpu_tests.sh -- the committed sources (git archive HEAD: nothing uncommitted in the
# working tree) built and tested on the GPU machine in one command:
#   run(command="bash bench/gpu_tests.sh")
# builds every CUDA test, zo2-opt and zo2_bench (Release, sm_90a) in /tmp/zo2-head/build, runs
# ctest on the CUDA tests and zo2-opt's GPU test, and, with ZO2_MEMCHECK="test_a test_b", runs
# compute-sanitizer memcheck on those test binaries. Logs go to $OUT (or bench/results/logs-gpu-tests).
# The build stays in /tmp/zo2-head for a next call on the same (warm) machine: ZO2_REBUILD=0 skips
# the archive and configure steps when it exists.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/bench/results/logs-gpu-tests}
mkdir -p "$out"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
cuda_bin=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")
export PATH="$cuda_bin:/usr/local/cuda/bin:$PATH"
src=/tmp/zo2-head
if [[ ${ZO2_REBUILD:-1} != 0 || ! -d $src/build ]]; then
  rm -rf "$src" && mkdir -p "$src"
  git -C "$root" archive HEAD | tar -x -C "$src"
  echo "== sources: $(git -C "$root" rev-parse --short HEAD)"
  gen=()
  command -v ninja > /dev/null && gen=(-G Ninja)
  cmake -S "$src" -B "$src/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DZO2_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${ZO2_CUDA_ARCH:-90a}" -DZO2_BUILD_TESTS=ON -DZO2_BUILD_BENCH=ON \
    -DZO2_BUILD_EXAMPLES=ON -DZO2_INSTALL=OFF > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
fi
targets=(zo2_bench zo2-opt zo2-compare-runs)  # zo2-compare-runs: the data-parallel GPU case compares runs with it
for f in "$src"/tests/cuda/*.cu; do targets+=("test_cuda_$(basename "$f" .cu)"); done
# The NCCL communicator's test, where the configure step found NCCL (zo2::nccl).
grep -q "NCCL .* found (zo2::nccl" "$out/configure.log" 2>/dev/null && targets+=(test_nccl_communicator)
echo "== build ${#targets[@]} targets ($(elapsed) s)"
timeout "${ZO2_BUILD_TIMEOUT:-400}" cmake --build "$src/build" -j "$(nproc)" --target "${targets[@]}" -- -k 0 \
  > "$out/build.log" 2>&1
echo "build rc=$? ($(elapsed) s)"
grep -E "error|FAILED" "$out/build.log" | head -40
echo "== ctest ($(elapsed) s)"
ZO2_TEST_DATA_DIR=$src/tests/fixtures timeout "${ZO2_CTEST_TIMEOUT:-300}" ctest --test-dir "$src/build" \
  -R "${ZO2_TEST_REGEX:-^cuda_|^zo2_opt_gpu$|^zo2_opt_llama_gpu$|^nccl_communicator$|^zo2_opt_dp_gpu_shared_master$}" -j "${ZO2_CTEST_JOBS:-3}" --timeout 280 --output-on-failure \
  > "$out/ctest.log" 2>&1
rc=$?
grep -E "Test +#|tests passed|tests failed|Total Test" "$out/ctest.log" | head -40
# What a failing test said (its own lines, from --output-on-failure), on stdout: the device call
# may bring back only a few files.
if [[ $rc -ne 0 ]]; then
  echo "== what the failing tests said"
  grep -E "FAIL|Error|error|CHECK|SKIPPED|rc=|exited|what\(\)|zo2-opt:" "$out/ctest.log" | grep -v "Test +#" | head -40
fi
for t in ${ZO2_MEMCHECK:-}; do
  exe=$src/build/tests/test_cuda_$t
  [[ -x $exe ]] || continue
  echo "== memcheck $t ($(elapsed) s)"
  ZO2_TEST_DATA_DIR=$src/tests/fixtures timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 "$exe" \
    > "$out/memcheck-$t.log" 2>&1
  echo "memcheck $t rc=$? $(grep -E 'ERROR SUMMARY' "$out/memcheck-$t.log" | head -1)"
done
echo "== done ($(elapsed) s), ctest rc=$rc"
exit $rc
