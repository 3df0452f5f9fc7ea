#!/usr/bin/env bash
# bench/run_gpu.sh -- everything the GPU machine checks and measures, in one command (device
# `run`, H100: ~7-8 minutes, kept under 9 by a time budget):
#
#   run(command="bash bench/run_gpu.sh", timeout_s=600)     # carry nothing (see below), or
#   run(command="bash bench/run_gpu.sh", carry=["build-device.tar"])   # after bench/prebuild.sh
#
#   1. configure + build (Release, sm_90a; ZO2_CUDA_ARCH overrides): the CUDA tests, zo2_bench, zo2-opt (for the HF check);
#      skipped when a carried build-device.tar (bench/prebuild.sh) matches the sources
#   2. ctest -R '^cuda_|^zo2_opt_gpu$': every CUDA test and zo2-opt's GPU test (resident and
#      offloaded training, bit-exact resume); then compute-sanitizer memcheck on the CUDA test
#      binaries and racecheck on the flash kernel's (ZO2_SANITIZE=0 skips it)
#   3. the PyTorch reference, side by side (when ZO2_REFERENCE names its folder, or .reference/
#      holds it): bench/run_reference.py runs its harness (zo2_bench.py: fp16, batch 1, seq 2048)
#      for ZO2_REFERENCE_RUNS, each in its own process, within ZO2_REFERENCE_BUDGET_S, and writes
#      {"kind":"reference"} lines into the same results file. Speed-ups are computed only from
#      such pairs in one file (bench/bench_results.py); without a reference run there are none.
#      Then zo2_bench --set reference: resident OPT-125M..13B bf16+fp16; offloaded OPT-125M..13B
#      with the bf16, fp16 and int8 codecs (with the per-block timeline); OPT-30B offloaded bf16
#      when the host has >= 100 GB available. Configurations that would overrun the budget are
#      skipped (a {"kind":"skipped"} line says so). Its env line holds the link's pinned
#      bandwidths, one way and duplex; the side-by-side table prints them beside it.
#   4. the exported-checkpoint check against Hugging Face transformers
#      (tests/fixtures/opt/check_export_hf.py, when it exists and torch + transformers import):
#      zo2-opt train --demo --device cuda --export DIR, then the logits and token ids of DIR
#      in zo2-opt and in transformers.
#
# Results: ${OUT:-bench/results}/<device>-<date>.jsonl (zo2_bench's lines, then {"kind":"tests"}
# and {"kind":"hf_check"}); logs in ${OUT}/logs-<device>-<date>/. Then, here:
#   python3 bench/plot.py && python3 bench/make_table.py > ...   (see docs/benchmarks.md)
#
# Env: ZO2_BUDGET_S (total seconds, 530), ZO2_BUILD_DIR (build-gpu-bench), ZO2_SET (reference;
#      set but empty: no --set, the configurations come from ZO2_BENCH_ARGS, e.g.
#      "--model opt-1.3b,opt-6.7b --policy offload --codec bf16,bf16p,int8"),
#      ZO2_BENCH_ARGS (extra zo2_bench arguments), ZO2_SKIP_TESTS=1, ZO2_SKIP_HF=1,
#      ZO2_PREBUILT=0 (ignore a carried build-device.tar),
#      ZO2_REFERENCE (the reference's folder, with zo2_bench.py and zo2/; default .reference when
#      it holds zo2_bench.py; 0: no reference run), ZO2_REFERENCE_RUNS (MODEL:METHOD list,
#      default "opt_6_7b:zo2,opt_1_3b:zo2"; METHOD zo2 = offloaded ZO2, zo = MeZO on the GPU),
#      ZO2_REFERENCE_BUDGET_S (200: 6.7B takes ~80 s to initialise), ZO2_REFERENCE_STEPS (10),
#      ZO2_SKIP_BUILD (set: run the binaries ZO2_BUILD_DIR holds, building nothing).
# Side by side in one command (the reference copied in first: cp -r ../shared/reference .reference):
#   run(command="ZO2_SKIP_TESTS=1 ZO2_SKIP_HF=1 ZO2_SET= ZO2_BENCH_ARGS='--model opt-1.3b,opt-6.7b
#       --policy offload --codec bf16,bf16p,int8' bash bench/run_gpu.sh", carry=[".reference"])
# Dependencies: the GPU machine has Eigen, doctest and nlohmann-json; where it does not, run
# `bash bench/run_gpu_perturb.sh --prepare-deps` here and carry .deps.
set -uo pipefail
t0=$(date +%s)
budget=${ZO2_BUDGET_S:-530}
elapsed() { echo $(( $(date +%s) - t0 )); }
left() { echo $(( budget - $(date +%s) + t0 )); }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${OUT:-$root/bench/results}
mkdir -p "$out"
cuda_bin=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")
export PATH="$cuda_bin:/usr/local/cuda/bin:$PATH"
export LD_LIBRARY_PATH="${cuda_bin}/../lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
slug=$(echo "${gpu:-nogpu}" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
day=$(date -u +%F)
results=$out/$slug-$day.jsonl
n=2
while [[ -e $results ]]; do results=$out/$slug-$day-run$n.jsonl; n=$((n + 1)); done
logs=$out/logs-$(basename "$results" .jsonl)
mkdir -p "$logs"
echo "== machine ($(elapsed) s): results -> $results"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee "$logs/env.log"
grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$logs/env.log"
echo "cores $(nproc); $(cmake --version | head -1); $(nvcc --version | tail -1)" | tee -a "$logs/env.log"

# One JSON line: json_line KIND KEY=VALUE... (values that look like integers stay numbers).
json_line() {
  python3 - "$@" <<'PY'
import json, sys
kind, rest = sys.argv[1], sys.argv[2:]
d = {"kind": kind, "bench": "run_gpu"}
for kv in rest:
    k, _, v = kv.partition("=")
    d[k] = int(v) if v.lstrip("-").isdigit() else v
print(json.dumps(d))
PY
}

# ---- 1. build ----------------------------------------------------------------------------------
build=${ZO2_BUILD_DIR:-$root/build-gpu-bench}
hf_script=$root/tests/fixtures/opt/check_export_hf.py
examples=ON  # zo2-opt: its GPU test, and the HF check
prefix=()
[[ -d $root/.deps ]] && prefix=(-DCMAKE_PREFIX_PATH="$root/.deps") && echo "using carried .deps"
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
[[ -f $build/CMakeCache.txt ]] && generator=()  # keep the generator an existing build dir has
# A prebuilt build carried from the machine with the editor (bench/prebuild.sh): used when it was
# built from the sources this tree holds.
prebuilt=0
if [[ -f $root/build-device.tar && ${ZO2_PREBUILT:-1} != 0 ]]; then
  want=$(tar xOf "$root/build-device.tar" build-device/zo2-source-hash 2> /dev/null)
  have=$(bash "$root/bench/source_hash.sh")
  if [[ -n $want && $want == "$have" ]] && tar xf "$root/build-device.tar" -C "$root"; then
    build=$root/build-device
    prebuilt=1
    echo "== prebuilt build-device.tar (sources $have): no build here ($(elapsed) s)"
  else
    echo "== build-device.tar was built from other sources (${want:-none}, tree $have): building here"
  fi
fi
if [[ ${ZO2_SKIP_BUILD:-} && -x $build/bench/zo2_bench ]]; then
  prebuilt=1
  echo "== ZO2_SKIP_BUILD: the binaries in $build as they are ($(elapsed) s)"
fi
if [[ $prebuilt == 0 ]]; then
  echo "== configure ($(elapsed) s)"
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DZO2_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${ZO2_CUDA_ARCH:-90a}" -DZO2_BUILD_TESTS=ON -DZO2_BUILD_BENCH=ON -DZO2_BUILD_EXAMPLES=$examples \
    -DZO2_INSTALL=OFF "${prefix[@]}" > "$logs/configure.log" 2>&1 || { tail -40 "$logs/configure.log"; exit 1; }
  cuda_tests=()
  for f in tests/cuda/*.cu; do cuda_tests+=("test_cuda_$(basename "$f" .cu)"); done
  targets=("${cuda_tests[@]}" zo2_bench)
  [[ $examples == ON ]] && targets+=(zo2-opt)
  keep_going=(-k)
  grep -q "CMAKE_GENERATOR:INTERNAL=Ninja" "$build/CMakeCache.txt" && keep_going=(-k 0)
  echo "== build ${targets[*]} ($(elapsed) s)"
  timeout 360 cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" -- "${keep_going[@]}" > "$logs/build.log" 2>&1
  build_rc=$?
  echo "build rc=$build_rc ($(elapsed) s)"
  [[ $build_rc -ne 0 ]] && grep -E "error" -A5 "$logs/build.log" | head -60
fi
bench_bin=$build/bench/zo2_bench
[[ -x $bench_bin ]] || { echo "zo2_bench did not build"; exit 1; }

# ---- 2. CUDA tests -----------------------------------------------------------------------------
tests_rc=0
if [[ -z ${ZO2_SKIP_TESTS:-} ]]; then
  echo "== CUDA tests ($(elapsed) s)"
  test_regex='^cuda_'
  [[ -x $build/examples/zo2-opt ]] && test_regex='^cuda_|^zo2_opt_gpu$'
  ZO2_TEST_DATA_DIR=$root/tests/fixtures timeout 240 ctest --test-dir "$build" -R "$test_regex" --timeout 150 \
    --output-on-failure > "$logs/ctest.log" 2>&1
  tests_rc=$?
  grep -E "Test +#|tests passed|tests failed|Failed|Not Run|SKIPPED|Total Test" "$logs/ctest.log" | head -30
  summary=$(grep -E "tests passed" "$logs/ctest.log" | tail -1)
  json_line tests device="$gpu" ctest="-R $test_regex" rc=$tests_rc summary="$summary" elapsed_s="$(elapsed)" >> "$results"
  grep -E "^(resident|fp32|bf16|fp16|int8|bf16_budget):|offload fp32 ==" "$logs/ctest.log" | head -10
  # compute-sanitizer (memcheck, then racecheck on the flash kernel's shared memory) on the
  # kernels' own tests, timing test cases excluded; ZO2_SANITIZE=0 skips it. One log for all.
  sanitizer=$(command -v compute-sanitizer || echo "$cuda_bin/compute-sanitizer")
  if [[ ${ZO2_SANITIZE:-1} != 0 && -x $sanitizer ]]; then
    echo "== compute-sanitizer ($(elapsed) s)"
    slog=$logs/sanitizer.log
    : > "$slog"
    for spec in memcheck:test_flash_attention racecheck:test_flash_attention memcheck:test_perturb_kernels \
                memcheck:test_opt_cuda memcheck:test_host_offload memcheck:test_cuda_resident memcheck:test_row_kernel \
                memcheck:test_packed_kernel; do
      tool=${spec%%:*}; t=${spec#*:}
      exe=$(find "$build" -name "test_cuda_$t" -type f -perm -u+x | head -1)
      [[ -n $exe ]] || continue
      echo "==== $tool $t" >> "$slog"
      ZO2_TEST_DATA_DIR=$root/tests/fixtures timeout 180 "$sanitizer" --tool "$tool" --error-exitcode 9 "$exe" \
        --test-case-exclude='timing*,*overlaps*,*memory bound*' > "$logs/one.log" 2>&1
      src=$?
      cat "$logs/one.log" >> "$slog"
      summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$logs/one.log" | head -1)
      echo "$tool $t: rc=$src $summary $(grep -E "test cases" "$logs/one.log")"
      [[ $src -ne 0 ]] && grep -E "ERROR:|Error|Race|hazard" "$logs/one.log" | head -8
      json_line sanitizer device="$gpu" tool="$tool" test="$t" rc=$src summary="$summary" >> "$results"
      [[ $src -ne 0 ]] && tests_rc=$src
    done
    rm -f "$logs/one.log"
  fi
fi

# ---- 3. the reference protocol: the PyTorch reference, then zo2 -------------------------------------
hf_reserve=0
[[ -z ${ZO2_SKIP_HF:-} && -x $build/examples/zo2-opt ]] && hf_reserve=45
reference=${ZO2_REFERENCE-}
[[ -z $reference && -f $root/.reference/zo2_bench.py ]] && reference=$root/.reference
[[ $reference == 0 ]] && reference=
if [[ -n $reference ]]; then
  # What is left after the reference must still hold zo2's side (at least a minute).
  ref_budget=$(( $(left) - hf_reserve - 70 ))
  (( ref_budget > ${ZO2_REFERENCE_BUDGET_S:-200} )) && ref_budget=${ZO2_REFERENCE_BUDGET_S:-200}
  echo "== the reference ($reference): ${ZO2_REFERENCE_RUNS:-opt_6_7b:zo2,opt_1_3b:zo2}, budget ${ref_budget} s ($(elapsed) s)"
  if [[ ! -f $reference/zo2_bench.py ]]; then
    echo "ZO2_REFERENCE=$reference has no zo2_bench.py: no reference run"
    json_line reference device="$gpu" rc=-1 error="no zo2_bench.py in $reference" >> "$results"
  elif ! python3 -c "import torch, pynvml" > /dev/null 2>&1; then
    echo "python3 lacks torch or pynvml: no reference run"
    json_line reference device="$gpu" rc=-1 error="python3 lacks torch or pynvml" >> "$results"
  elif (( ref_budget < 30 )); then
    echo "no time left for the reference"
    json_line reference device="$gpu" rc=-1 error="no time left (${ref_budget} s)" >> "$results"
  else
    python3 "$root/bench/run_reference.py" "$reference" --runs "${ZO2_REFERENCE_RUNS:-opt_6_7b:zo2,opt_1_3b:zo2}" \
      --steps "${ZO2_REFERENCE_STEPS:-10}" --budget-s "$ref_budget" --device "$gpu" --log-dir "$logs" \
      > "$logs/reference.jsonl" 2> "$logs/reference.err"
    echo "reference rc=$? ($(elapsed) s)"
    cat "$logs/reference.err"
    cat "$logs/reference.jsonl" >> "$results"
  fi
fi
deadline=$(( $(left) - hf_reserve - 10 ))
set_args=(--set "${ZO2_SET-reference}")
[[ -z ${ZO2_SET-reference} ]] && set_args=()
echo "== zo2_bench ${set_args[*]} ${ZO2_BENCH_ARGS:-}, deadline ${deadline} s ($(elapsed) s)"
if (( deadline > 20 )); then
  # shellcheck disable=SC2086
  timeout $(( deadline + 40 )) "$bench_bin" "${set_args[@]}" --timeline --extras --deadline "$deadline" \
    ${ZO2_BENCH_ARGS:-} > "$logs/zo2_bench.jsonl" 2> "$logs/zo2_bench.err"
  bench_rc=$?
  cat "$logs/zo2_bench.jsonl" >> "$results"
  echo "zo2_bench rc=$bench_rc ($(elapsed) s)"
  grep -v "^ " "$logs/zo2_bench.err" | grep -v "^group\|^ *[0-9]" | tail -30
  python3 "$root/bench/make_table.py" "$results" 2>&1 || grep -v '"timeline"' "$logs/zo2_bench.jsonl"
  # zo2 beside the reference (pairs from this file only), with the link's bandwidths.
  python3 "$root/bench/bench_results.py" "$results" 2>&1
else
  echo "no time left for the benchmark"; bench_rc=1
fi

# ---- 4. exported checkpoint vs Hugging Face -------------------------------------------------------
hf_rc=-1
opt_bin=$build/examples/zo2-opt
if [[ -f $hf_script && -z ${ZO2_SKIP_HF:-} && -x $opt_bin ]] && (( $(left) > 20 )); then
  echo "== HF check ($(elapsed) s)"
  if python3 -c "import torch, transformers, numpy" > /dev/null 2>&1; then
    hf_dev=cpu
    python3 -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1 && hf_dev=cuda
    work=$(mktemp -d)
    timeout $(( $(left) - 5 )) bash -c "
      '$opt_bin' train --demo --steps 30 --device cuda --export '$work/export' --quiet &&
      python3 '$hf_script' '$work/export' --zo2-opt '$opt_bin' --device $hf_dev" > "$logs/hf_check.log" 2>&1
    hf_rc=$?
    tail -8 "$logs/hf_check.log"
    rm -rf "$work"
  else
    echo "python3 lacks torch/transformers/numpy: HF check skipped" | tee "$logs/hf_check.log"
  fi
  detail=$(grep -E "max \||token ids|argmax|MISMATCH|^OK|FAILED|skipped|failed|rror" "$logs/hf_check.log" | head -8 | tr '\n' ' ' | cut -c1-800)
  json_line hf_check device="$gpu" rc=$hf_rc device_for_hf="${hf_dev:-none}" detail="$detail" elapsed_s="$(elapsed)" >> "$results"
  echo "hf_check rc=$hf_rc"
elif [[ -z ${ZO2_SKIP_HF:-} ]]; then
  echo "HF check skipped: zo2-opt did not build or no time left ($(left) s)"
fi

echo "== done in $(elapsed) s: $results ($(grep -c '"kind":"config"' "$results") configurations)"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 && ( $hf_rc -eq 0 || $hf_rc -eq -1 ) ]]
