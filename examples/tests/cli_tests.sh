#!/usr/bin/env bash
# Tests of the zo2-opt program, one case per CTest test (examples/tests.cmake):
#   cli_tests.sh CASE ZO2_OPT_BINARY WORK_DIR REPO_ROOT
# Each case runs in an empty WORK_DIR and fails with a message naming what went wrong.
set -uo pipefail
case_name=$1
bin=$2
work=$3
root=$4
corpus=$root/examples/zo2_opt/data/demo_corpus.txt
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1

fail() { echo "FAIL [$case_name]: $*" >&2; exit 1; }

# run_ok NAME CMD...: runs CMD, keeps stdout/stderr in NAME.out/NAME.err, fails on non-zero exit.
run_ok() {
  local name=$1; shift
  local rc=0
  "$@" >"$name.out" 2>"$name.err" || rc=$?
  [ "$rc" -eq 0 ] || { cat "$name.out" "$name.err" >&2; fail "'$*' exited with $rc"; }
}

# expect_error REGEX CMD...: CMD must exit non-zero with exactly one line on stderr matching REGEX.
expect_error() {
  local regex=$1; shift
  local rc=0
  "$@" >err.out 2>err.err || rc=$?
  [ "$rc" -ne 0 ] || fail "'$*' succeeded; expected an error matching /$regex/"
  local lines
  lines=$(wc -l <err.err)
  [ "$lines" -eq 1 ] || { cat err.err >&2; fail "'$*' printed $lines lines on stderr, expected one"; }
  grep -Eq -- "$regex" err.err || { cat err.err >&2; fail "'$*': stderr does not match /$regex/"; }
  echo "ok: exit $rc: $(cat err.err)"
}

json_field() {  # json_field FILE KEY: the value of "KEY": in the summary line
  grep -o "\"$2\":[^,}]*" "$1" | tail -1 | cut -d: -f2
}

case "$case_name" in
  demo)
    # A fresh cwd with nothing in it: the demo needs no files.
    run_ok demo "$bin" train --demo --steps 60
    grep -q '^start ' demo.out || fail "no start loss printed"
    grep -q '^end ' demo.out || fail "no end loss printed"
    start=$(json_field demo.out start_loss)
    end=$(json_field demo.out end_loss)
    awk -v s="$start" -v e="$end" 'BEGIN { exit !(e < s) }' || fail "loss did not fall: $start -> $end"
    grep -q 'step 60/60' demo.err || fail "no progress line for the last step"
    echo "demo loss $start -> $end"
    ;;

  help)
    run_ok top "$bin" --help
    for c in train eval generate tokenize; do
      run_ok "help_$c" "$bin" "$c" --help
      grep -q "^Usage: zo2-opt $c" "help_$c.out" || fail "$c --help has no usage line"
    done
    for c in train eval generate; do
      for f in --offload --codec --gpu-memory-budget; do
        grep -q -- "^  $f" "help_$c.out" || fail "$c --help does not document $f"
      done
    done
    ;;

  checkpoint_resume)
    common=(--demo --layers 1 --hidden 32 --heads 2 --batch 4 --seq-len 32 --quiet)
    # Uninterrupted: 30 steps.
    run_ok full "$bin" train "${common[@]}" --steps 30 --export full_export --log full.jsonl
    [ "$(wc -l <full.jsonl)" -eq 30 ] || fail "--log wrote $(wc -l <full.jsonl) lines for 30 steps"
    grep -q '"loss_plus"' full.jsonl && grep -q '"tokens_per_s"' full.jsonl || fail "log lines lack fields"
    # Interrupted: 15 steps with a checkpoint every 5, then resumed from the newest to 30.
    run_ok first "$bin" train "${common[@]}" --steps 15 --checkpoint-every 5 --checkpoint-dir ck
    for s in 00000005 00000010 00000015; do
      for f in state.json config.json model.safetensors vocab.json merges.txt; do
        [ -f "ck/step-$s/$f" ] || fail "checkpoint step-$s lacks $f"
      done
    done
    if ls -a ck | grep -q tmp; then fail "a temporary directory was left in ck/: $(ls -a ck)"; fi
    grep -q '"step": 15' ck/step-00000015/state.json || fail "state.json does not record step 15"
    run_ok resumed "$bin" train --resume ck --steps 30 --export resumed_export --quiet
    grep -q 'resume    from' resumed.out || fail "the resumed run did not say where it resumed from"
    cmp full_export/model.safetensors resumed_export/model.safetensors ||
      fail "resumed run's weights differ from the uninterrupted run's"
    # Resuming from a specific step directory, and checkpointing on the way, changes nothing.
    run_ok resumed2 "$bin" train --resume ck/step-00000010 --steps 30 --checkpoint-every 7 --checkpoint-dir ck2 --export resumed2_export --quiet
    cmp full_export/model.safetensors resumed2_export/model.safetensors ||
      fail "resume from step 10 with checkpoints differs from the uninterrupted run"
    echo "resumed weights are bit-identical"
    # state.json records where the run computed; a resume elsewhere says it will not be bit-exact.
    grep -q '"engine"' ck/step-00000015/state.json && grep -q '"device": "cpu"' ck/step-00000015/state.json ||
      fail "state.json does not record the engine"
    if grep -q "computed on" resumed.out; then fail "a same-device resume warned about a device change"; fi
    cp -r ck/step-00000015 moved_ck &&
      sed -i 's/"description": "[^"]*"/"description": "cuda (Some GPU)"/' moved_ck/state.json
    run_ok moved "$bin" train --resume moved_ck --steps 16 --quiet --device cpu
    grep -q "note      the checkpoint was computed on cuda (Some GPU), this run on cpu" moved.out ||
      fail "no note that the device changed: $(grep note moved.out)"
    # A checkpoint from another noise scheme (or from before state.json recorded one) says so.
    grep -q '"noise_scheme"' ck/step-00000015/state.json || fail "state.json does not record the noise scheme"
    if grep -q "noise scheme" resumed.out; then fail "a same-scheme resume warned about the noise scheme"; fi
    cp -r ck/step-00000015 old_scheme_ck && sed -i '/"noise_scheme"/d' old_scheme_ck/state.json
    run_ok old_scheme "$bin" train --resume old_scheme_ck --steps 16 --quiet
    grep -q "note      the checkpoint was written under noise scheme 1" old_scheme.out ||
      fail "no note that the noise scheme changed: $(grep note old_scheme.out)"
    # A checkpoint's offload_state.safetensors (the int8 offload codec's codes) is checked on resume.
    cp -r ck/step-00000015 bad_ck && printf 'not safetensors' >bad_ck/offload_state.safetensors
    expect_error "bad_ck/offload_state.safetensors" "$bin" train --resume bad_ck --steps 16 --quiet
    ;;

  export_reload)
    run_ok train "$bin" train --demo --layers 1 --hidden 32 --heads 2 --batch 4 --seq-len 32 --steps 20 --quiet --export exported
    for f in config.json model.safetensors vocab.json merges.txt; do [ -f "exported/$f" ] || fail "export lacks $f"; done
    # Our loader re-reads the export: the loss on the same data and batches is the same number.
    run_ok eval "$bin" eval --model exported --text "$corpus" --seq-len 32 --batch 4
    trained=$(json_field train.out end_loss)
    reread=$(json_field eval.out loss)
    [ "$trained" = "$reread" ] || fail "loss after export+reload $reread != loss at the end of training $trained"
    run_ok per_example "$bin" eval --model exported --text "$corpus" --seq-len 32 --per-example --limit 3
    [ "$(grep -c '"origin"' per_example.out)" -eq 3 ] || fail "--per-example did not print 3 lines"
    run_ok gen "$bin" generate --model exported --prompt "The old man" --max-new-tokens 8
    grep -q '^The old man' gen.out || fail "generate did not echo the prompt"
    run_ok gen_json "$bin" generate --model exported --prompt "The" --max-new-tokens 6 --temperature 0.8 --top-p 0.9 --seed 3 --json
    grep -q '"completion"' gen_json.out || fail "generate --json printed no completion"
    run_ok dump "$bin" generate --model exported --input-ids 2,40,41 --max-new-tokens 0 --dump-logits logits.npy
    [ "$(wc -c <logits.npy)" -eq $((128 + 4 * 3 * 260)) ] || fail "logits.npy has $(wc -c <logits.npy) bytes, expected a [3, 260] float32 .npy"
    run_ok tok "$bin" tokenize --tokenizer exported --text "Hi"
    [ "$(cat tok.out)" = "[2,76,109]" ] || fail "byte tokenizer via exported files: $(cat tok.out)"
    run_ok fixture_tok "$bin" tokenize --tokenizer "$root/tests/fixtures/tokenizer" --text "Hello world" --no-bos
    [ "$(cat fixture_tok.out)" = "[43,287,586,303,288,79,71]" ] || fail "fixture tokenizer: $(cat fixture_tok.out)"
    echo "loss $trained == $reread after reload"
    ;;

  data_formats)
    small=(--demo --layers 1 --hidden 32 --heads 2 --batch 4 --seq-len 48 --steps 5 --quiet)
    printf '%s\n' '{"prompt": "A wonderful, moving film.", "label": "great"}' \
      '{"prompt": "Dull and far too long.", "label": "terrible"}' \
      '{"prompt": "I loved every minute.", "label": 0}' >cls.jsonl
    run_ok cls "$bin" train "${small[@]}" --data cls.jsonl --template "{prompt} It was" --candidates "great,terrible"
    grep -q 'accuracy' cls.out || fail "classification training printed no accuracy"
    printf '%s\n' '{"text": "The sun rose over the valley."}' '{"text": "Rain fell in the night."}' >lm.jsonl
    run_ok lm "$bin" train "${small[@]}" --data lm.jsonl --eval-data lm.jsonl --eval-every 2
    printf '%s\n' '{"input_ids": [2, 10, 11, 12, 13]}' '{"input_ids": [2, 20, 21], "labels": [-100, 20, 21]}' >ids.jsonl
    run_ok ids "$bin" train "${small[@]}" --data ids.jsonl
    run_ok text "$bin" train "${small[@]}" --text "$corpus" --lr-schedule cosine --warmup 2
    ;;

  optimizers)
    # Every rule of the family lowers the demo's loss; a stateful rule with several queries and
    # accumulation resumes bit-exactly; bad combinations name the flag.
    for opt in zo-sgd zo-sign zo-mmt zo-adam zo-cons; do
      lr=4e-3
      [ "$opt" = zo-adam ] && lr=2e-3
      [ "$opt" = zo-mmt ] && lr=4e-4  # momentum 0.9 multiplies the step by ~10
      run_ok "$opt" "$bin" train --demo --device cpu --steps 150 --optimizer "$opt" --lr "$lr" --quiet
      grep -q "^optimizer $opt" "$opt.out" || fail "$opt: the optimizer line does not name it"
      start=$(json_field "$opt.out" start_loss)
      end=$(json_field "$opt.out" end_loss)
      awk -v s="$start" -v e="$end" 'BEGIN { exit !(e < s - 0.05) }' || fail "$opt: loss did not fall: $start -> $end"
      echo "$opt: demo loss $start -> $end"
    done
    common=(--demo --device cpu --optimizer zo-adam --lr 1e-3 --queries 2 --accumulate 2 --estimator one-side --quiet)
    run_ok straight "$bin" train "${common[@]}" --steps 20 --export straight --log straight.jsonl
    run_ok first "$bin" train "${common[@]}" --steps 10 --checkpoint-every 10 --checkpoint-dir ck
    [ -f ck/step-00000010/optimizer_state.safetensors ] || fail "no optimizer_state.safetensors in the checkpoint"
    run_ok resumed "$bin" train --resume ck --steps 20 --export resumed
    grep -q "^optimizer zo-adam .*one-side estimate, 2 queries.* x 2 accumulated" resumed.out ||
      fail "the resumed run did not take the checkpoint's optimizer settings"
    cmp straight/model.safetensors resumed/model.safetensors || fail "zo-adam resumed is not bit-identical"
    grep -q '"g_queries":\[' straight.jsonl || fail "the log has no per-query g"
    expect_error "--queries: .*zo-cons takes one query" "$bin" train --demo --optimizer zo-cons --queries 2
    expect_error "--weight-decay: .*zo-cons" "$bin" train --demo --optimizer zo-cons --weight-decay 0.1
    expect_error "--momentum applies only to --optimizer zo-mmt" "$bin" train --demo --momentum 0.5
    expect_error "--beta2: .*must be in \[0, 1\)" "$bin" train --demo --optimizer zo-adam --beta2 1
    expect_error "--optimizer.*unknown optimizer 'zo-lion'" "$bin" train --demo --optimizer zo-lion
    expect_error "--estimator.*unknown estimator 'three-side'" "$bin" train --demo --estimator three-side
    expect_error "--accumulate must be in \[1, 4096\]" "$bin" train --demo --accumulate 0
    ;;

  errors)
    mkdir -p empty_model config_only
    echo '{}' >config_only/config.json
    expect_error "empty_model/config.json: missing" "$bin" train --model empty_model --text "$corpus"
    expect_error "config_only/model.safetensors: missing" "$bin" train --model config_only --text "$corpus"
    printf '%s\n' '{"text": "fine"}' '{"text": broken' >bad.jsonl
    expect_error "bad.jsonl:2: not valid JSON" "$bin" train --demo --data bad.jsonl
    printf '%s\n' '{"prompt": "ok", "label": "great"}' '{"prompt": "meh", "label": "so-so"}' >labels.jsonl
    expect_error "labels.jsonl:2: label 'so-so' is not among the candidates \(great, terrible\)" \
      "$bin" train --demo --data labels.jsonl --candidates "great,terrible"
    python3 -c 'print("{\"input_ids\": [" + ",".join(["5"] * 300) + "]}")' >long.jsonl 2>/dev/null ||
      { printf '{"input_ids": [2'; for _ in $(seq 300); do printf ',5'; done; printf ']}\n'; } >long.jsonl
    expect_error "long.jsonl:1: sequence of 300 tokens is longer than max_position_embeddings = 256" \
      "$bin" train --demo --data long.jsonl
    expect_error "--seq-len 1000 is longer than the model's max_position_embeddings = 256" "$bin" train --demo --seq-len 1000
    expect_error "--device cuda: (this zo2-opt was built without CUDA|no CUDA GPU is present)" "$bin" train --demo --device cuda
    expect_error "unknown option '--bogus'" "$bin" train --demo --bogus
    expect_error "unknown option '--lr'" "$bin" tokenize --bytes --lr 1
    expect_error "--lr expects a number, got 'fast'" "$bin" train --demo --lr fast
    expect_error "unknown command 'trian'" "$bin" trian
    expect_error "(offload not available in this build|--offload streams weights to a GPU)" "$bin" train --demo --offload
    expect_error "nothing.jsonl: no such file" "$bin" train --demo --data nothing.jsonl
    ;;

  gpu)
    # The CUDA paths of zo2-opt: resident and offloaded (each codec, a memory budget), each
    # resumed bit-exactly from a checkpoint. Skipped (and says so) without a GPU.
    if ! "$bin" train --demo --device cuda --steps 1 --quiet >probe.out 2>probe.err; then
      if grep -Eq "built without CUDA|no CUDA GPU is present" probe.err; then
        echo "SKIPPED: no CUDA device ($(cat probe.err))"
        exit 0
      fi
      cat probe.out probe.err >&2
      fail "train --device cuda failed"
    fi
    common=(--demo --layers 2 --hidden 64 --heads 4 --batch 4 --seq-len 32 --quiet --device cuda)
    declare -A modes=(
      [resident]=""
      [fp32]="--offload --codec fp32"
      [bf16]="--offload --codec bf16"
      [fp16]="--offload --codec fp16"
      [int8]="--offload --codec int8"
      [bf16p]="--offload --codec bf16p"
      [bf16_budget]="--offload --codec bf16 --gpu-memory-budget 0.001"
    )
    for mode in resident fp32 bf16 fp16 int8 bf16p bf16_budget; do
      # shellcheck disable=SC2206
      extra=(${modes[$mode]})
      run_ok "full_$mode" "$bin" train "${common[@]}" "${extra[@]}" --steps 24 --export "full_$mode"
      start=$(json_field "full_$mode.out" start_loss)
      end=$(json_field "full_$mode.out" end_loss)
      awk -v s="$start" -v e="$end" 'BEGIN { exit !(e < s) }' || fail "$mode: loss did not fall: $start -> $end"
      [ -n "${extra[*]}" ] && { grep -q "offload: master and transfer ${extra[2]}" "full_$mode.out" || fail "$mode: the log does not state the codec"; }
      [ -n "${extra[*]}" ] && { grep -qE "blocks streamed through [23] slots|all [0-9]+ blocks resident" "full_$mode.out" || fail "$mode: the log does not state the offload plan"; }
      run_ok "first_$mode" "$bin" train "${common[@]}" "${extra[@]}" --steps 12 --checkpoint-every 6 --checkpoint-dir "ck_$mode"
      run_ok "resumed_$mode" "$bin" train --resume "ck_$mode" --device cuda "${extra[@]}" --steps 24 --export "resumed_$mode" --quiet
      if [ "$mode" = int8 ]; then
        # Float weights alone would be re-quantized with fresh row scales: the checkpoint keeps
        # the codes and scales, and the resumed run restores them.
        [ -f "ck_$mode/step-00000012/offload_state.safetensors" ] || fail "int8 checkpoint lacks offload_state.safetensors"
        grep -q "restored the int8 codec's codes and row scales" "resumed_$mode.out" ||
          fail "the int8 resume did not restore the encoded state"
      elif ls "ck_$mode"/step-*/offload_state.safetensors >/dev/null 2>&1; then
        fail "$mode: a checkpoint holds offload_state.safetensors, which only the int8 codec needs"
      fi
      cmp "full_$mode/model.safetensors" "resumed_$mode/model.safetensors" ||
        fail "$mode: the resumed run's weights differ from the uninterrupted run's"
      echo "$mode: loss $start -> $end, resume bit-exact"
    done
    # fp32 streamed through the offload engine computes exactly what the resident GPU run does.
    cmp full_resident/model.safetensors full_fp32/model.safetensors ||
      fail "offload fp32 and resident runs differ"
    # The packed bf16 codec holds exactly the bf16 codec's values, so it trains identically.
    cmp full_bf16/model.safetensors full_bf16p/model.safetensors || fail "the bf16p and bf16 codecs trained differently"
    # The CPU and the GPU agree to rounding on the start loss (different summation orders).
    run_ok cpu "$bin" train --demo --layers 2 --hidden 64 --heads 4 --batch 4 --seq-len 32 --quiet --device cpu --steps 1
    awk -v a="$(json_field cpu.out start_loss)" -v b="$(json_field full_resident.out start_loss)" \
      'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-4 * (a < 0 ? -a : a)) }' ||
      fail "CPU start loss $(json_field cpu.out start_loss) != GPU $(json_field full_resident.out start_loss)"
    expect_error "gpu_memory_budget" "$bin" train "${common[@]}" --offload --gpu-memory-budget 0.0000001 --steps 1
    echo "offload fp32 == resident; CPU and GPU start losses agree"

    # eval and generate offloaded: the blocks stream through the slots, unperturbed, and give
    # the resident numbers (fp32 codec: the same weights; bf16: the weights rounded to bf16).
    ev=(eval --model full_resident --text "$corpus" --seq-len 32 --batch 4 --limit 24 --device cuda)
    run_ok eval_resident "$bin" "${ev[@]}"
    run_ok eval_fp32 "$bin" "${ev[@]}" --offload --codec fp32
    run_ok eval_fp32_budget "$bin" "${ev[@]}" --offload --codec fp32 --gpu-memory-budget 0.002
    run_ok eval_bf16 "$bin" "${ev[@]}" --offload --codec bf16
    # close A B REL: |A - B| <= REL * |A|
    close() { awk -v a="$1" -v b="$2" -v r="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; m = a < 0 ? -a : a; exit !(a != "" && d <= r * m) }'; }
    resident_loss=$(json_field eval_resident.out loss)
    for m in fp32:1e-6 fp32_budget:1e-6 bf16:2e-2; do
      name=${m%%:*}
      close "$resident_loss" "$(json_field "eval_$name.out" loss)" "${m#*:}" ||
        fail "offloaded eval ($name) loss $(json_field "eval_$name.out" loss) != resident $resident_loss"
    done
    expect_error "eval: --codec and --gpu-memory-budget apply only with --offload" "$bin" "${ev[@]}" --codec bf16
    gen=(generate --model full_resident --input-ids 2,40,41,42 --max-new-tokens 12 --ignore-eos --json --device cuda)
    run_ok gen_resident "$bin" "${gen[@]}" --dump-logits resident.npy
    run_ok gen_fp32 "$bin" "${gen[@]}" --offload --codec fp32 --dump-logits fp32.npy
    run_ok gen_bf16 "$bin" "${gen[@]}" --offload --codec bf16 --gpu-memory-budget 0.001
    cmp resident.npy fp32.npy || fail "generate --offload --codec fp32: the prompt's logits differ from the resident run's"
    [ "$(grep -o '"ids":\[[^]]*\]' gen_resident.out)" = "$(grep -o '"ids":\[[^]]*\]' gen_fp32.out)" ] ||
      fail "generate --offload --codec fp32 sampled other tokens: $(cat gen_fp32.out) vs $(cat gen_resident.out)"
    grep -q '"completion"' gen_bf16.out || fail "generate --offload --codec bf16 printed no completion"
    echo "offloaded eval == resident eval (loss $resident_loss; bf16 $(json_field eval_bf16.out loss)); offloaded generate == resident"
    ;;

  *) fail "unknown case" ;;
esac
echo "PASS [$case_name]"
