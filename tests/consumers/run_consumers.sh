#!/usr/bin/env bash
# Builds and runs the three outside projects that consume zo2:
#   (a) find_package after `cmake --install` to a temporary prefix (also: configure-only with
#       CUDAToolkit disabled, proving a CPU-only machine needs no CUDA toolkit),
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

rm -rf "$work/zo2-build" "$work/prefix" "$work/a" "$work/a-nocuda" "$work/b" "$work/c" "$work/archive"
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
