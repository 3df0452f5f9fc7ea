#!/usr/bin/env bash
# bench/ab_offload.sh BENCH_BINARY [MODEL...] -- the offloaded step with one perturbed copy (the
# default) and with two (--two-copies), alternated three times per model so drift hits both
# alike; bf16 codec, the reference protocol. JSON lines on stdout, a summary on stderr.
set -uo pipefail
bin=$1; shift
models=("$@")
[[ ${#models[@]} -eq 0 ]] && models=(opt-1.3b opt-6.7b)
for m in "${models[@]}"; do
  for rep in 1 2 3; do
    for copies in one two; do
      extra=()
      [[ $copies == two ]] && extra=(--two-copies)
      line=$("$bin" --model "$m" --policy offload --codec bf16 --dtype bf16 --steps 8 --warmup 2 "${extra[@]}" 2>/dev/null |
        grep '"kind":"config"')
      echo "$line"
      python3 -c "
import json, sys
d = json.loads(sys.stdin.read())
print('$m $copies copies, rep $rep: step', round(d['step_s_median'], 5), 's, floor', round(d['floor_s'], 5),
      's, zo2 GB', round(d['gpu_zo2_peak_bytes'] / 1e9, 3))" <<< "$line" >&2
    done
  done
done
