# vcpkg overlay port for zo2 (header-only).
#   vcpkg install zo2 --overlay-ports=<zo2 checkout>/packaging/vcpkg
#   vcpkg install "zo2[cuda]" --overlay-ports=<zo2 checkout>/packaging/vcpkg
#   vcpkg install "zo2[core]" --overlay-ports=<zo2 checkout>/packaging/vcpkg   (no models: no Eigen)
#
# The overlay builds the checkout it lives in. A registry port would instead fetch a release:
#   vcpkg_from_github(OUT_SOURCE_PATH SOURCE_PATH REPO <owner>/zo2 REF v${VERSION} SHA512 <...>)
# packaging/vcpkg/ci_emulate.sh runs the same CMake steps without vcpkg (CI has no network).

set(VCPKG_BUILD_TYPE release)  # header-only: one configuration is all there is

get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

# models (a default feature) -> ZO2_WITH_MODELS: zo2::models and zo2::zo2 (Eigen, nlohmann-json).
#   Without it (vcpkg install "zo2[core]") only zo2::core is installed: the optimizer for the
#   consumer's own layer stack, with neither dependency.
# cuda -> ZO2_ENABLE_CUDA=ON (otherwise explicitly OFF, whatever nvcc is on the machine). It only
# decides whether zo2's own CUDA parts are configured: the installed zo2Config.cmake offers
# zo2::cuda_core (and zo2::cuda) to any consumer that asks for the `cuda` component and has a CUDA
# toolkit.
vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    models ZO2_WITH_MODELS
    cuda ZO2_ENABLE_CUDA
)

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    -DZO2_BUILD_TESTS=OFF
    -DZO2_BUILD_EXAMPLES=OFF
    -DZO2_BUILD_BENCH=OFF
    -DZO2_INSTALL=ON
    -DZO2_INSTALL_CMAKEDIR=share/zo2
    ${FEATURE_OPTIONS}
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME zo2 CONFIG_PATH share/zo2)

file(REMOVE_RECURSE
  "${CURRENT_PACKAGES_DIR}/debug"
  "${CURRENT_PACKAGES_DIR}/lib"
  "${CURRENT_PACKAGES_DIR}/share/doc")

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
if(EXISTS "${SOURCE_PATH}/LICENSE")
  vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
else()
  message(WARNING "zo2: no LICENSE file in ${SOURCE_PATH}; writing a placeholder copyright")
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright"
       "zo2: no license file was found in the source tree this package was built from.\n")
endif()
