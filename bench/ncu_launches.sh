#!/usr/bin/env bash
# bench/ncu_launches.sh BENCH_BINARY KERNEL_REGEX [zo2_bench flags...] -- the time of every launch
# of the kernels matching KERNEL_REGEX (Nsight Compute's gpu__time_duration, in launch order) over
# `zo2_bench FLAGS --steps 1 --warmup 1` (MAX launches at most, default 400). Prints one
# {"kind":"ncu_launches"} JSON line per kernel name: its launches' times in us, in order, and
# their sum. ncu serializes kernels and locks base clocks: for comparing launches, not for a
# step's total.
#
#   bash bench/ncu_launches.sh build/bench/zo2_bench packed --model qwen3-8b --policy offload --codec bf16p
set -euo pipefail
bin=$1 regex=$2
shift 2
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
[[ -x $ncu ]] || { echo "ncu_launches.sh: no ncu at $ncu" >&2; exit 1; }
csv=$(mktemp)
trap 'rm -f "$csv"' EXIT
"$ncu" --kernel-name "regex:$regex" --launch-count "${MAX:-400}" --metrics gpu__time_duration.sum --csv \
  "$bin" "$@" --steps 1 --warmup 1 > "$csv" 2> /dev/null || true
python3 - "$csv" "$regex" "$*" <<'PY'
import collections, csv, json, sys
path, regex, flags = sys.argv[1:]
rows = list(csv.reader(l for l in open(path) if l.startswith('"')))
if not rows:
    sys.exit("ncu_launches.sh: ncu printed no kernel rows")
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
