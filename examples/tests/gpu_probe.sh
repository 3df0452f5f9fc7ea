# Sourced by the zo2-opt test scripts (cli_tests.sh, dp_tests.sh), which define fail().
# skip_without_gpu ARGS...: runs `zo2-opt train ARGS --device cuda --steps 1 --quiet`; without a
# GPU (or in a build without CUDA) prints SKIPPED and ends the case with status 0, on any other
# failure ends it with its output.
skip_without_gpu() {
  if ! "$bin" train "$@" --device cuda --steps 1 --quiet >probe.out 2>probe.err; then
    if grep -Eq "built without CUDA|no CUDA GPU is present" probe.err; then
      echo "SKIPPED: no CUDA device ($(cat probe.err))"
      exit 0
    fi
    cat probe.out probe.err >&2
    fail "train --device cuda failed"
  fi
}
