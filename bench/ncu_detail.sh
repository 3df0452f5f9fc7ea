#!/usr/bin/env bash
# bench/ncu_detail.sh BENCH_BINARY KERNEL_REGEX [zo2_bench flags...] -- what limits one kernel:
# Nsight Compute's throughput (SpeedOfLight), occupancy, scheduler and warp-state sections for
# one launch of the first kernel whose name matches KERNEL_REGEX after SKIP (default 20) matching
# launches, inside `zo2_bench FLAGS --steps 1 --warmup 1` (the warm-up step is the run's first:
# its passes apply no update; count the launches of one step to land in the second). Prints ncu's details page (text) and
# one {"kind":"ncu_detail"} JSON line of the headline metrics. ncu locks base clocks and replays
# the kernel once per section, restoring its memory between replays: the duration is at base
# clocks, for comparing kernels, not for the step.
#
#   bash bench/ncu_detail.sh build/bench/zo2_bench row_kernel --model opt-6.7b --policy offload --codec int8
set -euo pipefail
bin=$1 regex=$2
shift 2
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
[[ -x $ncu ]] || { echo "ncu_detail.sh: no ncu at $ncu" >&2; exit 1; }
page=$(mktemp)
trap 'rm -f "$page"' EXIT
"$ncu" --kernel-name "regex:$regex" --launch-skip "${SKIP:-20}" --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
  --section LaunchStats "$bin" "$@" --steps 1 --warmup 1 > "$page" 2> /dev/null || true
grep -E "^  [A-Za-z]|^    [A-Za-z]" "$page" | grep -vE "^\s+(-|OPT|WRN|INF)" || { echo "ncu_detail.sh: no ncu report" >&2; exit 1; }
python3 - "$page" "$regex" "$*" <<'PY'
import json, re, sys
path, regex, flags = sys.argv[1:]
want = {"Duration": "duration", "Compute (SM) Throughput": "sm_throughput_pct", "Memory Throughput": "memory_throughput_pct",
        "DRAM Throughput": "dram_throughput_pct", "Achieved Occupancy": "achieved_occupancy_pct",
        "Theoretical Occupancy": "theoretical_occupancy_pct", "Registers Per Thread": "registers",
        "Issue Slots Busy": "issue_slots_busy_pct", "No Eligible": "no_eligible_pct",
        "Warp Cycles Per Issued Instruction": "warp_cycles_per_issue", "Active Warps Per Scheduler": "active_warps_per_scheduler",
        "Eligible Warps Per Scheduler": "eligible_warps_per_scheduler", "Executed Ipc Active": "ipc_active"}
out = {"kind": "ncu_detail", "kernel_regex": regex, "flags": flags}
name = None
for line in open(path):
    m = re.match(r"\s+(\S.*?\S)\s{2,}(\S+)\s+([\d.,]+)\s*$", line)
    if m and m.group(1) in want and want[m.group(1)] not in out:
        v = float(m.group(3).replace(",", ""))
        key = want[m.group(1)]
        if key == "duration": key, v = "duration_us", v / 1000 if m.group(2) == "nsecond" else (v * 1000 if m.group(2) == "msecond" else v)
        out[key] = v
    elif name is None and re.search(regex, line):
        name = line.strip()[:160]
out["kernel"] = name
print(json.dumps(out))
PY
