#!/usr/bin/env bash
# Data-parallel zo2-opt under an MPI launcher, one case per CTest test (examples/tests.cmake):
#   dp_tests.sh CASE ZO2_OPT_BINARY WORK_DIR COMPARE_BINARY "LAUNCHER"
# LAUNCHER is the mpiexec command line with NP where the rank count goes (e.g. "mpiexec -n NP
# --allow-run-as-root --oversubscribe --bind-to none"); empty: this build has no MPI (skipped).
# The same global batch on N ranks must give the single-process run's loss trajectory and export:
# the losses of the first 10 steps to 1e-9 relative, every step's to 1e-7, the weights to 1e-6. (Not
# 1e-9 throughout: the CPU model's float32 forward is not batch-invariant -- a shard's GEMMs round
# some logits differently from the whole batch's, so g differs by ~1e-9 relative, some float32
# weights then round 1 ulp apart, and the difference grows like any float32 rounding: measured on
# the demo, 1e-12 over steps 0-9, 1e-8 by step 30, 4e-7 by step 100.) A dead or hung rank must end
# the run with an error, not a hang.
set -uo pipefail
case_name=$1
bin=$2
work=$3
compare=$4
launcher=${5:-}
tests_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1

if [ -z "$launcher" ]; then
  echo "SKIPPED: zo2-opt was built without MPI, or mpiexec was not found (Debian: libopenmpi-dev openmpi-bin)"
  exit 0
fi
read -r -a launch_words <<<"$launcher"
command -v "${launch_words[0]}" >/dev/null || { echo "SKIPPED: ${launch_words[0]} is not available"; exit 0; }
# Open MPI as root (CI) needs both; vader's single-copy path needs ptrace rights containers lack.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}

fail() { echo "FAIL [$case_name]: $*" >&2; exit 1; }
[ -x "$compare" ] || fail "the run comparer $compare is not built (cmake --build ... --target zo2-compare-runs)"
# shellcheck source=gpu_probe.sh
. "$tests_dir/gpu_probe.sh"

# launch_cmd NP: sets MPI_CMD to the launcher's words with NP ranks.
launch_cmd() {
  MPI_CMD=()
  local w
  for w in "${launch_words[@]}"; do MPI_CMD+=("${w/#NP/$1}"); done
}
# mpi NP ARGS...: the launcher with NP ranks, then ARGS.
mpi() {
  launch_cmd "$1"; shift
  "${MPI_CMD[@]}" "$@"
}

# run_ok NAME CMD...: runs CMD, keeps stdout/stderr in NAME.out/NAME.err, fails on non-zero exit.
run_ok() {
  local name=$1; shift
  local rc=0
  "$@" >"$name.out" 2>"$name.err" || rc=$?
  [ "$rc" -eq 0 ] || { tail -n 30 "$name.out" "$name.err" >&2; fail "'$*' exited with $rc"; }
}

# same_run A B [N]: logs A.jsonl and B.jsonl agree (N steps, default 10, to 1e-9, all to 1e-7
# relative), exports A_export and B_export to 1e-6.
same_run() {
  "$compare" logs "$1.jsonl" "$2.jsonl" 1e-7 "${3:-10}" 1e-9 || fail "$2's loss trajectory differs from $1's"
  "$compare" weights "$1_export/model.safetensors" "$2_export/model.safetensors" 1e-6 ||
    fail "$2's exported weights differ from $1's"
}

# one_printer NAME NP: only rank 0 printed (one end line), and it says the replicas are identical.
one_printer() {
  [ "$(grep -c '^end ' "$1.out")" -eq 1 ] || fail "$1: expected one 'end' line (rank 0 alone prints), got $(grep -c '^end ' "$1.out")"
  grep -q "^parallel  $2 ranks over MPI" "$1.out" || fail "$1: no 'parallel' line for $2 ranks"
  grep -q "^parallel  replicas identical on $2 ranks after step" "$1.out" || fail "$1: the replicas were not reported identical"
}

# pid_of_rank MPIRUN_PID RANK: the pid of that rank among the launcher's children.
pid_of_rank() {
  local p
  for p in $(pgrep -P "$1"); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then echo "$p"; return 0; fi
  done
  return 1
}

# wait_lines FILE N SECONDS: waits until FILE has N lines.
wait_lines() {
  local i
  for ((i = 0; i < $3 * 10; ++i)); do
    [ -f "$1" ] && [ "$(wc -l <"$1")" -ge "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

# wait_exit PID SECONDS: waits for PID to end (returns its status), or returns 124 after SECONDS.
wait_exit() {
  local i
  for ((i = 0; i < $2 * 10; ++i)); do
    kill -0 "$1" 2>/dev/null || { wait "$1"; return $?; }
    sleep 0.1
  done
  return 124
}

common=(--demo --layers 1 --hidden 32 --heads 2 --seq-len 32 --quiet)

case "$case_name" in
  batch)
    # The demo's fixed-length windows: 2 ranks take 2 of every 4 examples.
    run_ok one "$bin" train "${common[@]}" --batch 4 --steps 30 --log one.jsonl --export one_export
    run_ok two mpi 2 "$bin" train "${common[@]}" --batch 4 --steps 30 --log two.jsonl --export two_export
    same_run one two
    one_printer two 2
    [ "$(wc -l <two.jsonl)" -eq 30 ] || fail "two.jsonl has $(wc -l <two.jsonl) lines: rank 0 alone logs"
    # Accumulation with uneven shards: 2 micro-batches of 3 examples, ranks take 1 and 2 of each.
    run_ok one_acc "$bin" train "${common[@]}" --batch 3 --accumulate 2 --optimizer zo-adam --lr 1e-3 --steps 20 \
      --log one_acc.jsonl --export one_acc_export
    run_ok two_acc mpi 2 "$bin" train "${common[@]}" --batch 3 --accumulate 2 --optimizer zo-adam --lr 1e-3 --steps 20 \
      --log two_acc.jsonl --export two_acc_export
    same_run one_acc two_acc
    # Classification with prompts of different lengths: each shard pads to its own longest, and
    # the losses are weighted by scored tokens.
    for i in $(seq 1 24); do
      prompt=$(printf 'x%.0s' $(seq 0 $(((i * 7) % 9))))
      label=$([ $((i % 3)) -eq 0 ] && echo great || echo terrible)
      printf '{"prompt": "%s", "label": "%s"}\n' "$prompt" "$label"
    done >cls.jsonl
    cls=(--data cls.jsonl --template "{prompt} It was" --candidates "terrible,great" --batch 5 --lr 1e-3)
    run_ok one_cls "$bin" train "${common[@]}" "${cls[@]}" --steps 20 --log one_cls.jsonl --export one_cls_export
    run_ok two_cls mpi 2 "$bin" train "${common[@]}" "${cls[@]}" --steps 20 --log two_cls.jsonl --export two_cls_export
    grep -q "cut to --seq-len" one_cls.out && fail "the classification examples were cut: they must differ in length"
    same_run one_cls two_cls 5
    ;;

  np4)
    run_ok one "$bin" train "${common[@]}" --batch 4 --steps 20 --log one.jsonl --export one_export
    run_ok four mpi 4 "$bin" train "${common[@]}" --batch 4 --steps 20 --log four.jsonl --export four_export
    same_run one four
    one_printer four 4
    ;;

  queries)
    # 2 queries on one process = 1 query on each of 2 ranks, every rank the whole batch.
    run_ok one "$bin" train "${common[@]}" --batch 4 --queries 2 --steps 20 --log one.jsonl --export one_export
    run_ok two mpi 2 "$bin" train "${common[@]}" --batch 4 --queries 2 --data-parallel queries --steps 20 \
      --log two.jsonl --export two_export
    same_run one two
    one_printer two 2
    grep -q "data-parallel queries: 1 of 2 queries per rank" two.out || fail "no word of the query split"
    grep -q '"g_queries"' two.jsonl || fail "the log lacks the per-query estimates"
    ;;

  resume)
    run_ok full "$bin" train "${common[@]}" --batch 4 --steps 30 --log full.jsonl --export full_export
    tail -n 10 full.jsonl >full_tail.jsonl
    # 2 ranks to step 20 (checkpoints at 10 and 20), then 1 process from the newest to 30.
    run_ok two_first mpi 2 "$bin" train "${common[@]}" --batch 4 --steps 20 --checkpoint-every 10 --checkpoint-dir ck2
    [ -f ck2/step-00000020/state.json ] || fail "the 2-rank run wrote no checkpoint at step 20: $(ls ck2)"
    run_ok one_resumed "$bin" train --resume ck2 --steps 30 --quiet --log one_resumed.jsonl --export one_resumed_export
    grep -q 'resume    from' one_resumed.out || fail "the resumed run did not say where it resumed from"
    "$compare" logs full_tail.jsonl one_resumed.jsonl 1e-7 || fail "1 rank from a 2-rank checkpoint left the trajectory"
    "$compare" weights full_export/model.safetensors one_resumed_export/model.safetensors 1e-6 ||
      fail "1 rank from a 2-rank checkpoint ends elsewhere"
    # And back: 1 process to step 20, then 2 ranks to 30.
    run_ok one_first "$bin" train "${common[@]}" --batch 4 --steps 20 --checkpoint-every 20 --checkpoint-dir ck1
    run_ok two_resumed mpi 2 "$bin" train --resume ck1 --steps 30 --quiet --log two_resumed.jsonl --export two_resumed_export
    "$compare" logs full_tail.jsonl two_resumed.jsonl 1e-7 || fail "2 ranks from a 1-rank checkpoint left the trajectory"
    "$compare" weights full_export/model.safetensors two_resumed_export/model.safetensors 1e-6 ||
      fail "2 ranks from a 1-rank checkpoint end elsewhere"
    ;;

  gpu_shared_master)
    # Offloaded on the GPU, the 2 ranks of this host share one pinned host master (the default):
    # rank 1 uploads from the blocks rank 0 loaded and writes back. Its run equals 2 ranks with a
    # master each (--host-master per-rank) to the bit, and resumes from its checkpoint bit-exactly.
    # On a one-GPU machine both ranks use it (ZO2_DP_SHARE_GPUS=1). Skipped without a GPU.
    skip_without_gpu --demo
    export ZO2_DP_SHARE_GPUS=1
    gpu=(--demo --layers 4 --hidden 64 --heads 4 --seq-len 32 --batch 4 --device cuda --offload --codec int8
         --writeback-every 2 --optimizer zo-mmt)
    run_ok own mpi 2 "$bin" train "${gpu[@]}" --host-master per-rank --steps 12 --log own.jsonl --export own_export
    run_ok shared mpi 2 "$bin" train "${gpu[@]}" --steps 12 --log shared.jsonl --export shared_export \
      --checkpoint-every 6 --checkpoint-dir ck
    grep -q "host master shared by 2 ranks" shared.out || { cat shared.out >&2; fail "the ranks did not share the host master"; }
    grep -q "host master shared" own.out && fail "--host-master per-rank shared it anyway"
    "$compare" logs own.jsonl shared.jsonl 0 12 0 || fail "the shared master's run differs from a master per rank"
    "$compare" weights own_export/model.safetensors shared_export/model.safetensors 0 ||
      fail "the shared master's export differs from a master per rank"
    tail -n 6 shared.jsonl >shared_tail.jsonl
    rm -rf ck/step-00000012
    run_ok resumed mpi 2 "$bin" train --resume ck --steps 12 --quiet --log resumed.jsonl --export resumed_export
    "$compare" logs shared_tail.jsonl resumed.jsonl 0 6 0 || fail "the resumed shared run left the trajectory"
    "$compare" weights shared_export/model.safetensors resumed_export/model.safetensors 0 ||
      fail "the resumed shared run ends elsewhere"
    ls /dev/shm | grep -q "^zo2-master-" && fail "a shared host master was left in /dev/shm: $(ls /dev/shm)"
    echo "2 ranks on one host shared one host master: bit-identical to a master per rank, resumed bit-exactly"
    ;;

  killed | hung)
    # A long run; once it is stepping, rank 1 is killed (or stopped: alive but silent).
    timeout=60
    [ "$case_name" = hung ] && timeout=3
    launch_cmd 2
    "${MPI_CMD[@]}" "$bin" train "${common[@]}" --batch 4 --steps 200000 --comm-timeout "$timeout" --log run.jsonl \
      >run.out 2>run.err &
    launcher_pid=$!
    victim=""
    ranks=""
    # Whatever happens, leave nothing running: the launcher, then any rank it left.
    cleanup() {
      kill -0 "$launcher_pid" 2>/dev/null && { kill -TERM "$launcher_pid"; sleep 1; kill -KILL "$launcher_pid"; } 2>/dev/null
      local p
      for p in $ranks; do kill -0 "$p" 2>/dev/null && { kill -CONT "$p"; kill -KILL "$p"; } 2>/dev/null; done
      return 0
    }
    trap cleanup EXIT
    wait_lines run.jsonl 5 120 || { cat run.out run.err >&2; fail "the run did not start stepping"; }
    ranks=$(pgrep -P "$launcher_pid" | tr '\n' ' ')
    victim=$(pid_of_rank "$launcher_pid" 1) || fail "cannot find rank 1's process"
    start=$(date +%s.%N)
    if [ "$case_name" = killed ]; then kill -KILL "$victim"; else kill -STOP "$victim"; fi
    rc=0
    wait_exit "$launcher_pid" 90 || rc=$?
    elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    if [ "$rc" -eq 124 ]; then
      fail "the run still hangs 90 s after rank 1 was $([ "$case_name" = killed ] && echo killed || echo stopped)"
    fi
    [ "$rc" -ne 0 ] || fail "the run exited 0 after losing rank 1"
    if [ "$case_name" = hung ]; then
      grep -q "MPI: MPI_Iallreduce of .* on rank 0 of 2 timed out: not every rank answered within 3 s" run.err ||
        { cat run.err >&2; fail "rank 0 did not report the timeout"; }
    fi
    echo "rank 1 $([ "$case_name" = killed ] && echo killed || echo stopped): the run ended with status $rc after $elapsed s"
    grep -m1 "zo2-opt:" run.err || true
    ;;

  diverged)
    # Two ranks that disagree on the learning rate (MPMD launch): the replica check stops both.
    rc=0
    mpi 1 "$bin" train "${common[@]}" --batch 4 --steps 30 --replica-check 5 --lr 4e-3 : \
      -n 1 "$bin" train "${common[@]}" --batch 4 --steps 30 --replica-check 5 --lr 5e-3 >run.out 2>run.err || rc=$?
    [ "$rc" -ne 0 ] || fail "diverging replicas were not noticed"
    grep -q "zo2-opt: replicas diverged: after step 5 the parameters of 1 of 2 ranks differ from rank 0's" run.err ||
      { cat run.err >&2; fail "no clear divergence error naming step 5"; }
    grep -m1 "replicas diverged" run.err
    ;;

  errors)
    # expect NAME REGEX CMD...: CMD fails and its stderr matches REGEX.
    expect() {
      local name=$1 regex=$2; shift 2
      local rc=0
      "$@" >"$name.out" 2>"$name.err" || rc=$?
      [ "$rc" -ne 0 ] || fail "$name: '$*' succeeded"
      grep -Eq -- "$regex" "$name.err" || { cat "$name.err" >&2; fail "$name: stderr does not match /$regex/"; }
      echo "ok: $name: $(grep -Em1 -- "$regex" "$name.err")"
    }
    expect queries "--queries 3 must be a multiple of the 2 ranks" \
      mpi 2 "$bin" train "${common[@]}" --batch 4 --steps 2 --data-parallel queries --queries 3
    expect batch "--batch 1 is smaller than the 2 ranks" mpi 2 "$bin" train "${common[@]}" --batch 1 --steps 2
    expect mode "--data-parallel must be batch or queries, got 'rows'" \
      mpi 2 "$bin" train "${common[@]}" --batch 4 --steps 2 --data-parallel rows
    expect timeout "--comm-timeout must be in" "$bin" train "${common[@]}" --batch 4 --steps 2 --comm-timeout 0
    # One process ignores the data-parallel settings it does not need.
    run_ok single "$bin" train "${common[@]}" --batch 1 --steps 2 --data-parallel queries --queries 3
    ;;

  *)
    fail "unknown case '$case_name'"
    ;;
esac
echo "PASS [$case_name]"
