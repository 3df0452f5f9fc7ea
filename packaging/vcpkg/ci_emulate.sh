#!/usr/bin/env bash
# What `vcpkg install zo2 --overlay-ports=packaging/vcpkg` does, without vcpkg (CI cannot fetch
# it): the port's CMake steps, vcpkg's layout and a few of its post-build checks, then the
# find_package consumer from tests/consumers/ against the staged package. Eigen and
# nlohmann-json come from the system here, where vcpkg would have built its own.
#
#   packaging/vcpkg/ci_emulate.sh [work dir]          (default: a fresh mktemp -d)
#
# The configure options are read from portfile.cmake's vcpkg_cmake_configure() call, so the two
# cannot drift apart. Emulated: the default feature set (models), consumed with find_package(zo2);
# "zo2[core]" (no models: ZO2_WITH_MODELS=OFF), consumed by tests/consumers/core_only with Eigen
# and nlohmann-json disabled; and, with a CUDA toolkit present, the "cuda" feature, consumed with
# the cuda component.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(cd "$here/../.." && pwd)
port="$here/zo2"
work=${1:-$(mktemp -d /tmp/zo2-pkg-vcpkg.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
triplet=x64-linux
jobs=${JOBS:-2}
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)  # vcpkg_cmake_configure uses Ninja

fail() { echo "ci_emulate.sh: $*" >&2; exit 1; }

# ---- the manifest ------------------------------------------------------------------------
python3 - "$port/vcpkg.json" "$src/CMakeLists.txt" <<'PY'
import json, re, sys
manifest = json.load(open(sys.argv[1]))
cmake_version = re.search(r"project\(\s*zo2\s+VERSION\s+([0-9.]+)", open(sys.argv[2]).read()).group(1)
assert manifest["name"] == "zo2", manifest["name"]
version = manifest.get("version") or manifest.get("version-semver") or manifest.get("version-string")
assert version == cmake_version, f"vcpkg.json version {version} != CMakeLists.txt {cmake_version}"
names = {d if isinstance(d, str) else d["name"] for d in manifest["dependencies"]}
for needed in ("vcpkg-cmake", "vcpkg-cmake-config"):
    assert needed in names, f"vcpkg.json lacks dependency {needed}"
for core_free in ("eigen3", "nlohmann-json"):
    assert core_free not in names, f"{core_free} must belong to the models feature, not to zo2[core]"
models = manifest["features"]["models"]["dependencies"]
for needed in ("eigen3", "nlohmann-json"):
    assert needed in models, f"feature models lacks dependency {needed}"
assert "models" in manifest.get("default-features", []), "models must be a default feature"
for d in manifest["dependencies"]:
    if isinstance(d, dict) and d["name"].startswith("vcpkg-cmake"):
        assert d.get("host") is True, f"{d['name']} must be a host dependency"
assert "cuda" in manifest["features"]["cuda"]["dependencies"], "feature cuda must depend on cuda"
print(f"vcpkg.json: zo2 {version}, dependencies {sorted(names)}, features {sorted(manifest['features'])}")
PY

# ---- options from the portfile -----------------------------------------------------------
mapfile -t port_options < <(sed -n '/^vcpkg_cmake_configure(/,/^)/p' "$port/portfile.cmake" |
                            grep -o -- '-D[A-Za-z0-9_]*=[^ ]*')
[[ ${#port_options[@]} -gt 0 ]] || fail "no -D options found in portfile.cmake"
grep -q 'cuda ZO2_ENABLE_CUDA' "$port/portfile.cmake" || fail "portfile no longer maps cuda -> ZO2_ENABLE_CUDA"
grep -q 'models ZO2_WITH_MODELS' "$port/portfile.cmake" || fail "portfile no longer maps models -> ZO2_WITH_MODELS"
echo "portfile options: ${port_options[*]}"

# One port build as vcpkg runs it: configure (release only, VCPKG_BUILD_TYPE=release),
# build the install target, then the portfile's own file() steps.
build_port() {  # $1: features label, $2: ZO2_ENABLE_CUDA value, $3: ZO2_WITH_MODELS value
  local label=$1 cuda=$2 models=$3
  local buildtree="$work/buildtrees/zo2/$triplet-$label-rel"
  local pkg="$work/packages/zo2_$triplet-$label"
  rm -rf "$buildtree" "$pkg"
  local no_models=()  # zo2[core] has no eigen3 or nlohmann-json to find: zo2 must not look
  [[ $models == ON ]] || no_models=(-DCMAKE_DISABLE_FIND_PACKAGE_Eigen3=TRUE -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=TRUE)
  cmake "${generator[@]}" -S "$src" -B "$buildtree" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$pkg" \
    "${port_options[@]}" -DZO2_ENABLE_CUDA="$cuda" -DZO2_WITH_MODELS="$models" "${no_models[@]}"
  cmake --build "$buildtree" --target install --parallel "$jobs"

  # vcpkg_cmake_config_fixup(PACKAGE_NAME zo2 CONFIG_PATH share/zo2): already in place.
  [[ -f "$pkg/share/zo2/zo2Config.cmake" ]] || fail "share/zo2/zo2Config.cmake missing"
  [[ -f "$pkg/share/zo2/zo2ConfigVersion.cmake" ]] || fail "zo2ConfigVersion.cmake missing"
  [[ -f "$pkg/share/zo2/zo2Targets.cmake" ]] || fail "zo2Targets.cmake missing"
  if [[ $models == ON ]]; then
    [[ -f "$pkg/share/zo2/zo2ModelsTargets.cmake" ]] || fail "zo2ModelsTargets.cmake missing"
  else
    [[ ! -e "$pkg/share/zo2/zo2ModelsTargets.cmake" ]] || fail "zo2[core] installed zo2ModelsTargets.cmake"
  fi
  if grep -qE 'Eigen3::|nlohmann_json::' "$pkg/share/zo2/zo2Targets.cmake"; then
    fail "zo2Targets.cmake (zo2::core) names Eigen3 or nlohmann_json"
  fi
  rm -rf "$pkg/debug" "$pkg/lib" "$pkg/share/doc"
  install -m 644 "$port/usage" "$pkg/share/zo2/usage"
  if [[ -f "$src/LICENSE" ]]; then
    install -m 644 "$src/LICENSE" "$pkg/share/zo2/copyright"
  else
    echo "zo2: no license file was found in the source tree this package was built from." \
      > "$pkg/share/zo2/copyright"
    echo "WARNING: no LICENSE in $src (vcpkg would install a placeholder copyright)"
  fi

  # A few of vcpkg's post-build checks.
  [[ -f "$pkg/include/zo2/zo2.hpp" ]] || fail "include/zo2/zo2.hpp missing"
  local empty
  empty=$(find "$pkg" -type d -empty)
  [[ -z "$empty" ]] || fail "empty directories in the package: $empty"
  if grep -rlE "$src|$buildtree" "$pkg/share/zo2" >/dev/null; then
    fail "absolute source/build paths in the installed CMake files"
  fi
  [[ -z "$(find "$pkg" -name '*.a' -o -name '*.so*' -o -name '*.dll')" ]] || fail "binaries in a header-only package"
  echo "staged: $pkg"
}

# Consume a staged package the way a vcpkg user would (CMAKE_PREFIX_PATH stands in for the
# vcpkg toolchain's installed/<triplet>).
consume() {  # $1: features label, $2: consumer project (tests/consumers/<name>), extra cmake args...
  local label=$1 project=$2; shift 2
  local pkg="$work/packages/zo2_$triplet-$label"
  local build="$work/consumer-$label"
  rm -rf "$build"
  cmake "${generator[@]}" -S "$src/tests/consumers/$project" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$pkg" "$@"
  cmake --build "$build" --parallel "$jobs"
  "$build/consumer"
}

build_port default OFF ON
consume default find_package
passed=1

# zo2[core]: no Eigen, no nlohmann-json, in the package or in the consumer.
build_port core OFF OFF
consume core core_only -DCMAKE_DISABLE_FIND_PACKAGE_Eigen3=TRUE \
  -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=TRUE -DCONSUMER_TRY_CUDA=OFF
passed=2

if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  build_port cuda ON ON
  consume cuda find_package
  [[ -x "$work/consumer-cuda/consumer_cuda_link" ]] || fail "zo2[cuda]: zo2::cuda consumer not built"
  passed=3
fi

echo "vcpkg emulation: $passed passed, 0 failed"
