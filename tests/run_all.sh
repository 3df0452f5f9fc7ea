#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this) and as the README shows it:
# installs the Debian packages it needs, builds everything in Release, runs CTest.
# CUDA tests are built when nvcc is found and report themselves skipped when no GPU is present.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${ZO2_BUILD_DIR:-$root/build}
jobs=${ZO2_JOBS:-$(nproc)}

bash "$root/cmake/install_deps.sh"
if [ -x "$root/packaging/install_tools.sh" ]; then bash "$root/packaging/install_tools.sh"; fi

# ZO2_CMAKE_ARGS adds configure options, e.g. -DZO2_HF_PYTHON=/path/to/python (HF parity tests).
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DZO2_BUILD_TESTS=ON -DZO2_BUILD_EXAMPLES=ON ${ZO2_CMAKE_ARGS:-}
cmake --build "$build" -j"$jobs"
ctest --test-dir "$build" --output-on-failure -j"$jobs" --timeout 1500
