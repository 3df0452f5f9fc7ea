#!/usr/bin/env bash
# Crash safety: `zo2-opt train` killed with SIGKILL at random moments (checkpoint writes
# included: a checkpoint every step) and resumed each time with --resume ends with an export
# byte-identical to an uninterrupted run's.
#
#   kill_resume.sh ZO2_OPT WORK_DIR [SEED] [KILLS]
#
# The kill delays are drawn from bash's RANDOM seeded with SEED (default 2024), uniform over
# the uninterrupted run's duration, so the kills land in start-up, steps, checkpoint writes and
# the export. Every run is killed after its delay unless it got to the end first (it is then
# checked and the work starts over) until KILLS (default 10) runs were killed; the last is then
# resumed to the end. A run that exits with an error or warns that it will not match, or an
# export or final checkpoint not byte-identical to the uninterrupted run's, fails the test.
# CTest: crash_kill_resume.
set -euo pipefail
bin=$1
work=$2
seed=${3:-2024}
kills=${4:-10}
steps=40
rm -rf "$work"
mkdir -p "$work"
cd "$work"

fail() {
  echo "FAIL: $*" >&2
  exit 1
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }

model=(--demo --layers 1 --hidden 16 --heads 2 --batch 2 --seq-len 16 --seed 7 --device cpu)
# The uninterrupted run, with the same checkpoints (they change nothing but are part of its time).
t0=$(now_ms)
"$bin" train "${model[@]}" --steps $steps --checkpoint-every 1 --checkpoint-dir ref_ck --export ref --quiet \
  >ref.out 2>&1 || { cat ref.out; fail "the uninterrupted run failed"; }
span=$(($(now_ms) - t0))
[ "$span" -ge 20 ] || span=20
echo "uninterrupted run: ${span} ms; killing $kills runs at random moments in [0, ${span}] ms (seed $seed)"

RANDOM=$seed
ck=$PWD/ck
killed=0
torn_writes=0
completed=0
attempt=0
while ((killed < kills)); do
  attempt=$((attempt + 1))
  ((attempt <= 10 * kills + 20)) || fail "only $killed kills after $attempt attempts"
  # Resume from the newest checkpoint when there is one; a run killed before its first
  # checkpoint starts again from scratch.
  if compgen -G "$ck/step-*/state.json" >/dev/null; then
    args=(train --resume "$ck" --steps $steps --checkpoint-every 1 --checkpoint-dir "$ck" --export out --quiet --device cpu)
  else
    args=(train "${model[@]}" --steps $steps --checkpoint-every 1 --checkpoint-dir "$ck" --export out --quiet)
  fi
  "$bin" "${args[@]}" >"run_$attempt.out" 2>&1 &
  pid=$!
  # Uniform over the time this run should take: the steps left, plus start-up and export
  # (counted as 4 steps' worth).
  done_steps=$(cd "$ck" 2>/dev/null && ls -d step-* 2>/dev/null | tail -n 1 | sed 's/step-0*//' || true)
  window=$((span * (steps - ${done_steps:-0} + 4) / (steps + 4)))
  delay_ms=$(((RANDOM * 32768 + RANDOM) % (window + 1)))
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  kill -KILL "$pid" 2>/dev/null || true
  rc=0
  wait "$pid" 2>/dev/null || rc=$?
  if [ "$rc" -eq 137 ]; then
    killed=$((killed + 1))
    newest=$(cd "$ck" 2>/dev/null && ls -d step-* 2>/dev/null | tail -n 1 || true)
    # A checkpoint or export is staged in .<name>.tmp.<pid> and renamed into place: one left
    # behind means this kill landed in the middle of writing it.
    torn=$(ls -d "$ck"/.*.tmp."$pid" .*.tmp."$pid" 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ' || true)
    [ -z "$torn" ] || torn_writes=$((torn_writes + 1))
    echo "run $attempt: killed after ${delay_ms} ms (newest checkpoint: ${newest:-none})${torn:+, in the middle of writing $torn}"
    continue
  fi
  if [ "$rc" -ne 0 ]; then
    cat "run_$attempt.out" >&2
    fail "run $attempt (${args[*]}) exited with $rc after $killed kills"
  fi
  if grep -q "will not match" "run_$attempt.out"; then
    cat "run_$attempt.out" >&2
    fail "run $attempt says it will not match an uninterrupted run"
  fi
  # The run got to the end before its kill: it must have the uninterrupted run's result. Then
  # start over, until the kills are spent.
  for f in model.safetensors config.json; do
    cmp "ref/$f" "out/$f" || fail "out/$f differs from the uninterrupted run's (run $attempt, after $killed kills)"
  done
  cmp ref_ck/step-000000$steps/model.safetensors "$ck/step-000000$steps/model.safetensors" ||
    fail "the last checkpoint's weights differ from the uninterrupted run's (run $attempt)"
  completed=$((completed + 1))
  echo "run $attempt: completed before its kill at ${delay_ms} ms, export byte-identical; starting over"
  rm -rf "$ck" out
done

# The last killed run's work, resumed to the end without a kill.
attempt=$((attempt + 1))
if compgen -G "$ck/step-*/state.json" >/dev/null; then
  args=(train --resume "$ck" --steps $steps --checkpoint-every 1 --checkpoint-dir "$ck" --export out --quiet --device cpu)
else
  args=(train "${model[@]}" --steps $steps --checkpoint-every 1 --checkpoint-dir "$ck" --export out --quiet)
fi
"$bin" "${args[@]}" >"run_$attempt.out" 2>&1 || { cat "run_$attempt.out" >&2; fail "the final run failed"; }
if grep -q "will not match" "run_$attempt.out"; then
  cat "run_$attempt.out" >&2
  fail "the final run says it will not match an uninterrupted run"
fi
for f in model.safetensors config.json; do
  cmp "ref/$f" "out/$f" || fail "out/$f differs from the uninterrupted run's after $killed kills"
done
cmp ref_ck/step-000000$steps/model.safetensors "$ck/step-000000$steps/model.safetensors" ||
  fail "the last checkpoint's weights differ from the uninterrupted run's"
completed=$((completed + 1))
echo "PASS: $killed kills at random moments ($torn_writes while a checkpoint or export was being written), resumed each time; $completed runs completed, each export byte-identical to the uninterrupted run's"
