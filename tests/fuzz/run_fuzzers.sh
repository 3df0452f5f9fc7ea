#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, ASan + UBSan) and runs each for a bounded time; fails
# when any finds a crash, a sanitizer report, a leak, a timeout, an out-of-memory or a failed
# property, printing the reproducer.
#
#   bash tests/fuzz/run_fuzzers.sh [SECONDS] [HARNESS...]
#
# SECONDS per harness (default $ZO2_FUZZ_SECONDS, else 25); HARNESS names (default all:
# safetensors safetensors_index opt_config opt_loader llama_config bpe tokenizer_json data state
# encoded_state packed_bf16; tokenizer_json only where PCRE2 and utf8proc are found).
# Each starts from the committed seed corpus (tests/fuzz/corpus/<name>, never written to) plus
# the inputs earlier runs found in $build/corpus/<name>. A finding is saved in
# $build/artifacts/<name>-crash-... (or leak-, timeout-, oom-); to reproduce it:
#   $build/tests/fuzz/fuzz_<name> FILE
# Fix it, add a regression test in tests/unit, and copy FILE into tests/fuzz/corpus/<name>/
# (the corpus also replays in every build of the CPU test suite: CTest fuzz_corpus_<name>).
# Environment: ZO2_FUZZ_BUILD_DIR (default <repo>/build-fuzz), ZO2_JOBS (build jobs, default
# nproc), CXX_FUZZ (the clang++ to use), ZO2_FUZZ_FLAGS (more libFuzzer flags).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${ZO2_FUZZ_BUILD_DIR:-$root/build-fuzz}
jobs=${ZO2_JOBS:-$(nproc)}
seconds=${ZO2_FUZZ_SECONDS:-25}
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then seconds=$1; shift; fi
all=(safetensors safetensors_index opt_config opt_loader llama_config bpe tokenizer_json data state encoded_state packed_bf16)
if [ $# -gt 0 ]; then harnesses=("$@"); else harnesses=("${all[@]}"); fi

cxx=${CXX_FUZZ:-}
if [ -z "$cxx" ]; then
  for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if command -v "$c" >/dev/null 2>&1; then cxx=$(command -v "$c"); break; fi
  done
fi
if [ -z "$cxx" ]; then
  echo "run_fuzzers.sh: no clang++ found (bash tests/fuzz/install.sh installs it)" >&2
  exit 1
fi

echo "== fuzz: building ${harnesses[*]} with $cxx in $build"
cmake -S "$root" -B "$build" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DZO2_BUILD_FUZZERS=ON -DZO2_BUILD_TESTS=OFF \
  -DZO2_BUILD_EXAMPLES=OFF -DZO2_ENABLE_CUDA=OFF -DZO2_INSTALL=OFF >/dev/null
# A harness whose library was not found (tokenizer_json without PCRE2 / utf8proc) has no target.
available=$(cmake --build "$build" --target help 2>/dev/null || true)
kept=()
for h in "${harnesses[@]}"; do
  if grep -q "fuzz_$h\b" <<<"$available"; then kept+=("$h"); else echo "== fuzz: $h not built here (its libraries were not found)"; fi
done
harnesses=("${kept[@]}")
targets=()
for h in "${harnesses[@]}"; do targets+=(--target "fuzz_$h"); done
cmake --build "$build" -j"$jobs" "${targets[@]}"

artifacts=$build/artifacts
mkdir -p "$artifacts"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/zo2-fuzz-run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
for h in "${harnesses[@]}"; do
  seeds=$here/corpus/$h
  work=$build/corpus/$h
  mkdir -p "$work"
  log=$build/fuzz_$h.log
  echo "== fuzz: $h for ${seconds} s (seeds $seeds)"
  rm -f "$artifacts/$h"-*
  # TMPDIR: the harness's scratch files; rss/malloc limits turn a huge allocation into a finding;
  # -timeout: one input taking 10 s (a quadratic case) is a finding.
  set +e
  TMPDIR=$scratch "$build/tests/fuzz/fuzz_$h" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=1024 -dict="$here/zo2.dict" -artifact_prefix="$artifacts/$h-" -print_final_stats=1 \
    ${ZO2_FUZZ_FLAGS:-} "$work" "$seeds" >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|Done [0-9]+ runs" "$log" | tr '\n' ' ' || true
  echo
  if [ $rc -ne 0 ]; then
    failed+=("$h")
    echo "!! fuzz_$h FAILED (exit $rc); the end of its log ($log):"
    tail -n 60 "$log"
    for f in "$artifacts/$h"-*; do
      [ -e "$f" ] || continue
      echo "!! reproducer: $f ($(stat -c %s "$f") bytes), base64:"
      head -c 4096 "$f" | base64
      echo "!! reproduce: $build/tests/fuzz/fuzz_$h $f"
    done
  fi
done
if ((${#failed[@]})); then
  echo "== fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "== fuzz: ${#harnesses[@]} harnesses ran ${seconds} s each with no finding"
