#!/usr/bin/env bash
# bench/device_call.sh -- one call on the lent GPU machine for bench/run_session_bench.sh's plans:
#
#   ZO2_PREBUILD_TARGETS="zo2-opt zo2_bench zo2-compare-runs" bash bench/prebuild.sh   # here
#   run(command="bash bench/device_call.sh e d", carry=["build-device.tar", ".reference"])
#
# On the GPU machine: copies this tree to /tmp/zo2-head (where run_session_bench.sh runs it) and
# takes the binaries from build-device.tar when it was built from these sources
# (bench/source_hash.sh) and every library they link is there (the tokenizer's Debian libraries
# come in the tar's lib/); otherwise it builds them there (~110 s). Then it runs each plan in
# order within the call (ZO2_CALL_S, 585 s from the start)
# and, if time is left, ZO2_EXTRA (a command line, run in the tree's copy). $OUT gets the results
# (*.jsonl), the console (call.txt) and every other log in logs.tgz: few files, since only a
# handful come back from a call.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
targets=(zo2-opt zo2_bench zo2-compare-runs)

start=$(date +%s)
final=${OUT:?run on the device machine, where OUT is set}
work=/tmp/zo2-call
rm -rf "$work" && mkdir -p "$work/logs"
call() {
  src=/tmp/zo2-head
  rm -rf "$src" && mkdir -p "$src"
  (cd "$root" && tar --exclude='./build*' --exclude=./.git --exclude=./.reference -cf - .) | tar -xf - -C "$src" --touch
  hash=$(cd "$root" && bash bench/source_hash.sh)
  export LD_LIBRARY_PATH=$src/build/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}  # prebuild.sh's libraries
  if [[ -f $root/build-device.tar ]] && tar xf "$root/build-device.tar" -C "$src" && mv "$src/build-device" "$src/build" &&
    [[ $(cat "$src/build/zo2-source-hash") == "$hash" ]] &&
    ! ldd "$src/build/examples/zo2-opt" "$src/build/bench/zo2_bench" 2>&1 | grep "not found"; then
    echo "prebuilt binaries (sources $hash)"
  else
    echo "building here (no prebuilt binaries for sources $hash)"
    rm -rf "$src/build"
    cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DZO2_ENABLE_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90a -DZO2_BUILD_TESTS=ON -DZO2_BUILD_BENCH=ON -DZO2_BUILD_EXAMPLES=ON \
      -DZO2_INSTALL=OFF > "$work/logs/configure.log" 2>&1
    cmake --build "$src/build" --target "${targets[@]}" -j "$(nproc)" > "$work/logs/build.log" 2>&1 ||
      { echo "build failed"; tail -30 "$work/logs/build.log"; }
  fi
  echo "ready after $(( $(date +%s) - start )) s"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  left() { echo $(( ${ZO2_CALL_S:-585} - $(date +%s) + start )); }
  for plan in "$@"; do
    (( $(left) > 60 )) || { echo "no time left for plan $plan"; break; }
    echo "== plan $plan ($(left) s left)"
    mkdir -p "$work/$plan"
    ZO2_PLAN=$plan ZO2_TOTAL_S=$(( $(left) - 5 )) OUT="$work/$plan" bash "$root/bench/run_session_bench.sh" \
      > "$work/logs/plan-$plan.txt" 2>&1
    tail -40 "$work/logs/plan-$plan.txt"
    for f in "$work/$plan"/*.jsonl; do [[ -f $f ]] && cp "$f" "$final/$plan-$(basename "$f")"; done
  done
  if [[ -n ${ZO2_EXTRA:-} ]] && (( $(left) > 20 )); then
    echo "== extra: $ZO2_EXTRA ($(left) s left)"
    (cd "$src" && timeout $(( $(left) - 5 )) bash -c "$ZO2_EXTRA") > "$work/logs/extra.txt" 2>&1
    echo "extra rc=$?"; tail -15 "$work/logs/extra.txt"
  fi
  for plan in "$@"; do
    find "$work/$plan" -maxdepth 1 -type f ! -name '*.jsonl' -exec cp {} "$work/logs/" \; 2>/dev/null
  done
  tar czf "$final/logs.tgz" -C "$work" logs
  echo "call done after $(( $(date +%s) - start )) s"
}
call "$@" 2>&1 | tee "$final/call.txt"
