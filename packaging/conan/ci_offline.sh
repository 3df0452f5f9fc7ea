#!/usr/bin/env bash
# `conan create` for zo2 with no network and no remote: Debian's Eigen and nlohmann-json stand
# in for ConanCenter's eigen/3.4.0 and nlohmann_json/3.11.x through the tiny "system" recipes in
# packaging/conan/system/. Runs the recipe's test_package (a MeZO run on a user-defined stack)
# for cuda=False, with the models (zo2::zo2) and without them (zo2::core, no Eigen), and checks
# the cuda=True variant's package_info (zo2::cuda and zo2::cuda_core) when a CUDA toolkit is
# present.
#
# Usage: packaging/conan/ci_offline.sh [work dir]      (default: a fresh mktemp -d)
# Needs: conan 2 on PATH (pip install conan), cmake, a C++20 compiler, libeigen3-dev,
#        nlohmann-json3-dev. Nothing is written to the source tree or to ~/.conan2.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=${1:-$(mktemp -d /tmp/zo2-pkg-conan.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)

# `conan` from PATH, else the module pip installed (a pyenv shim appears only after a rehash).
if ! command -v conan >/dev/null 2>&1; then
  python3 -c 'import conans.conan' 2>/dev/null ||
    { echo "ci_offline.sh: conan 2 not found: python3 -m pip install 'conan>=2,<3'" >&2
      exit "${ZO2_CONAN_MISSING_STATUS:-1}"; }  # CTest sets 77: reported as skipped
  conan() { python3 -m conans.conan "$@"; }
fi

export CONAN_HOME="$work/conan-home"
rm -rf "$CONAN_HOME"
conan --version

conan profile detect --force
# No remote at all: every reference must come from the local cache.
conan remote remove conancenter >/dev/null 2>&1 || true
if [[ -n "$(conan remote list --format=json | tr -d '[:space:][]')" ]]; then
  echo "ci_offline.sh: unexpected conan remotes left" >&2
  conan remote list
  exit 1
fi
# test_package builds go to the work dir, and no CMakeUserPresets.json lands in the source tree.
cat > "$CONAN_HOME/global.conf" <<CONF
tools.cmake.cmake_layout:test_folder=$work/test_package_build
tools.cmake.cmaketoolchain:user_presets=
tools.system.package_manager:mode=check
CONF

nlohmann_version=$(sed -n 's/^set(PACKAGE_VERSION "\([0-9.]*\)").*/\1/p' \
  /usr/share/cmake/nlohmann_json/nlohmann_jsonConfigVersion.cmake 2>/dev/null || true)
nlohmann_version=${nlohmann_version:-3.11.2}
conan export "$here/system/eigen" --version 3.4.0
conan export "$here/system/nlohmann_json" --version "$nlohmann_version"

common=(-s compiler.cppstd=20 -s build_type=Release --build=missing --no-remote)

conan create "$here" "${common[@]}" -o "zo2/*:cuda=False"
# models=False: the same package (headers only), without eigen and nlohmann_json in the graph;
# test_package then links zo2::core alone and fails if Eigen or nlohmann-json shows up.
conan create "$here" "${common[@]}" -o "zo2/*:cuda=False" -o "zo2/*:models=False"

# The cuda component: the same package (headers only); only package_info differs. Where a CUDA
# toolkit is present, a consumer of cuda=True links zo2::cuda (compiled and linked, not run:
# no GPU is assumed).
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  consumer="$work/cuda-consumer"
  rm -rf "$consumer"
  mkdir -p "$consumer"
  cp "$here/../../tests/consumers/find_package/cuda_link.cpp" "$consumer/"
  cat > "$consumer/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.20)
project(zo2_conan_cuda_consumer LANGUAGES CXX)
find_package(zo2 CONFIG REQUIRED)
if(NOT TARGET zo2::cuda OR NOT TARGET zo2::cuda_core)
  message(FATAL_ERROR "zo2/*:cuda=True gave no zo2::cuda or zo2::cuda_core target")
endif()
add_executable(cuda_link cuda_link.cpp)
target_link_libraries(cuda_link PRIVATE zo2::cuda)
CMAKE
  ref=$(conan list "zo2/*" --format=json | python3 -c \
    'import json,sys; d=json.load(sys.stdin)["Local Cache"]; print(next(iter(d)))')
  # From the consumer's folder: CMakeToolchain may write a CMakeUserPresets.json next to the
  # CMakeLists.txt of the current directory.
  (cd "$consumer" && conan install --requires="$ref" "${common[@]}" -o "zo2/*:cuda=True" \
    -g CMakeDeps -g CMakeToolchain --output-folder "$consumer/build")
  cmake -S "$consumer" -B "$consumer/build" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$consumer/build/conan_toolchain.cmake"
  cmake --build "$consumer/build" --parallel "${JOBS:-2}"
  echo "cuda=True: a consumer of zo2::cuda configured, compiled and linked"
fi

echo "conan: zo2 created and tested offline (CONAN_HOME=$CONAN_HOME)"
