#!/usr/bin/env bash
# Builds and runs the outside projects that consume zo2:
#   (a) find_package after `cmake --install` to a temporary prefix (also: configure-only with
#       CUDAToolkit disabled, proving a CPU-only machine needs no CUDA toolkit, and with Eigen
#       disabled, proving the default call fails with a message that points at the core component),
#   (d) find_package(zo2 COMPONENTS core) with Eigen and nlohmann-json disabled: the optimizer on
#       the consumer's own layer stack needs neither (and, with nvcc, zo2::core + zo2::cuda_core
#       compiled without Eigen's nvcc flags, for CONSUMER_CUDA_ARCHITECTURES, default 90a),
#   (b) add_subdirectory of the source tree,
#   (c) FetchContent from a local archive of the source tree (URL file://, no network).
# Usage: run_consumers.sh <zo2 source dir> <work dir>
# Environment: CMAKE (default cmake), CXX (compiler), JOBS (default 2), CMAKE_GENERATOR (honoured
# by cmake itself). Exits non-zero on the first failure.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 <zo2 source dir> <work dir>" >&2
  exit 2
fi
src=$(cd "$1" && pwd)
mkdir -p "$2"
work=$(cd "$2" && pwd)
here="$src/tests/consumers"
cmake_bin=${CMAKE:-cmake}
jobs=${JOBS:-2}
build_type=${CMAKE_BUILD_TYPE:-Release}

step() { printf '\n=== %s\n' "$*"; }
configure() { "$cmake_bin" -DCMAKE_BUILD_TYPE="$build_type" "$@"; }
build() { "$cmake_bin" --build "$1" --parallel "$jobs"; }

rm -rf "$work/zo2-build" "$work/prefix" "$work/a" "$work/a-nocuda" "$work/a-noeigen" "$work/d" "$work/b" \
  "$work/c" "$work/archive"
passed=0

step "install zo2 to $work/prefix"
# CUDA off for zo2's own configure: zo2::cuda in the installed package does not depend on it.
configure -S "$src" -B "$work/zo2-build" -DZO2_BUILD_TESTS=OFF -DZO2_BUILD_EXAMPLES=OFF \
  -DZO2_BUILD_BENCH=OFF -DZO2_ENABLE_CUDA=OFF -DZO2_INSTALL=ON
"$cmake_bin" --install "$work/zo2-build" --prefix "$work/prefix"
test -f "$work/prefix/include/zo2/zo2.hpp"
test -f "$work/prefix/share/cmake/zo2/zo2Config.cmake"
test -f "$work/prefix/share/cmake/zo2/zo2ConfigVersion.cmake"

step "(a) find_package(zo2 CONFIG REQUIRED)"
configure -S "$here/find_package" -B "$work/a" -DCMAKE_PREFIX_PATH="$work/prefix"
build "$work/a"
"$work/a/consumer"
passed=$((passed + 1))

step "(a') find_package without any CUDA toolkit (CUDAToolkit disabled)"
configure -S "$here/find_package" -B "$work/a-nocuda" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON | tee "$work/a-nocuda.log"
grep -q "zo2::cuda not available" "$work/a-nocuda.log"
passed=$((passed + 1))

step "(a'') find_package(zo2 CONFIG REQUIRED) without Eigen: must fail, and say why"
if configure -S "$here/find_package" -B "$work/a-noeigen" -DCMAKE_PREFIX_PATH="$work/prefix" \
     -DCMAKE_DISABLE_FIND_PACKAGE_Eigen3=TRUE >"$work/a-noeigen.log" 2>&1; then
  cat "$work/a-noeigen.log"
  echo "run_consumers.sh: find_package(zo2) without Eigen was found anyway" >&2
  exit 1
fi
cat "$work/a-noeigen.log"
grep -q "need Eigen3 >= 3.3" "$work/a-noeigen.log"
grep -q "find_package(zo2 COMPONENTS core)" "$work/a-noeigen.log"
passed=$((passed + 1))

step "(d) find_package(zo2 COMPONENTS core): no Eigen, no nlohmann-json"
configure -S "$here/core_only" -B "$work/d" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_DISABLE_FIND_PACKAGE_Eigen3=TRUE -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=TRUE \
  -DCMAKE_CUDA_ARCHITECTURES="${CONSUMER_CUDA_ARCHITECTURES:-90a}" | tee "$work/d.log"
grep -q "optional component 'models' not available" "$work/d.log"
grep -q "consumer: zo2 models component not available" "$work/d.log"
build "$work/d"
"$work/d/consumer"
if [[ -x "$work/d/consumer_cuda" ]]; then
  # nvcc's command line for core_cuda.cu: C++20, and neither Eigen nor Eigen's flags.
  python3 - "$work/d/compile_commands.json" <<'PY'
import json, sys
cmds = [c["command"] for c in json.load(open(sys.argv[1])) if c["file"].endswith("core_cuda.cu")]
assert len(cmds) == 1, cmds
cmd = cmds[0]
for banned in ("--expt-relaxed-constexpr", "20012", "eigen3"):
    assert banned not in cmd, f"core + cuda consumer's nvcc command has {banned}: {cmd}"
assert "c++20" in cmd or "c++2a" in cmd, f"no C++20 for nvcc: {cmd}"
print("core + cuda: nvcc ran without Eigen and without Eigen's flags")
PY
  "$work/d/consumer_cuda"
fi
passed=$((passed + 1))

step "(b) add_subdirectory($src)"
configure -S "$here/add_subdirectory" -B "$work/b" -DZO2_SOURCE_DIR="$src"
build "$work/b"
"$work/b/consumer"
passed=$((passed + 1))

step "(c) FetchContent from file://$work/archive/zo2-src.tar.gz"
mkdir -p "$work/archive"
# The archive holds what a release tarball would: the library, its build files and docs.
tar -C "$src" -czf "$work/archive/zo2-src.tar.gz" --transform 's,^\.,zo2-src,' \
  --exclude='./.git' --exclude='./build*' --exclude='./tests/consumers' \
  ./CMakeLists.txt ./include ./cmake $(cd "$src" && ls -d LICENSE README.md 2>/dev/null | sed 's,^,./,')
configure -S "$here/fetchcontent" -B "$work/c" -DZO2_FETCH_URL="file://$work/archive/zo2-src.tar.gz"
build "$work/c"
"$work/c/consumer"
passed=$((passed + 1))

printf '\nconsumers: %d passed, 0 failed\n' "$passed"
