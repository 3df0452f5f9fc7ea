#!/usr/bin/env bash
# bench/run_gpu_opt.sh -- on the GPU machine (device `run`): the CUDA OPT forward test
# (tests/cuda/test_opt_cuda.cu) and the resident MeZO step bench (bench/opt_resident_step.cu).
#
# Builds them unless prebuilt binaries are there (build-cu2/ is ignored: build here, carry it):
#   cmake -S . -B build-cu2 -DZO2_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DZO2_BUILD_BENCH=ON \
#         -DZO2_BUILD_EXAMPLES=OFF -DZO2_INSTALL=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-std=c++20
#   cmake --build build-cu2 --target test_cuda_test_opt_cuda opt_resident_step
#   run(command="bash bench/run_gpu_opt.sh", carry=["build-cu2/tests/test_cuda_test_opt_cuda",
#       "build-cu2/bench/opt_resident_step"])
# With no binaries it configures and builds in build-cu2 (Eigen/doctest/nlohmann-json from the
# system, or from a carried .deps/: see bench/run_gpu_perturb.sh --prepare-deps).
#
# Env: ZO2_SKIP_TEST=1, ZO2_SANITIZE=1 (memcheck on the kernel tests), ZO2_MODELS (125m,1.3b,6.7b,13b), ZO2_DTYPES (bf16,fp16), ZO2_STEPS (10),
#      ZO2_DEADLINE (seconds for the bench's configs, 200).
# Writes $OUT/opt_resident.jsonl (JSON lines), $OUT/test_opt_cuda.log, $OUT/env.log.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${OUT:-$root/build-cu2/out}
mkdir -p "$out"
cuda_lib=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")/../lib64
export LD_LIBRARY_PATH="${cuda_lib}:/usr/local/cuda/lib64:/usr/local/cuda-13.0/lib:/usr/local/cuda-13.0/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/env.log"
grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$out/env.log"

build=$root/build-cu2
test_bin=$build/tests/test_cuda_test_opt_cuda
bench_bin=$build/bench/opt_resident_step
if [[ ! -x $test_bin || ! -x $bench_bin ]]; then
  prefix=()
  [[ -d $root/.deps ]] && prefix=(-DCMAKE_PREFIX_PATH="$root/.deps")
  cmake -S . -B "$build" -DZO2_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DZO2_BUILD_BENCH=ON \
    -DZO2_BUILD_EXAMPLES=OFF -DZO2_INSTALL=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-std=c++20 \
    "${prefix[@]}" > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
  cmake --build "$build" -j "$(nproc)" --target test_cuda_test_opt_cuda opt_resident_step > "$out/build.log" 2>&1 \
    || { grep -E "error" -A5 "$out/build.log" | head -60; exit 1; }
fi

test_rc=0
if [[ -z ${ZO2_SKIP_TEST:-} ]]; then
  ZO2_TEST_DATA_DIR=$root/tests/fixtures timeout 150 "$test_bin" -s > "$out/test_opt_cuda.log" 2>&1
  test_rc=$?
  grep -E "MESSAGE|logits max|ERROR|CHECK|error|SKIPPED|test cases|assertions|Status" "$out/test_opt_cuda.log" | head -80
  echo "test_opt_cuda rc=$test_rc"
fi
if [[ -n ${ZO2_SANITIZE:-} ]]; then  # memcheck on the kernel tests (the model tests take long under it)
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  ZO2_TEST_DATA_DIR=$root/tests/fixtures timeout 100 "$san" --tool memcheck --error-exitcode 3 "$test_bin" \
    -tc='*layer_norm*,*positions*,*causal_attention*,*cross_entropy*,Gemm*' > "$out/sanitizer.log" 2>&1
  echo "compute-sanitizer memcheck rc=$?"; tail -4 "$out/sanitizer.log"
fi

timeout $(( ${ZO2_DEADLINE:-200} + 60 )) "$bench_bin" --models "${ZO2_MODELS:-125m,1.3b,6.7b,13b}" \
  --dtypes "${ZO2_DTYPES:-bf16,fp16}" --steps "${ZO2_STEPS:-10}" --deadline "${ZO2_DEADLINE:-200}" \
  > "$out/opt_resident.jsonl" 2> "$out/opt_resident.err"
echo "opt_resident_step rc=$?"
cat "$out/opt_resident.err" | tail -20
python3 - "$out/opt_resident.jsonl" <<'PY' || cat "$out/opt_resident.jsonl"
import json, sys
for l in open(sys.argv[1]):
    if not l.startswith("{"): continue
    r = json.loads(l)
    k = r["kind"]
    if k == "gemm_rate": print(f'gemm bf16 8192^3: {r["tflops"]:.0f} TFLOP/s')
    elif k == "pair_gemm_block": print(f'pair gemm h={r["hidden"]}: two calls {r["two_calls_ms"]:.3f} ms, batched {r["batched_ms"]:.3f} ms, x{r["speedup"]:.3f}')
    elif k == "step":
        ref = r.get("pytorch_mezo_gpu_s")
        print(f'{r["config"]:>9} {r["dtype"]} step {r["step_s_median"]*1e3:8.1f} ms  fwd {r["forward_s_median"]*1e3:7.1f} ms  '
              f'floor {r["floor_s"]*1e3:7.1f} ms  x{r["ratio_to_floor"]:.2f}  ref {ref}  gpu {r["peak_gpu_used_bytes"]/2**30:.1f} GiB  '
              f'finite {r["finite_steps"]}/{r["timed_steps"]}')
    elif k in ("error", "skipped"): print(r)
PY
exit $test_rc
