#!/usr/bin/env bash
# bench/prebuild_base.sh COMMIT [NAME] -- builds zo2_bench as it was at COMMIT (a git worktree in
# /tmp, no GPU needed) and puts it at build-base/NAME (default zo2_bench): the base side of the
# A/B plans of bench/run_session_bench.sh (r, p, n, s), which run build-base/zo2_bench beside
# this tree's. Carry build-base with the call:
#
#   bash bench/prebuild_base.sh b665923                     # ~4 min on 2 cores
#   ZO2_PREBUILD_TARGETS="zo2-opt zo2_bench zo2-compare-runs" bash bench/prebuild.sh
#   run(command="bash bench/device_call.sh r", carry=["build-device.tar", "build-base"])
#
# Env: ZO2_CUDA_ARCH (90a), ZO2_PREBUILD_JOBS (nproc).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
commit=${1:?usage: bench/prebuild_base.sh COMMIT [NAME]}
name=${2:-zo2_bench}
rev=$(git -C "$root" rev-parse --verify "$commit^{commit}")
tree=/tmp/zo2-base-$rev
if [[ ! -d $tree ]]; then
  git -C "$root" worktree add --detach "$tree" "$rev" > /dev/null
fi
cmake -S "$tree" -B "$tree/build" -DCMAKE_BUILD_TYPE=Release -DZO2_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${ZO2_CUDA_ARCH:-90a}" -DZO2_BUILD_BENCH=ON -DZO2_BUILD_TESTS=OFF \
  -DZO2_BUILD_EXAMPLES=OFF -DZO2_INSTALL=OFF > /dev/null
cmake --build "$tree/build" -j "${ZO2_PREBUILD_JOBS:-$(nproc)}" --target zo2_bench
mkdir -p "$root/build-base"
cp "$tree/build/bench/zo2_bench" "$root/build-base/$name"
echo "build-base/$name: zo2_bench at $(git -C "$root" log -1 --format='%h %s' "$rev" | cut -c1-100)"
