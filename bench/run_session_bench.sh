#!/usr/bin/env bash
# bench/run_session_bench.sh -- one device call after bench/gpu_tests.sh on the same warm machine
# (its build in /tmp/zo2-head/build): what a session still has to measure, in order, as far as
# ZO2_TOTAL_S allows. ZO2_PLAN picks the list:
#   a (default)  the side-by-side run (the PyTorch reference carried in .reference, then zo2's
#                bf16p and int8 at OPT-6.7B with write-back every 1 and 4 steps; ZO2_SIDE_ARGS
#                and ZO2_REFERENCE_RUNS override), Qwen3-32B offloaded (int8, bf16: its GPU
#                memory), 2 ranks' host memory with the host master shared and per rank, an
#                offloaded zo2-opt run's host memory at OPT-30B int8 and 13B bf16,
#                zo-adam's state in bf16, host memory at OPT-6.7B int8 with a checkpoint
#   b            host memory of offloaded zo2-opt runs at OPT-13B (int8), OPT-66B (int8: a 128 GB
#                host), OPT-30B (int8, bf16), OPT-13B (bf16); write-back K = 1, 2, 4, 8 at
#                OPT-13B and OPT-1.3B (bf16)
#   d            what the LLaMA family still lacks: Qwen2.5-7B resident (bf16), Llama-3.2-1B
#                offloaded (int8, K = 1 with its timeline and chosen; 4 and 6 slots uploading
#                3 and 5 blocks ahead, across the step's epilogue); OPT-6.7B in three slots
#   e            the optimizer table at OPT-6.7B: offloaded bf16p with q = 1, 2, 4 and every
#                rule (zo-mmt and zo-adam with bf16 state too), then resident (bf16)
#   f            the reference at OPT-6.7B beside zo2 (bf16p, int8, K chosen), then bf16p (three
#                slots, K = 1, 2, chosen) and int8 (one and two perturbed copies) with zo2's NVML
#                peak at the reference's, then bf16p and int8 with zo2's own peak at the
#                reference's torch peak
#   g            the reference at OPT-13B beside zo2 (int8, bf16p, K chosen): GPU memory
#   h            the reference's Hugging Face Qwen3 path at Qwen3-8B (bench/reference_hf.py; carry
#                .whl from bench/reference_wheels.sh) beside zo2 (int8, bf16p, K chosen)
#   t            zo2-opt's GPU tests (examples/tests/cli_tests.sh gpu and llama_gpu, or ZO2_T_CASES: --compute bf16,
#                --two-copies among them), then zo2-opt training OPT-6.7B offloaded (int8, K chosen)
#                with the forward in fp32 and in bf16: what a user of the program gets (not with
#                ZO2_T_TIMING=0; the tests not with ZO2_T_TESTS=0)
#   r            A/B of this tree's zo2_bench against a base build's (build-base/zo2_bench, carried:
#                the sources before a kernel change; build-base/zo2_bench_variant, if there, in the
#                first configuration), alternating base and new twice per
#                configuration: OPT-6.7B int8 (two slots, K = 1, timeline; three slots, both
#                perturbed copies, a 3.3 GiB budget), Llama-3.2-1B int8 (both copies, three slots)
#                and Qwen3-8B int8; each line gets "binary":"base" or "new"
#   u            the CUDA tests named in ZO2_CUDA_TESTS (default: the offload engine's: row kernel,
#                host offload, write-back, family, bf16 state), each a {"kind":"test"} line
#   n            Nsight Compute's view of one int8 row_kernel launch (bench/ncu_kernel.sh detail) for the
#                base build's zo2_bench (build-base/zo2_bench, if carried) and this tree's: OPT-6.7B
#                with both perturbed copies (34 launches a step), the second step's 11th (an update
#                and both copies over a block)
#   q            Qwen3-8B offloaded, bf16p and int8 with their timelines, in two slots and in three
#                uploading two blocks ahead (across the step's epilogue): where the step's time
#                over the PCIe floor goes
#   k            the write-back trial (--writeback-every 0: K = 1, 2, 4, 8 timed) beside K = 1 and 2:
#                OPT-6.7B bf16p and int8 in three slots
#   s            Nsight Compute's time of every packed-codec launch (packed_kernel, the escape lists' sort)
#                of a Qwen3-8B bf16p run's first two steps (bench/ncu_kernel.sh launches), for the base
#                build's zo2_bench and this tree's: what the passes over the 622M-element embedding and
#                head, and the sorts, cost
#   p            A/B (as r) of the bf16p codec's pass: Qwen3-8B in three slots uploading two ahead, and
#                OPT-6.7B in three slots, with timelines
#   c            2 ranks' host memory (master shared / per rank), host memory at OPT-30B int8,
#                OPT-6.7B int8 and bf16p with write-back every 1 and 2 steps and K chosen (0),
#                in two slots, then three; q = 1 and 4 at sequence 512 (bf16p)
#   run(command="bash bench/run_session_bench.sh", carry=[".reference"])
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=/tmp/zo2-head
out=${OUT:-$root/bench/results}
[[ -d $root/.reference && ! -d $src/.reference ]] && cp -r "$root/.reference" "$src/.reference"
cd "$src" || exit 1
t0=$(date +%s)
plan=${ZO2_PLAN:-a}
if [[ $plan == f || $plan == g || $plan == h ]]; then
  # f keeps ~230 s after the side-by-side run for the budget-matched runs.
  case $plan in
    f) side_model=opt-6.7b side_ref=opt_6_7b:zo2 after=230 ;;
    g) side_model=opt-13b side_ref=opt_13b:zo2 after=15 ;;
    h) side_model=qwen3-8b side_ref=qwen3_8b:zo2 after=15 ;;
  esac
  ZO2_REFERENCE_RUNS=${ZO2_REFERENCE_RUNS:-$side_ref} ZO2_REFERENCE_BUDGET_S=${ZO2_REFERENCE_BUDGET_S:-400} \
    ZO2_REFERENCE_STEPS=${ZO2_REFERENCE_STEPS:-6} ZO2_BUILD_DIR=$src/build ZO2_SKIP_BUILD=1 ZO2_SKIP_TESTS=1 ZO2_SKIP_HF=1 \
    ZO2_SET= ZO2_BUDGET_S=${ZO2_SIDE_BUDGET_S:-$(( ${ZO2_TOTAL_S:-570} - after ))} OUT=$out \
    ZO2_BENCH_ARGS=${ZO2_SIDE_ARGS:-"--model $side_model --policy offload --codec int8,bf16p --writeback-every 0"} \
    bash bench/run_gpu.sh
elif [[ $plan == a ]]; then
  ZO2_REFERENCE_RUNS=${ZO2_REFERENCE_RUNS:-opt_6_7b:zo2} ZO2_BUILD_DIR=$src/build ZO2_SKIP_BUILD=1 ZO2_SKIP_TESTS=1 ZO2_SKIP_HF=1 \
    ZO2_SET= ZO2_BUDGET_S=${ZO2_SIDE_BUDGET_S:-300} OUT=$out \
    ZO2_BENCH_ARGS=${ZO2_SIDE_ARGS:-'--model opt-6.7b --policy offload --codec bf16p,int8 --writeback-every 1,4'} \
    bash bench/run_gpu.sh
else
  mkdir -p "$out" && : > "$out/plan-$plan.jsonl"
fi
results=$(ls -t "$out"/*.jsonl | head -1)
bench=$src/build/bench/zo2_bench
left() { echo $(( ${ZO2_TOTAL_S:-570} - $(date +%s) + t0 )); }
# run_more NAME ARGS...: zo2_bench into the results file, within what is left. run_bin runs another
# build's binary instead; run_tag (JSON fields, e.g. "binary":"base") opens each of its lines.
run_more() {
  local name=$1; shift
  local d=$(( $(left) - 15 ))
  (( d > 20 )) || { echo "no time left for $name"; return; }
  echo "== $name (deadline $d s)"
  timeout $(( d + 10 )) "${run_bin:-$bench}" "$@" --deadline "$d" 2> "$out/$name.err" |
    sed "${run_tag:+s/^{/{$run_tag,/}" >> "$results"
  echo "$name rc=${PIPESTATUS[0]}"; grep -v '^ ' "$out/$name.err" | tail -3
}
# ab NAME ARGS...: the base build's zo2_bench (build-base/zo2_bench, carried) and this tree's (and
# build-base/zo2_bench_variant's, where AB_VARIANT), alternating, twice; lines tagged "binary".
ab() {
  local name=$1 round which b; shift
  for round in 1 2; do
    for which in base new ${AB_VARIANT:+variant}; do
      case $which in
        base) b=$root/build-base/zo2_bench ;;
        variant) b=$root/build-base/zo2_bench_variant ;;
        *) b=$bench ;;
      esac
      [[ -x $b ]] || { echo "no $which binary at $b"; continue; }
      run_bin=$b run_tag="\"binary\":\"$which\",\"ab\":\"$name\"" run_more "$name-$which-$round" "$@"
    done
  done
}
# ncu_ab MODE REGEX ARGS...: bench/ncu_kernel.sh MODE on the base build's zo2_bench and on this
# tree's; each JSON line tagged "binary".
ncu_ab() {
  local mode=$1 regex=$2 which b; shift 2
  for which in base new; do
    b=$bench; [[ $which == base ]] && b=$root/build-base/zo2_bench
    [[ -x $b ]] || { echo "no $which binary"; continue; }
    (( $(left) > 60 )) || { echo "no time left for ncu $mode ($which)"; break; }
    echo "== ncu $mode $regex ($which)"
    timeout $(( $(left) - 10 )) bash "$root/bench/ncu_kernel.sh" "$mode" "$b" "$regex" "$@" > "$out/ncu-$mode-$which.txt" 2>&1
    echo "ncu $which rc=$?"
    grep '^{' "$out/ncu-$mode-$which.txt" | sed "s/^{/{\"binary\":\"$which\",/" | tee -a "$results" | cut -c1-300
  done
}
# Host memory of an offloaded zo2-opt run (docs/benchmarks.md): its `memory` line.
host_memory() {  # host_memory NAME PRESET CODEC [more zo2-opt flags; a repeated one, e.g. --steps, overrides]
  local name=$1 preset=$2 codec=$3; shift 3
  (( $(left) > 60 )) || { echo "no time left for $name"; return; }
  echo "== host memory $name ($preset $codec)"
  rm -rf /tmp/zo2-ck
  local timer=(); [[ -x /usr/bin/time ]] && timer=(/usr/bin/time -v)
  timeout $(( $(left) - 10 )) "${timer[@]}" "$src/build/examples/zo2-opt" train --demo --preset "$preset" --device cuda \
    --offload --codec "$codec" --steps 2 --lr 1e-6 "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc"; grep -E "^memory|^load|error|Maximum resident|Elapsed" "$out/$name.log" | head -6
  # The memory line, as JSON beside the bench's lines: "host peak RSS X GiB ..., host store Y GiB".
  awk -v name="$name" -v model="$preset" -v codec="$codec" -v rc="$rc" '
    /^load / && / s to build/ { load = $2 }
    /^memory/ { for (i = 1; i <= NF; ++i) { if ($i == "RSS") peak = $(i + 1); if ($i == "store" && store == "") store = $(i + 1) } }
    /^training / && /ms\/step/ { for (i = 1; i <= NF; ++i) if ($i == "ms/step,") { v = $(i - 1); sub(/^\(/, "", v); ms = v } }
    END { printf "{\"kind\":\"host_memory\",\"name\":\"%s\",\"model\":\"%s\",\"codec\":\"%s\",\"rc\":%d,\"load_s\":%s,\"peak_rss_gib\":%s,\"host_store_gib\":%s,\"ms_per_step\":%s}\n",
                 name, model, codec, rc, load == "" ? "null" : load, peak == "" ? "null" : peak, store == "" ? "null" : store, ms == "" ? "null" : ms }
  ' "$out/$name.log" | tee -a "$results"
  rm -rf /tmp/zo2-ck
}
# Host memory of 2 offloaded ranks on this host (both on its GPU: ZO2_DP_SHARE_GPUS=1), their
# master shared (--host-master shared) or one each (per-rank): the peak drop of MemAvailable
# while the job runs, sampled every 0.2 s, and each rank's `memory` line.
shared_master_memory() {  # shared_master_memory PRESET CODEC
  local mpi; mpi=$(command -v mpiexec) || { echo "no mpiexec here: no shared-master memory run"; return; }
  local mode
  for mode in shared per-rank; do
    (( $(left) > 90 )) || { echo "no time left for shared-master $mode"; return; }
    echo "== host master $mode, 2 ranks, $1 $2"
    local base; base=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
      ZO2_DP_SHARE_GPUS=1 timeout $(( $(left) - 30 )) "$mpi" -n 2 --oversubscribe --bind-to none \
      "$src/build/examples/zo2-opt" train --demo --preset "$1" --device cuda --offload --codec "$2" --batch 2 \
      --steps 3 --lr 1e-6 --host-master "$mode" > "$out/dp-$mode.log" 2>&1 &
    local job=$! low=$base now
    while kill -0 $job 2>/dev/null; do
      now=$(awk '/MemAvailable/ {print $2}' /proc/meminfo); (( now < low )) && low=$now; sleep 0.2
    done
    wait $job; echo "dp-$mode rc=$?"
    echo "{\"kind\":\"host_master\",\"mode\":\"$mode\",\"ranks\":2,\"model\":\"$1\",\"codec\":\"$2\",\"peak_host_gib\":$(awk -v b="$base" -v l="$low" 'BEGIN { printf "%.2f", (b - l) / 1048576 }')}" | tee -a "$results"
    grep -E "^memory|^device|error" "$out/dp-$mode.log" | head -4
  done
}
# The HostOffload budget (GiB) at which zo2's peak would match the reference's GPU memory at
# MODEL: the reference's torch peak (FIELD gpu_torch_peak_bytes; zo2's own allocations) or NVML
# peak (gpu_nvml_used_peak_bytes; zo2's device use), less what zo2 holds beside its policy at
# budget 0 (activations, workspace; for NVML the context too), less 64 MiB of margin.
matched_budget() {  # matched_budget MODEL CODEC FIELD
  python3 - "$results" "$@" <<'PY'
import json, sys
path, model, codec, field = sys.argv[1:5]
ref = zo2 = None
for line in open(path):
    try: r = json.loads(line)
    except ValueError: continue
    if r.get("kind") == "reference" and r.get("model") == model and r.get("method") == "zo2" and r.get(field):
        ref = r[field]
    if (r.get("kind") == "config" and r.get("model") == model and r.get("codec") == codec
            and r.get("policy") == "offload" and r.get("resident_blocks") == 0 and r.get("gpu_policy_bytes")):
        zo2 = r
if ref is None or zo2 is None: sys.exit(1)
# Like with like: zo2's own peak against torch's, NVML's view of each process against NVML's
# (the CUDA context included on both sides), cudaMemGetInfo's where NVML did not load.
if field == "gpu_torch_peak_bytes":
    mine = zo2["gpu_zo2_peak_bytes"]
else:
    mine = zo2.get("gpu_nvml_used_peak_bytes") or zo2["gpu_device_used_peak_bytes"]
print(f"{(ref - (mine - zo2['gpu_policy_bytes']) - (64 << 20)) / 2**30:.3f}")
PY
}
budget_run() {  # budget_run NAME MODEL CODEC FIELD [zo2_bench flags]: zo2 at the budget that matches the reference's FIELD
  local name=$1 model=$2 codec=$3 field=$4; shift 4
  local b; b=$(matched_budget "$model" "$codec" "$field") || { echo "no reference or budget-0 line for $name"; return; }
  echo "$name: --gpu-budget $b"
  run_more "$name" --model "$model" --policy offload --codec "$codec" --writeback-every 0 --gpu-budget "$b" "$@"
}
if [[ $plan == f ]]; then
  budget_run bf16p-nvml-matched opt-6.7b bf16p gpu_nvml_used_peak_bytes --slots 3 --writeback-every 1,2,0
  budget_run int8-nvml-matched opt-6.7b int8 gpu_nvml_used_peak_bytes --slots 3
  budget_run int8-nvml-matched-2copies opt-6.7b int8 gpu_nvml_used_peak_bytes --slots 3 --two-copies
  budget_run bf16p-torch-matched opt-6.7b bf16p gpu_torch_peak_bytes --slots 3 --writeback-every 1,2,0
  budget_run int8-torch-matched opt-6.7b int8 gpu_torch_peak_bytes
elif [[ $plan == a ]]; then
  shared_master_memory opt-6.7b int8
  run_more qwen3-32b --model qwen3-32b --policy offload --codec int8,bf16
  host_memory mem-30b-int8 opt-30b int8
  host_memory mem-13b-bf16 opt-13b bf16
  run_more adam-state-bf16 --model opt-6.7b --policy offload --codec bf16p --optimizer zo-adam --state-bf16
  host_memory mem-6.7b-int8 opt-6.7b int8 --checkpoint-every 2 --checkpoint-dir /tmp/zo2-ck
elif [[ $plan == c ]]; then
  shared_master_memory opt-6.7b int8
  host_memory mem-30b-int8 opt-30b int8
  run_more writeback-k2 --model opt-6.7b --policy offload --codec int8,bf16p --writeback-every 1,2,0
  run_more slots3 --model opt-6.7b --policy offload --codec int8,bf16p --slots 3 --writeback-every 1,2,0
  run_more queries-seq512 --model opt-6.7b --policy offload --codec bf16p --queries 1,4 --seq 512
elif [[ $plan == b ]]; then
  host_memory mem-13b-int8 opt-13b int8
  host_memory mem-66b-int8 opt-66b int8
  host_memory mem-30b-int8 opt-30b int8
  host_memory mem-30b-bf16 opt-30b bf16
  host_memory mem-13b-bf16 opt-13b bf16
  run_more writeback-13b --model opt-13b --policy offload --codec bf16 --writeback-every 1,2,4,8
  run_more writeback-1.3b --model opt-1.3b --policy offload --codec bf16 --writeback-every 1,2,4,8
elif [[ $plan == e ]]; then
  run_more queries --model opt-6.7b --policy offload --codec bf16p --queries 1,2,4
  run_more rules --model opt-6.7b --policy offload --codec bf16p --optimizer zo-sign,zo-mmt,zo-cons,zo-adam
  run_more rules-bf16-state --model opt-6.7b --policy offload --codec bf16p --optimizer zo-mmt,zo-adam --state-bf16
  run_more rules-resident --model opt-6.7b --policy resident --codec bf16 --optimizer zo-sgd,zo-sign,zo-mmt,zo-cons,zo-adam --queries 1
  run_more queries-resident --model opt-6.7b --policy resident --codec bf16 --queries 2,4
elif [[ $plan == t ]]; then
  for case in $([[ ${ZO2_T_TESTS:-1} == 1 ]] && echo "${ZO2_T_CASES:-gpu llama_gpu}"); do
    (( $(left) > 60 )) || { echo "no time left for cli test $case"; break; }
    echo "== cli test $case"
    timeout $(( $(left) - 10 )) bash "$src/examples/tests/cli_tests.sh" "$case" "$src/build/examples/zo2-opt" \
      "/tmp/zo2-cli-$case" "$src" > "$out/cli-$case.log" 2>&1
    rc=$?
    echo "cli test $case rc=$rc"; tail -4 "$out/cli-$case.log"
    echo "{\"kind\":\"test\",\"case\":\"zo2_opt_$case\",\"rc\":$rc}" >> "$results"
  done
  [[ ${ZO2_T_TIMING:-1} == 1 ]] && for compute in fp32 bf16; do
    host_memory "opt-int8-compute-$compute" opt-6.7b int8 --writeback-every 0 --compute "$compute" --steps 6
  done
elif [[ $plan == r ]]; then
  AB_VARIANT=1 ab opt-int8-2slots --model opt-6.7b --policy offload --codec int8 --writeback-every 1 --timeline --steps 8 --warmup 2
  ab opt-int8-3slots-2copies --model opt-6.7b --policy offload --codec int8 --writeback-every 1 --slots 3 --two-copies \
    --gpu-budget 3.3 --timeline --steps 8 --warmup 2
  ab llama-1b-int8 --model llama-3.2-1b --policy offload --codec int8 --writeback-every 1 --slots 3 --two-copies \
    --timeline --steps 10 --warmup 2
  ab qwen3-int8 --model qwen3-8b --policy offload --codec int8 --writeback-every 1 --timeline --steps 8 --warmup 2
elif [[ $plan == u ]]; then
  for t in ${ZO2_CUDA_TESTS:-row_kernel host_offload writeback offload_family offload_state_bf16}; do
    (( $(left) > 40 )) || { echo "no time left for test $t"; break; }
    exe=$src/build/tests/test_cuda_test_$t
    [[ -x $exe ]] || { echo "no test binary $exe"; continue; }
    timeout $(( $(left) - 20 )) "$exe" > "$out/test-$t.log" 2>&1
    rc=$?
    echo "test $t rc=$rc: $(grep -E '^\[doctest\] (test cases|assertions)' "$out/test-$t.log" | tr '\n' ' ')"
    echo "{\"kind\":\"test\",\"case\":\"cuda_$t\",\"rc\":$rc}" >> "$results"
  done
elif [[ $plan == n ]]; then
  SKIP=44 ncu_ab detail row_kernel --model opt-6.7b --policy offload --codec int8 --writeback-every 1 --two-copies
elif [[ $plan == q ]]; then
  run_more qwen3-2slots --model qwen3-8b --policy offload --codec bf16p,int8 --writeback-every 1 --timeline --steps 8 --warmup 2
  run_more qwen3-3slots --model qwen3-8b --policy offload --codec bf16p,int8 --writeback-every 1 --slots 3 --prefetch 2 \
    --timeline --steps 8 --warmup 2
elif [[ $plan == k ]]; then
  run_more trial-opt --model opt-6.7b --policy offload --codec bf16p,int8 --slots 3 --writeback-every 1,2,0 --steps 8 --warmup 2
elif [[ $plan == s ]]; then
  ncu_ab launches "packed|Segmented" --model qwen3-8b --policy offload --codec bf16p --writeback-every 1
elif [[ $plan == p ]]; then
  ab qwen3-bf16p --model qwen3-8b --policy offload --codec bf16p --writeback-every 1 --slots 3 --prefetch 2 --timeline \
    --steps 8 --warmup 2
  ab opt-bf16p --model opt-6.7b --policy offload --codec bf16p --writeback-every 1 --slots 3 --timeline --steps 8 --warmup 2
elif [[ $plan == d ]]; then
  run_more qwen2.5-resident --model qwen2.5-7b --policy resident --codec bf16
  run_more llama-1b-offload --model llama-3.2-1b --policy offload --codec int8 --writeback-every 1,0 --timeline
  run_more llama-1b-slots4 --model llama-3.2-1b --policy offload --codec int8 --writeback-every 0 --slots 4 --prefetch 3
  run_more llama-1b-slots6 --model llama-3.2-1b --policy offload --codec int8 --writeback-every 0 --slots 6 --prefetch 5
  run_more slots3 --model opt-6.7b --policy offload --codec int8,bf16p --slots 3 --writeback-every 1,2,0
fi
python3 "$root/bench/bench_results.py" "$results" 2>&1 | tail -40
echo "results: $results"
