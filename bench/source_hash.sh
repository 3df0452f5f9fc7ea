#!/usr/bin/env bash
# bench/source_hash.sh -- prints a short hash of every file the CUDA builds compile from
# (CMake files, include/, tests/, bench/, examples/ sources; not scripts, which run from the
# tree), run from the repository root.
# bench/prebuild.sh stores it with a prebuilt build; bench/run_gpu.sh uses that build only when
# the working tree still hashes the same.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
find CMakeLists.txt cmake include tests bench examples -type f \
  \( -name '*.cu' -o -name '*.cuh' -o -name '*.hpp' -o -name '*.cpp' -o -name '*.h' -o -name 'CMakeLists.txt' \
     -o -name '*.cmake' -o -name '*.in' \) |
  LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
