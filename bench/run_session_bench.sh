#!/usr/bin/env bash
# bench/run_session_bench.sh -- one device call after bench/gpu_tests.sh on the same warm machine
# (its build in /tmp/zo2-head/build): the side-by-side run (the PyTorch reference carried in
# .reference, then zo2's codecs at OPT-1.3B and 6.7B), then into the same JSONL file the deferred
# write-back sweep (K = 1, 2, 4, 8 at 1.3B and 6.7B, bf16; 1 and 4 at 13B), LLaMA-family shapes
# offloaded in int8 (Qwen3-32B's GPU memory), zo-adam's state in fp32 and bf16, q = 1 and 4 at
# sequence 512, and an offloaded zo2-opt run's host memory, as far as the time allows.
#   run(command="bash bench/run_session_bench.sh", carry=[".reference"])
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=/tmp/zo2-head
out=${OUT:-$root/bench/results}
[[ -d $root/.reference && ! -d $src/.reference ]] && cp -r "$root/.reference" "$src/.reference"
cd "$src" || exit 1
t0=$(date +%s)
ZO2_BUILD_DIR=$src/build ZO2_SKIP_TESTS=1 ZO2_SKIP_HF=1 ZO2_SET= ZO2_BUDGET_S=${ZO2_SIDE_BUDGET_S:-300} OUT=$out \
  ZO2_BENCH_ARGS='--model opt-1.3b,opt-6.7b --policy offload --codec bf16,bf16p,int8' bash bench/run_gpu.sh
results=$(ls -t "$out"/*.jsonl | head -1)
bench=$src/build/bench/zo2_bench
left() { echo $(( ${ZO2_TOTAL_S:-570} - $(date +%s) + t0 )); }
run_more() {  # run_more NAME ARGS...: zo2_bench into the results file, within what is left
  local name=$1; shift
  local d=$(( $(left) - 15 ))
  (( d > 20 )) || { echo "no time left for $name"; return; }
  echo "== $name (deadline $d s)"
  timeout $(( d + 10 )) "$bench" "$@" --deadline "$d" >> "$results" 2> "$out/$name.err"
  echo "$name rc=$?"; grep -v '^ ' "$out/$name.err" | tail -3
}
run_more writeback --model opt-1.3b,opt-6.7b --policy offload --codec bf16 --writeback-every 1,2,4,8
run_more llama --model llama-3.2-1b,llama-3-8b,qwen3-32b --policy offload --codec int8
run_more adam-state --model opt-6.7b --policy offload --codec bf16p --optimizer zo-adam
run_more adam-state-bf16 --model opt-6.7b --policy offload --codec bf16p --optimizer zo-adam --state-bf16
run_more queries-seq512 --model opt-6.7b --policy offload --codec bf16p --queries 1,4 --seq 512
run_more writeback-13b --model opt-13b --policy offload --codec bf16 --writeback-every 1,4
# Host memory of an offloaded zo2-opt run (docs/benchmarks.md): its `memory` line.
if (( $(left) > 90 )); then
  echo "== host memory, OPT-6.7B bf16 (zo2-opt)"
  timeout $(( $(left) - 10 )) "$src/build/examples/zo2-opt" train --demo --preset opt-6.7b --device cuda --offload \
    --codec bf16 --steps 2 --checkpoint-every 2 --checkpoint-dir /tmp/zo2-ck > "$out/host-memory.log" 2>&1
  echo "host memory rc=$?"; grep -E "memory|error" "$out/host-memory.log" | head -3
fi
python3 "$root/bench/bench_results.py" "$results" 2>&1 | tail -40
echo "results: $results"
