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
tests_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1

fail() { echo "FAIL [$case_name]: $*" >&2; exit 1; }
# shellcheck source=gpu_probe.sh
. "$tests_dir/gpu_probe.sh"

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

# The LLaMA-family fixtures (tests/fixtures/llama: tiny HF checkpoints, vocabulary 128, no
# tokenizer) and tokenizer.json fixtures (tests/fixtures/tokenizer_json).
llama_fixtures=$root/tests/fixtures/llama
tokenizer_json=$root/tests/fixtures/tokenizer_json

# make_ids FILE: pre-tokenized {"input_ids"} JSONL for the LLaMA fixtures, from the demo corpus:
# byte b becomes id 3 + b % 125 (inside their vocabulary of 128), in windows of 32 tokens.
make_ids() {
  od -An -v -tu1 "$corpus" | tr -s ' \t' '\n\n' | grep -v '^$' |
    awk '{ id = 3 + $1 % 125; line = line (n ? "," : "") id; n++
           if (n == 32) { print "{\"input_ids\": [" line "]}"; line = ""; n = 0 } }' >"$1"
  [ "$(wc -l <"$1")" -ge 50 ] || fail "make_ids wrote $(wc -l <"$1") lines"
}

# has_tokenizer_json: whether this build reads tokenizer.json (zo2::tokenizers: PCRE2 + utf8proc).
has_tokenizer_json() {
  "$bin" tokenize --tokenizer "$tokenizer_json/qwen2" --text x >/dev/null 2>&1
}

# loss_fell FILE [MARGIN]: the summary's end_loss is below its start_loss by more than MARGIN.
loss_fell() {
  local start end
  start=$(json_field "$1" start_loss)
  end=$(json_field "$1" end_loss)
  awk -v s="$start" -v e="$end" -v m="${2:-0}" 'BEGIN { exit !(s != "" && e < s - m) }'
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
    # Shards: an export larger than ZO2_OPT_MAX_SHARD_BYTES goes into transformers' shards and
    # index (written group by group); it re-loads to the same loss, and a run resumed from a
    # sharded checkpoint ends where an uninterrupted one does.
    run_ok train_sharded env ZO2_OPT_MAX_SHARD_BYTES=20000 "$bin" train --demo --layers 1 --hidden 32 --heads 2 --batch 4 \
      --seq-len 32 --steps 20 --quiet --export sharded
    [ -f sharded/model.safetensors.index.json ] || fail "sharded export lacks model.safetensors.index.json"
    [ ! -e sharded/model.safetensors ] || fail "sharded export also wrote model.safetensors"
    shards=$(ls sharded/model-0*-of-0*.safetensors | wc -l)
    [ "$shards" -gt 1 ] || fail "sharded export wrote $shards shards"
    run_ok eval_sharded "$bin" eval --model sharded --text "$corpus" --seq-len 32 --batch 4
    [ "$(json_field eval_sharded.out loss)" = "$trained" ] || fail "loss after a sharded export+reload $(json_field eval_sharded.out loss) != $trained"
    run_ok ck_sharded env ZO2_OPT_MAX_SHARD_BYTES=20000 "$bin" train --demo --layers 1 --hidden 32 --heads 2 --batch 4 \
      --seq-len 32 --steps 10 --quiet --checkpoint-every 10 --checkpoint-dir ck_sharded
    [ -f ck_sharded/step-00000010/model.safetensors.index.json ] || fail "sharded checkpoint lacks its index"
    run_ok resume_sharded "$bin" train --resume ck_sharded --steps 20 --quiet --export resumed_sharded
    cmp -s exported/model.safetensors resumed_sharded/model.safetensors || fail "resumed from a sharded checkpoint, the export differs from an uninterrupted run's"
    expect_error "ZO2_OPT_MAX_SHARD_BYTES must be a positive byte count" env ZO2_OPT_MAX_SHARD_BYTES=0 "$bin" train --demo \
      --layers 1 --hidden 32 --heads 2 --batch 4 --seq-len 32 --steps 1 --quiet --export never
    echo "loss $trained == $reread after reload ($shards shards: the same)"
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
    expect_error "--optimizer-state applies only with --offload" "$bin" train --demo --optimizer-state bf16
    expect_error "--optimizer-state wants fp32 or bf16, got 'fp8'" "$bin" train --demo --optimizer-state fp8
    expect_error "train: --compute applies only with --device cuda" "$bin" train --demo --device cpu --compute bf16
    expect_error "train: --two-copies applies only with --offload" "$bin" train --demo --two-copies
    expect_error "train: --slots applies only with --offload" "$bin" train --demo --slots 3
    expect_error "train: --slots wants 2 to 8, got 1" "$bin" train --demo --slots 1
    expect_error "eval: --compute must be fp32 or bf16, got 'fp8'" "$bin" eval --model nothing --device cpu --compute fp8
    expect_error "generate: --compute applies only with --device cuda" "$bin" generate --model nothing --device cpu --compute bf16 --input-ids 2
    # tokenize --decode reads untrusted JSON: 300,000 nested brackets (a stack overflow when an
    # element was shown in the message) and an id past 2^31 (once wrapped to a valid id).
    awk 'BEGIN { for (i = 0; i < 300000; i++) printf "["; for (i = 0; i < 300000; i++) printf "]" }' >deep_ids.json
    expect_error "tokenize --decode: the input is not a flat JSON array of ids" \
      bash -c '"$1" tokenize --bytes --decode <deep_ids.json' _ "$bin"
    expect_error "tokenize --decode: id 4294967368 is out of range" "$bin" tokenize --bytes --decode --text "[72, 4294967368]"
    expect_error "tokenize --decode: id -5 is out of range" "$bin" tokenize --bytes --decode --text "[72, -5]"
    ;;

  gpu)
    # The CUDA paths of zo2-opt: resident and offloaded (each codec, a memory budget), each
    # resumed bit-exactly from a checkpoint. Skipped (and says so) without a GPU.
    skip_without_gpu --demo
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
    # Both perturbed copies on the GPU (--two-copies): the same z, the same copies, the same run.
    for mode in int8 bf16p; do
      run_ok "two_$mode" "$bin" train "${common[@]}" --offload --codec "$mode" --two-copies --steps 24 --export "two_$mode"
      grep -q "both perturbed copies on the GPU" "two_$mode.out" || fail "--two-copies ($mode): the log does not say so"
      cmp "full_$mode/model.safetensors" "two_$mode/model.safetensors" || fail "--two-copies ($mode) trained differently"
    done
    echo "--two-copies: int8 and bf16p train as with one copy, bit for bit"
    # Three slots (--slots 3): the same visits in another order of copies, the same run.
    run_ok slots3_int8 "$bin" train "${common[@]}" --offload --codec int8 --slots 3 --steps 24 --export slots3_int8
    grep -q "blocks streamed through 3 slots" slots3_int8.out || fail "--slots 3: the log does not state three slots"
    cmp full_int8/model.safetensors slots3_int8/model.safetensors || fail "--slots 3 trained differently from two slots"
    echo "--slots 3: int8 trains as in two slots, bit for bit"
    # The packed bf16 codec holds exactly the bf16 codec's values, so it trains identically.
    cmp full_bf16/model.safetensors full_bf16p/model.safetensors || fail "the bf16p and bf16 codecs trained differently"
    # The CPU and the GPU agree to rounding on the start loss (different summation orders).
    run_ok cpu "$bin" train --demo --layers 2 --hidden 64 --heads 4 --batch 4 --seq-len 32 --quiet --device cpu --steps 1
    awk -v a="$(json_field cpu.out start_loss)" -v b="$(json_field full_resident.out start_loss)" \
      'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-4 * (a < 0 ? -a : a)) }' ||
      fail "CPU start loss $(json_field cpu.out start_loss) != GPU $(json_field full_resident.out start_loss)"
    expect_error "gpu_memory_budget" "$bin" train "${common[@]}" --offload --gpu-memory-budget 0.0000001 --steps 1
    echo "offload fp32 == resident; CPU and GPU start losses agree"

    # zo-adam with its state in bf16: the loss falls, the log says so, a resume (which keeps the
    # checkpoint's state type) ends bit-identical, and another type on resume is refused.
    adam=(--offload --codec bf16p --optimizer zo-adam --lr 1e-3 --optimizer-state bf16)
    run_ok adam_full "$bin" train "${common[@]}" "${adam[@]}" --steps 24 --export adam_full
    grep -q "optimizer state bf16" adam_full.out || fail "the log does not state the bf16 optimizer state"
    awk -v s="$(json_field adam_full.out start_loss)" -v e="$(json_field adam_full.out end_loss)" 'BEGIN { exit !(e < s) }' ||
      fail "zo-adam with bf16 state: loss did not fall"
    run_ok adam_first "$bin" train "${common[@]}" "${adam[@]}" --steps 12 --checkpoint-every 6 --checkpoint-dir ck_adam
    run_ok adam_resumed "$bin" train --resume ck_adam --device cuda --offload --codec bf16p --steps 24 --export adam_resumed --quiet
    cmp adam_full/model.safetensors adam_resumed/model.safetensors ||
      fail "zo-adam with bf16 state: the resumed run's weights differ from the uninterrupted run's"
    expect_error "differs from the checkpoint's bf16" "$bin" train --resume ck_adam --device cuda --offload --codec bf16p \
      --optimizer-state fp32 --steps 24 --quiet
    echo "zo-adam, bf16 state: loss falls, resume bit-exact"

    # --writeback-every 0: K is chosen by timing steps at K = 1, 2, 4, 8 (27 steps at most); the
    # log says which K and what each took, and the run is K = 1's bit for bit.
    auto=(--offload --codec int8 --gpu-memory-budget 0.001 --steps 32)
    run_ok k_one "$bin" train "${common[@]}" "${auto[@]}" --export k_one
    run_ok k_auto "$bin" train "${common[@]}" "${auto[@]}" --writeback-every 0 --export k_auto --log k_auto.jsonl
    grep -q "K chosen by timing steps" k_auto.out || fail "--writeback-every 0: the log does not say K is measured"
    grep -qE "^offload   write-back every [0-9]+ steps? from here on: steps took K = 1 [0-9.]+ s, K = 2 " k_auto.err ||
      { cat k_auto.err >&2; fail "--writeback-every 0: no line says which K was chosen"; }
    [ "$(grep -c '"notice"' k_auto.jsonl)" -eq 1 ] || fail "--writeback-every 0: the step log should carry the choice once"
    cmp k_one/model.safetensors k_auto/model.safetensors || fail "--writeback-every 0 trained differently from K = 1"
    echo "--writeback-every 0: $(grep -oE 'write-back every [0-9]+ steps?' k_auto.err), the same weights as K = 1"

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

    # --compute bf16: the forward on the tensor cores, the master kept as it is (resident fp32,
    # offloaded the codec's). The loss falls, the log says bf16, a resume continues in bf16 from
    # the checkpoint's setting bit for bit, and the start loss is fp32's to bf16 rounding.
    for mode in resident int8 bf16p; do
      offload=()
      [ "$mode" != resident ] && offload=(--offload --codec "$mode")
      extra=(--compute bf16 "${offload[@]}")
      run_ok "bf16c_full_$mode" "$bin" train "${common[@]}" "${extra[@]}" --steps 24 --export "bf16c_full_$mode"
      grep -q "forward bf16" "bf16c_full_$mode.out" || fail "--compute bf16 ($mode): the log does not say the forward is bf16"
      loss_fell "bf16c_full_$mode.out" ||
        fail "--compute bf16 ($mode): loss did not fall: $(json_field "bf16c_full_$mode.out" start_loss) -> $(json_field "bf16c_full_$mode.out" end_loss)"
      run_ok "bf16c_first_$mode" "$bin" train "${common[@]}" "${extra[@]}" --steps 12 --checkpoint-every 6 --checkpoint-dir "ck_bf16c_$mode"
      run_ok "bf16c_resumed_$mode" "$bin" train --resume "ck_bf16c_$mode" --device cuda "${offload[@]}" --steps 24 \
        --export "bf16c_resumed_$mode" --quiet
      cmp "bf16c_full_$mode/model.safetensors" "bf16c_resumed_$mode/model.safetensors" ||
        fail "--compute bf16 ($mode): the resumed run's weights differ from the uninterrupted run's"
      fp32_start=$(json_field "full_$mode.out" start_loss)  # the same codec, forward in fp32
      close "$fp32_start" "$(json_field "bf16c_full_$mode.out" start_loss)" 2e-2 ||
        fail "--compute bf16 ($mode): start loss $(json_field "bf16c_full_$mode.out" start_loss) is not fp32's $fp32_start to bf16 rounding"
      echo "--compute bf16 ($mode): loss $(json_field "bf16c_full_$mode.out" start_loss) -> $(json_field "bf16c_full_$mode.out" end_loss), resume bit-exact"
    done
    run_ok eval_bf16c "$bin" "${ev[@]}" --compute bf16
    close "$resident_loss" "$(json_field eval_bf16c.out loss)" 2e-2 ||
      fail "eval --compute bf16: loss $(json_field eval_bf16c.out loss) is not fp32's $resident_loss to bf16 rounding"
    run_ok eval_bf16c_offload "$bin" "${ev[@]}" --compute bf16 --offload --codec bf16p
    close "$resident_loss" "$(json_field eval_bf16c_offload.out loss)" 2e-2 ||
      fail "eval --compute bf16 --offload: loss $(json_field eval_bf16c_offload.out loss) is not fp32's $resident_loss to bf16 rounding"
    run_ok gen_bf16c "$bin" "${gen[@]}" --compute bf16 --offload --codec int8
    grep -q '"completion"' gen_bf16c.out || fail "generate --compute bf16 printed no completion"
    echo "--compute bf16: eval $(json_field eval_bf16c.out loss) (fp32 $resident_loss), generate runs"
    ;;

  program_name)
    # zo2 is the program, zo2-opt the same binary under its former name: each says its own name.
    zo2=$(dirname "$bin")/zo2
    [ -x "$zo2" ] || fail "no zo2 beside $bin"
    run_ok zo2_help "$zo2" --help
    grep -q '^Usage: zo2 <command>' zo2_help.out || fail "zo2 --help: $(head -3 zo2_help.out)"
    grep -q 'llama, qwen2, qwen3, mistral' zo2_help.out || fail "zo2 --help does not list the model families"
    run_ok zo2_train_help "$zo2" train --help
    grep -q '^Usage: zo2 train' zo2_train_help.out || fail "zo2 train --help has no 'Usage: zo2 train' line"
    grep -q 'qwen3-32b' zo2_train_help.out || fail "zo2 train --help does not list the LLaMA-family presets"
    run_ok opt_help "$bin" --help
    grep -q '^Usage: zo2-opt <command>' opt_help.out || fail "zo2-opt --help: $(head -3 opt_help.out)"
    expect_error "^zo2: unknown command 'trian'" "$zo2" trian
    expect_error "^zo2-opt: unknown command 'trian'" "$bin" trian
    expect_error "^zo2: train: unknown option '--bogus' \(see zo2 train --help\)" "$zo2" train --demo --bogus
    run_ok zo2_demo "$zo2" train --demo --steps 3 --quiet --device cpu
    run_ok opt_demo "$bin" train --demo --steps 3 --quiet --device cpu
    [ "$(tail -1 zo2_demo.out | sed 's/"seconds":[^,]*,//')" = "$(tail -1 opt_demo.out | sed 's/"seconds":[^,]*,//')" ] ||
      fail "zo2 and zo2-opt trained differently: $(tail -1 zo2_demo.out) vs $(tail -1 opt_demo.out)"
    ;;

  llama_train)
    # MeZO lowers the loss of every LLaMA-family fixture (llama, qwen2 with biases, qwen3 with
    # q/k norm, mistral with a sliding window; GQA, MQA, tied heads, llama3 rope; bf16/fp16
    # weights; a sharded checkpoint), on pre-tokenized data.
    make_ids ids.jsonl
    n=0
    for d in "$llama_fixtures"/*/; do
      [ -f "$d/config.json" ] || continue
      name=$(basename "$d")
      type=$(grep -o '"model_type": *"[^"]*"' "$d/config.json" | sed 's/.*"\([^"]*\)"$/\1/')
      run_ok "$name" "$bin" train --model "$d" --data ids.jsonl --steps 60 --batch 8 --lr 5e-3 --device cpu --quiet
      grep -q "^model     .*: $type, 2 layers, hidden " "$name.out" || fail "$name: the model line does not say $type: $(grep '^model' "$name.out")"
      grep -q '^tokenizer none (pre-tokenized data)' "$name.out" || fail "$name: $(grep '^tokenizer' "$name.out")"
      loss_fell "$name.out" 0.1 || fail "$name: loss did not fall: $(json_field "$name.out" start_loss) -> $(json_field "$name.out" end_loss)"
      echo "$name ($type): loss $(json_field "$name.out" start_loss) -> $(json_field "$name.out" end_loss)"
      n=$((n + 1))
    done
    [ "$n" -ge 6 ] || fail "only $n LLaMA-family fixtures found in $llama_fixtures"
    # The sharded checkpoint holds the same weights as the single file: the same run.
    [ "$(tail -1 qwen2_bias_bf16.out | sed 's/"seconds":[^,]*,//')" = "$(tail -1 qwen2_bias_bf16_sharded.out | sed 's/"seconds":[^,]*,//')" ] ||
      fail "the sharded and single-file qwen2 fixtures trained differently"
    ;;

  llama_resume)
    # A LLaMA-family run resumes bit-exactly from its checkpoints (an HF directory of the family
    # + state.json), with plain MeZO and with a stateful rule, queries and accumulation.
    make_ids ids.jsonl
    fx=$llama_fixtures/qwen3_qknorm_fp16
    common=(--model "$fx" --data ids.jsonl --batch 4 --lr 5e-3 --device cpu --quiet)
    run_ok full "$bin" train "${common[@]}" --steps 20 --export full_export
    run_ok first "$bin" train "${common[@]}" --steps 10 --checkpoint-every 5 --checkpoint-dir ck
    for s in 00000005 00000010; do
      for f in state.json config.json model.safetensors; do [ -f "ck/step-$s/$f" ] || fail "checkpoint step-$s lacks $f"; done
    done
    grep -q '"model_type": "qwen3"' ck/step-00000010/config.json || fail "the checkpoint's config.json is not qwen3's"
    run_ok resumed "$bin" train --resume ck --steps 20 --export resumed_export
    grep -q 'resume    from' resumed.out || fail "the resumed run did not say where it resumed from"
    grep -q '^model     .*: qwen3, ' resumed.out || fail "the resumed run is not a qwen3 model: $(grep '^model' resumed.out)"
    cmp full_export/model.safetensors resumed_export/model.safetensors ||
      fail "the resumed qwen3 run's weights differ from the uninterrupted run's"
    adam=(--model "$llama_fixtures/llama_mqa_tied_bf16" --data ids.jsonl --batch 4 --device cpu --quiet
          --optimizer zo-adam --lr 1e-3 --queries 2 --accumulate 2)
    run_ok adam_full "$bin" train "${adam[@]}" --steps 12 --export adam_full
    run_ok adam_first "$bin" train "${adam[@]}" --steps 6 --checkpoint-every 6 --checkpoint-dir adam_ck
    [ -f adam_ck/step-00000006/optimizer_state.safetensors ] || fail "no optimizer_state.safetensors in the checkpoint"
    run_ok adam_resumed "$bin" train --resume adam_ck --steps 12 --export adam_resumed
    cmp adam_full/model.safetensors adam_resumed/model.safetensors ||
      fail "zo-adam (2 queries, 2 micro-batches) on a tied-head llama: the resumed run differs"
    echo "qwen3 and llama (zo-adam) resumed bit-exactly"
    ;;

  llama_export)
    # An export is the family's HF directory (one model.safetensors, F32, config.json as read with
    # its dtype updated); eval of the export gives the loss training ended with, to the last digit.
    make_ids ids.jsonl
    run_ok train "$bin" train --model "$llama_fixtures/qwen2_bias_bf16_sharded" --data ids.jsonl --steps 20 --batch 4 \
      --lr 5e-3 --device cpu --quiet --export exported
    for f in config.json model.safetensors; do [ -f "exported/$f" ] || fail "export lacks $f"; done
    [ ! -e exported/model.safetensors.index.json ] || fail "the export kept a shard index"
    grep -q '"model_type": "qwen2"' exported/config.json || fail "the export's config.json is not qwen2's"
    grep -q '"dtype": "float32"' exported/config.json || fail "the export's config.json does not say float32"
    run_ok eval "$bin" eval --model exported --data ids.jsonl --batch 4
    trained=$(json_field train.out end_loss)
    reread=$(json_field eval.out loss)
    [ -n "$trained" ] && [ "$trained" = "$reread" ] || fail "loss after export+reload $reread != loss at the end of training $trained"
    # Without a tokenizer, generate takes and gives token ids.
    run_ok gen "$bin" generate --model exported --input-ids 1,17,40 --max-new-tokens 4 --ignore-eos --dump-logits logits.npy
    grep -q '"prompt_ids":\[1,17,40\]' gen.out || fail "generate without a tokenizer: $(cat gen.out)"
    [ "$(grep -o '"ids":\[[^]]*\]' gen.out | tr -cd ',' | wc -c)" -eq 3 ] || fail "generate did not give 4 ids: $(cat gen.out)"
    [ "$(wc -c <logits.npy)" -eq $((128 + 4 * 3 * 128)) ] || fail "logits.npy has $(wc -c <logits.npy) bytes, expected a [3, 128] float32 .npy"
    echo "qwen2 export: loss $trained == $reread after reload"
    if ! has_tokenizer_json; then
      echo "note: this build has no tokenizer.json reader: the tokenizer part is not run"
    else
      # A tokenizer.json travels with the model: checkpoint, export, and back.
      run_ok tok_train "$bin" train --preset llama-3.2-1b --layers 1 --hidden 64 --tokenizer "$tokenizer_json/llama3" \
        --text "$corpus" --seq-len 32 --batch 4 --steps 10 --lr 5e-3 --device cpu --quiet --export tok_export
      grep -q '^tokenizer tokenizer.json (705 tokens)' tok_train.out || fail "$(grep '^tokenizer' tok_train.out)"
      grep -q '^model     llama-3.2-1b (random weights, seed 0): llama, 1 layers, hidden 64, 1 heads (1 key/value, head_dim 64), ffn 256, vocab 705' tok_train.out ||
        fail "the preset's shape: $(grep '^model' tok_train.out)"
      [ -f tok_export/tokenizer.json ] || fail "the export lacks tokenizer.json"
      cmp tok_export/tokenizer.json "$tokenizer_json/llama3/tokenizer.json" || fail "the export's tokenizer.json differs from the source's"
      run_ok tok_eval "$bin" eval --model tok_export --text "$corpus" --seq-len 32 --batch 4
      [ "$(json_field tok_train.out end_loss)" = "$(json_field tok_eval.out loss)" ] ||
        fail "tokenizer.json model: loss after export+reload $(json_field tok_eval.out loss) != $(json_field tok_train.out end_loss)"
      run_ok tok_gen "$bin" generate --model tok_export --prompt "The old man" --max-new-tokens 8 --ignore-eos
      grep -q '^The old man' tok_gen.out || fail "generate did not echo the prompt: $(cat tok_gen.out)"
      run_ok tok_gen_json "$bin" generate --model tok_export --prompt "The old man" --max-new-tokens 8 --ignore-eos --json
      grep -q '"prompt_ids":\[701,' tok_gen_json.out || fail "the prompt does not start with <|begin_of_text|>: $(cat tok_gen_json.out)"
      # The streamed text is the JSON's completion (both decode the whole sequence).
      completion=$(sed -n 's/.*"completion":"\([^"]*\)".*/\1/p' tok_gen_json.out)
      [ "$(cat tok_gen.out)" = "The old man$completion" ] || fail "streamed '$(cat tok_gen.out)' != prompt + completion '$completion'"
    fi
    ;;

  llama_tokenize)
    # tokenizer.json, as the `tokenizers` library encodes (tests/fixtures/tokenizer_json/expected.json).
    if ! has_tokenizer_json; then
      echo "SKIPPED: this build has no tokenizer.json reader (zo2::tokenizers needs libpcre2-dev and libutf8proc-dev)"
      exit 0
    fi
    run_ok qwen2 "$bin" tokenize --tokenizer "$tokenizer_json/qwen2" --text "Hello world"
    [ "$(cat qwen2.out)" = "[39,285,579,300,286,75,67]" ] || fail "qwen2 'Hello world': $(cat qwen2.out)"
    run_ok qwen2_nobos "$bin" tokenize --tokenizer "$tokenizer_json/qwen2" --text "Hello world" --no-bos
    cmp qwen2.out qwen2_nobos.out || fail "Qwen's tokenizer adds no bos, but --no-bos changed the ids"
    run_ok llama2 "$bin" tokenize --tokenizer "$tokenizer_json/llama2" --text "Hello world"
    [ "$(cat llama2.out)" = "[1,372,75,392,619,402,393,308,301]" ] || fail "llama2 'Hello world' (with <s>): $(cat llama2.out)"
    run_ok llama2_nobos "$bin" tokenize --tokenizer "$tokenizer_json/llama2" --text "Hello world" --no-bos
    [ "$(cat llama2_nobos.out)" = "[372,75,392,619,402,393,308,301]" ] || fail "llama2 'Hello world' --no-bos: $(cat llama2_nobos.out)"
    probe='emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇩🇪🇯🇵 rainbow 🏳️‍🌈 heart ❤️ keycap 1️⃣'
    run_ok emoji "$bin" tokenize --tokenizer "$tokenizer_json/qwen2" --text "$probe" --no-bos
    [ "$(cat emoji.out)" = "[386,589,476,222,258,239,301,237,121,288,64,76,72,75,88,475,636,638,630,99,288,75,64,70,82,474,639,103,459,659,113,446,261,65,328,282,237,670,320,234,230,220,264,322,83,262,251,621,220,393,88,550,79,220,16,439,158,225,96]" ] ||
      fail "qwen2 emoji probe: $(cat emoji.out)"
    "$bin" tokenize --tokenizer "$tokenizer_json/qwen2" --decode <emoji.out >decoded.txt 2>decoded.err || fail "--decode: $(cat decoded.err)"
    [ "$(cat decoded.txt)" = "$probe" ] || fail "qwen2 decode round trip: '$(cat decoded.txt)'"
    # A directory with vocab.json + merges.txt only still reads them (OPT).
    run_ok opt "$bin" tokenize --tokenizer "$root/tests/fixtures/tokenizer" --text "Hello world" --no-bos
    [ "$(cat opt.out)" = "[43,287,586,303,288,79,71]" ] || fail "vocab.json + merges.txt: $(cat opt.out)"
    echo "tokenizer.json ids as tokenizers gives them"
    ;;

  llama_preset)
    # Random weights with a LLaMA-family shape (shrunk), on the byte vocabulary: the loss falls.
    run_ok qwen3 "$bin" train --preset qwen3-32b --layers 2 --hidden 64 --heads 4 --text "$corpus" --seq-len 32 \
      --batch 8 --steps 80 --lr 1e-3 --device cpu --quiet
    grep -q '^model     qwen3-32b (random weights, seed 0): qwen3, 2 layers, hidden 64, 4 heads (4 key/value, head_dim 16), ffn 320, vocab 260' qwen3.out ||
      fail "the preset's shape: $(grep '^model' qwen3.out)"
    loss_fell qwen3.out 0.1 || fail "qwen3 preset: loss did not fall: $(json_field qwen3.out start_loss) -> $(json_field qwen3.out end_loss)"
    run_ok mistral "$bin" train --preset mistral-7b --layers 1 --hidden 64 --text "$corpus" --seq-len 32 --batch 4 --steps 3 \
      --device cpu --quiet
    grep -q '^model     mistral-7b (random weights, seed 0): mistral, 1 layers, hidden 64, 1 heads (1 key/value, head_dim 64), ffn 224, vocab 260' mistral.out ||
      fail "the preset's shape: $(grep '^model' mistral.out)"
    echo "qwen3 preset: loss $(json_field qwen3.out start_loss) -> $(json_field qwen3.out end_loss)"
    if has_tokenizer_json; then
      # Classification (MeZO's candidate scoring) with a Qwen tokenizer, which has no bos.
      printf '%s\n' '{"prompt": "A wonderful, moving film.", "label": "great"}' \
        '{"prompt": "Dull and far too long.", "label": "terrible"}' '{"prompt": "I loved every minute.", "label": 0}' >cls.jsonl
      run_ok cls "$bin" train --preset qwen2.5-7b --layers 1 --hidden 64 --tokenizer "$tokenizer_json/qwen2" --data cls.jsonl \
        --template "{prompt} It was" --candidates "great,terrible" --seq-len 48 --batch 2 --steps 5 --device cpu --quiet
      grep -q 'accuracy' cls.out || fail "classification training printed no accuracy"
    fi
    ;;

  llama_errors)
    # What the program cannot honour is one line naming the field, flag or file.
    make_ids ids.jsonl
    mkdir -p neox && echo '{"model_type": "gpt_neox", "hidden_size": 8}' >neox/config.json && : >neox/model.safetensors
    expect_error "neox/config.json: field 'model_type' is 'gpt_neox', which zo2 does not support \(opt, llama, qwen2, qwen3, mistral\)" \
      "$bin" train --model neox --data ids.jsonl
    expect_error "neox/config.json: field 'model_type' is 'gpt_neox'" "$bin" eval --model neox --data ids.jsonl
    cp -r "$llama_fixtures/llama3_rope_bf16" yarn && sed -i 's/"rope_type": "llama3"/"rope_type": "yarn"/' yarn/config.json
    expect_error "'rope_parameters'.*rope_type 'yarn' is not supported" "$bin" train --model yarn --data ids.jsonl
    cp -r "$llama_fixtures/llama_gqa" no_heads && sed -i '/"num_attention_heads"/d' no_heads/config.json
    expect_error "'num_attention_heads'.*is missing" "$bin" eval --model no_heads --data ids.jsonl
    expect_error "--preset: unknown preset 'llama-5'" "$bin" train --preset llama-5 --text "$corpus"
    expect_error "--heads 3 does not divide the hidden size 64" "$bin" train --preset llama-3.2-1b --hidden 64 --heads 3 --text "$corpus"
    expect_error "--hidden/--heads: .*head_dim" "$bin" train --preset llama-3.2-1b --hidden 66 --heads 6 --text "$corpus"
    expect_error "text needs a tokenizer: the model directory has no tokenizer.json" \
      "$bin" train --model "$llama_fixtures/llama_gqa" --text "$corpus"
    echo '{"input_ids": [1, 128]}' >big.jsonl
    expect_error "big.jsonl:1: \"input_ids\" holds 128, outside the vocabulary \[0, 128\)" \
      "$bin" train --model "$llama_fixtures/llama_gqa" --data big.jsonl
    expect_error "generate: .* has no tokenizer .*pass --tokenizer DIR, or --input-ids" \
      "$bin" generate --model "$llama_fixtures/llama_gqa" --prompt "Hi"
    if has_tokenizer_json; then
      expect_error "has 70[0-9] tokens, more than the model's vocab_size = 128" \
        "$bin" train --model "$llama_fixtures/qwen2_bias_bf16" --tokenizer "$tokenizer_json/qwen2" --text "$corpus"
    fi
    ;;

  llama_hf)
    # Exports of every fixture trained a few steps (and of a preset with a tokenizer.json) load in
    # transformers with zo2's logits (tests/fixtures/llama/check_export_hf.py). Needs a Python with
    # torch + transformers in ZO2_HF_PYTHON (examples/tests.cmake registers this case only then).
    [ -n "${ZO2_HF_PYTHON:-}" ] || fail "ZO2_HF_PYTHON is not set"
    make_ids ids.jsonl
    for d in "$llama_fixtures"/*/; do
      [ -f "$d/config.json" ] || continue
      name=$(basename "$d")
      run_ok "$name" "$bin" train --model "$d" --data ids.jsonl --steps 20 --batch 8 --lr 5e-3 --device cpu --quiet --export "$name"
      run_ok "hf_$name" "$ZO2_HF_PYTHON" "$llama_fixtures/check_export_hf.py" "$name" --zo2 "$bin" \
        --input-ids 1,17,40,99,3,5,7,64,127,12,90,33
      cat "hf_$name.out"
    done
    if has_tokenizer_json; then
      run_ok tok_train "$bin" train --preset qwen3-32b --layers 2 --hidden 64 --heads 4 --tokenizer "$tokenizer_json/qwen2" \
        --text "$corpus" --seq-len 32 --batch 4 --steps 10 --lr 1e-3 --device cpu --quiet --export tok_export
      run_ok hf_tok "$ZO2_HF_PYTHON" "$llama_fixtures/check_export_hf.py" tok_export --zo2 "$bin" --input-ids 39,285,579,300,286,75,67
      cat hf_tok.out
    fi
    ;;

  llama_gpu)
    # The LLaMA family on the GPU (LlamaCudaModel<float>, and <bfloat16>): resident and offloaded, resumed
    # bit-exactly; the CPU and GPU agree on the start loss. Skipped (and says so) without a GPU.
    make_ids ids.jsonl
    fx=$llama_fixtures/qwen2_bias_bf16
    skip_without_gpu --model "$fx" --data ids.jsonl
    common=(--model "$fx" --data ids.jsonl --batch 4 --lr 5e-3 --quiet --device cuda)
    for mode in resident fp32 bf16; do
      extra=()
      [ "$mode" != resident ] && extra=(--offload --codec "$mode")
      run_ok "full_$mode" "$bin" train "${common[@]}" "${extra[@]}" --steps 24 --export "full_$mode"
      loss_fell "full_$mode.out" || fail "$mode: loss did not fall: $(json_field "full_$mode.out" start_loss) -> $(json_field "full_$mode.out" end_loss)"
      run_ok "first_$mode" "$bin" train "${common[@]}" "${extra[@]}" --steps 12 --checkpoint-every 6 --checkpoint-dir "ck_$mode"
      run_ok "resumed_$mode" "$bin" train --resume "ck_$mode" --device cuda "${extra[@]}" --steps 24 --export "resumed_$mode" --quiet
      cmp "full_$mode/model.safetensors" "resumed_$mode/model.safetensors" ||
        fail "$mode: the resumed run's weights differ from the uninterrupted run's"
      echo "$mode: loss $(json_field "full_$mode.out" start_loss) -> $(json_field "full_$mode.out" end_loss), resume bit-exact"
    done
    cmp full_resident/model.safetensors full_fp32/model.safetensors || fail "offload fp32 and resident runs differ"
    # LlamaCudaModel<bfloat16> (--compute bf16), resident and offloaded: the loss falls.
    for mode in resident bf16p; do
      extra=(--compute bf16)
      [ "$mode" != resident ] && extra+=(--offload --codec "$mode")
      run_ok "bf16c_$mode" "$bin" train "${common[@]}" "${extra[@]}" --steps 24
      grep -q "forward bf16" "bf16c_$mode.out" || fail "--compute bf16 ($mode): the log does not say the forward is bf16"
      loss_fell "bf16c_$mode.out" ||
        fail "--compute bf16 ($mode): loss did not fall: $(json_field "bf16c_$mode.out" start_loss) -> $(json_field "bf16c_$mode.out" end_loss)"
      echo "--compute bf16 ($mode): loss $(json_field "bf16c_$mode.out" start_loss) -> $(json_field "bf16c_$mode.out" end_loss)"
    done
    run_ok cpu "$bin" train --model "$fx" --data ids.jsonl --batch 4 --quiet --device cpu --steps 1
    awk -v a="$(json_field cpu.out start_loss)" -v b="$(json_field full_resident.out start_loss)" \
      'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-4 * (a < 0 ? -a : a)) }' ||
      fail "CPU start loss $(json_field cpu.out start_loss) != GPU $(json_field full_resident.out start_loss)"
    ;;

  *) fail "unknown case" ;;
esac
echo "PASS [$case_name]"
