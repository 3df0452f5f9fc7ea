#!/usr/bin/env bash
# bench/ncu_kernels.sh BENCH_BINARY [OUT_JSONL] -- where an OPT step's GPU time goes, by kernel:
# Nsight Compute's gpu__time_duration over a window of launches inside the timed step of
#   zo2_bench --model ${MODEL:-opt-6.7b} --policy ${POLICY:-resident} [--codec $CODEC]
#             --dtype ${DTYPE:-bf16} --steps 1 --warmup 1
# (SKIP, COUNT: the window, default 1000 and 260). ncu serializes kernels and locks base clocks, so
# the times are for shares, not for the step's total. Writes one {"kind":"ncu_summary"} line and
# one {"kind":"ncu_kernel"} line per kernel name (launches, total and mean us, share), largest
# first, to OUT_JSONL (default: stdout). Needs ncu (the CUDA toolkit's, or NCU=path).
set -euo pipefail
bin=$1
out=${2:-/dev/stdout}
model=${MODEL:-opt-6.7b} dtype=${DTYPE:-bf16} policy=${POLICY:-resident} skip=${SKIP:-1000} count=${COUNT:-260}
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
[[ -x $ncu ]] || { echo "ncu_kernels.sh: no ncu at $ncu" >&2; exit 1; }
csv=$(mktemp)
trap 'rm -f "$csv"' EXIT
"$ncu" --metrics gpu__time_duration.sum --csv --launch-skip "$skip" --launch-count "$count" \
  "$bin" --model "$model" --policy "$policy" ${CODEC:+--codec "$CODEC"} --dtype "$dtype" --steps 1 --warmup 1 \
  > "$csv" 2> /dev/null
python3 - "$csv" "$model" "$dtype" "$skip" "$count" "$policy" "${CODEC:-}" > "$out" <<'PY'
import collections, csv, json, sys
path, model, dtype, skip, count, policy, codec = sys.argv[1:]
rows = list(csv.reader(l for l in open(path) if l.startswith('"')))  # ncu's CSV lines only
if not rows:
    sys.exit("ncu_kernels.sh: ncu printed no kernel rows")
head = rows[0]
name, value, unit = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
agg = collections.defaultdict(lambda: [0, 0.0])
for r in rows[1:]:
    us = float(r[value].replace(",", "")) * scale.get(r[unit], 1.0)
    agg[r[name][:120]][0] += 1
    agg[r[name][:120]][1] += us
total = sum(t for _, t in agg.values())
print(json.dumps({"kind": "ncu_summary", "model": model, "policy": policy, "codec": codec or None, "dtype": dtype, "launch_skip": int(skip),
                  "launch_count": int(count), "kernels": len(rows) - 1, "total_us": round(total, 1),
                  "note": "ncu kernel times (base clocks, serialized) over a window of launches of the timed step"}))
for k, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(json.dumps({"kind": "ncu_kernel", "kernel": k, "launches": n, "total_us": round(t, 1),
                      "mean_us": round(t / n, 1), "share": round(t / total, 4)}))
PY
