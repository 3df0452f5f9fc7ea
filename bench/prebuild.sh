#!/usr/bin/env bash
# bench/prebuild.sh -- builds everything bench/run_gpu.sh runs, here (no GPU needed: nvcc only),
# and packs the binaries into build-device.tar, so the lent GPU machine's time goes to running
# them, not to compiling (a fresh machine spends ~75 s of its budget building):
#
#   bash bench/prebuild.sh                       # ~10 min on 2 cores; prints the tar's size
#   run(command="bash bench/run_gpu.sh", carry=["build-device.tar"])
#
# The GPU machine holds the working tree at the same absolute path as this one, so the build's
# CTest files and their paths work there unchanged. The tar records bench/source_hash.sh's hash
# of the sources; run_gpu.sh unpacks it only when the tree there still hashes the same, and
# builds as usual otherwise (or when ZO2_PREBUILT=0).
#
# Env: ZO2_CUDA_ARCH (90a), ZO2_PREBUILD_JOBS (nproc), ZO2_PREBUILD_TARGETS (a space-separated
# target list instead of the default: e.g. "zo2-opt zo2_bench zo2-compare-runs" for
# bench/device_call.sh, ~5 min on 2 cores).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build=$root/build-device
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DZO2_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${ZO2_CUDA_ARCH:-90a}" -DZO2_BUILD_TESTS=ON -DZO2_BUILD_BENCH=ON \
  -DZO2_BUILD_EXAMPLES=ON -DZO2_INSTALL=OFF > /dev/null
if [[ -n ${ZO2_PREBUILD_TARGETS:-} ]]; then
  read -r -a targets <<< "$ZO2_PREBUILD_TARGETS"
else
  targets=(zo2_bench perturb_bandwidth zo2-opt)
  for f in tests/cuda/*.cu; do targets+=("test_cuda_$(basename "$f" .cu)"); done
fi
cmake --build "$build" -j "${ZO2_PREBUILD_JOBS:-$(nproc)}" --target "${targets[@]}"
bash bench/source_hash.sh > "$build/zo2-source-hash"
# The tokenizer's Debian libraries, which a GPU machine may lack (it has CUDA and Open MPI):
# bench/device_call.sh puts build-device/lib on LD_LIBRARY_PATH.
mkdir -p "$build/lib"
for lib in libutf8proc.so.2 libpcre2-8.so.0; do
  path=$(ldconfig -p | awk -v l="$lib" '!p && $1 == l && /x86-64/ { p = $NF } END { print p }')  # reads all: no SIGPIPE
  [[ -n $path ]] && cp -L "$path" "$build/lib/$lib"
done
# What the GPU machine needs: the CTest files, the executables, those libraries, the hash.
(
  cd "$root"
  { find build-device -name CTestTestfile.cmake; echo build-device/zo2-source-hash
    for t in "${targets[@]}"; do find build-device -name "$t" -type f -perm -u+x; done
    find build-device/lib -type f; } |
    LC_ALL=C sort -u > "$build/zo2-prebuilt-files"
  tar cf build-device.tar -T "$build/zo2-prebuilt-files"
)
size=$(stat -c %s "$root/build-device.tar")
echo "build-device.tar: $((size / 1048576)) MiB, $(wc -l < "$build/zo2-prebuilt-files") files, sources $(cat "$build/zo2-source-hash")"
(( size < 60 * 1048576 )) || echo "warning: over 60 MiB; the device run's carry limit is 64 MiB in all" >&2
