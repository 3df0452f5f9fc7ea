#!/usr/bin/env bash
# bench/ncu_kernel.sh MODE BENCH_BINARY KERNEL_REGEX [zo2_bench flags...] -- Nsight Compute on
# the kernels matching KERNEL_REGEX inside `zo2_bench FLAGS --steps 1 --warmup 1` (the warm-up is
# the run's first step: its passes apply no update). ncu locks base clocks and serializes kernels:
# its times compare launches and kernels, not steps.
#
#   detail    what limits one launch: the first match after SKIP (default 20) matching launches;
#             throughput (SpeedOfLight), occupancy, scheduler and warp-state sections. Prints the
#             details page and one {"kind":"ncu_detail"} JSON line of the headline metrics.
#   launches  the time of every matching launch, in order (MAX at most, default 400): one
#             {"kind":"ncu_launches"} JSON line per kernel name with its times (us) and their sum.
#
#   bash bench/ncu_kernel.sh detail build/bench/zo2_bench row_kernel --model opt-6.7b --policy offload --codec int8
#   bash bench/ncu_kernel.sh launches build/bench/zo2_bench packed --model qwen3-8b --policy offload --codec bf16p
set -euo pipefail
mode=$1 bin=$2 regex=$3
shift 3
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
[[ -x $ncu ]] || { echo "ncu_kernel.sh: no ncu at $ncu" >&2; exit 1; }
report=$(mktemp)
trap 'rm -f "$report"' EXIT
case $mode in
  detail)
    "$ncu" --kernel-name "regex:$regex" --launch-skip "${SKIP:-20}" --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
      --section LaunchStats "$bin" "$@" --steps 1 --warmup 1 > "$report" 2> /dev/null || true
    grep -E "^  [A-Za-z]|^    [A-Za-z]" "$report" | grep -vE "^\s+(-|OPT|WRN|INF)" || { echo "ncu_kernel.sh: no ncu report" >&2; exit 1; }
    python3 - "$report" "$regex" "$*" <<'PY'
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
    elif name is None and re.search(regex, line) and not line.startswith("=="):
        name = line.strip()[:160]
out["kernel"] = name
print(json.dumps(out))
PY
    ;;
  launches)
    "$ncu" --kernel-name "regex:$regex" --launch-count "${MAX:-400}" --metrics gpu__time_duration.sum --csv \
      "$bin" "$@" --steps 1 --warmup 1 > "$report" 2> /dev/null || true
    python3 - "$report" "$regex" "$*" <<'PY'
import collections, csv, json, sys
path, regex, flags = sys.argv[1:]
rows = list(csv.reader(l for l in open(path) if l.startswith('"')))
if not rows:
    sys.exit("ncu_kernel.sh: ncu printed no kernel rows")
head = rows[0]
name, value, unit = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
times = collections.OrderedDict()
for r in rows[1:]:
    k = r[name].split("(")[0].split("<")[0].strip()[-60:]
    times.setdefault(k, []).append(round(float(r[value].replace(",", "")) * scale.get(r[unit], 1.0), 1))
for k, t in times.items():
    print(json.dumps({"kind": "ncu_launches", "kernel": k, "regex": regex, "flags": flags, "launches": len(t),
                      "total_us": round(sum(t), 1), "us": t}))
PY
    ;;
  *) echo "ncu_kernel.sh: MODE is detail or launches, not $mode" >&2; exit 2 ;;
esac
