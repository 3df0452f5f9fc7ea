# cmake/zo2Install.cmake -- install rules and the CMake package (find_package(zo2 CONFIG)).
#
# Included from the top-level CMakeLists.txt when ZO2_INSTALL is on. What gets installed:
#   <prefix>/include/zo2/...                         every header, .hpp and .cuh alike
#   <prefix>/<ZO2_INSTALL_CMAKEDIR>/zo2Config.cmake
#                                  zo2ConfigVersion.cmake   (ARCH_INDEPENDENT: header-only)
#                                  zo2Targets.cmake         (zo2::core: component core)
#                                  zo2ModelsTargets.cmake   (zo2::models, zo2::zo2: component
#                                                            models; absent when zo2 was configured
#                                                            with ZO2_WITH_MODELS=OFF)
#
# One export file per component, so that a consumer asking for `core` only loads a file that
# names no Eigen3:: or nlohmann_json:: target, and zo2Config.cmake looks for Eigen and
# nlohmann-json only when the models are asked for (cmake/zo2Config.cmake.in).
#
# zo2::cuda_core and zo2::cuda (and zo2::tokenizers) are deliberately NOT in the exported target
# sets. The library is header-only, so they are nothing but "zo2::core (resp. zo2::zo2) + the
# CUDA libraries the .cuh headers call": zo2Config.cmake creates them itself when a consumer asks
# for the `cuda` component and its own CUDAToolkit is found. Consequences:
#   - one installed package serves both kinds of consumers, whether or not zo2 itself was
#     configured with ZO2_ENABLE_CUDA (that switch only decides whether zo2's own CUDA tests,
#     examples and benchmarks are built);
#   - find_package(zo2 CONFIG REQUIRED) with no cuda component never looks for CUDA, so it works
#     on a machine without a CUDA toolkit;
#   - the CUDA:: targets are resolved against the consumer's toolkit, never a path baked in at
#     zo2's install time.

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# share/ rather than lib/: nothing here depends on the architecture. Packagers may move it
# (vcpkg's config fixup moves it to share/zo2 anyway).
set(ZO2_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/zo2"
    CACHE STRING "Where zo2's CMake package files are installed, relative to the prefix")

# Header by header rather than install(DIRECTORY): no empty folders for directories that hold
# no header yet (vcpkg's post-build checks reject empty folders). CONFIGURE_DEPENDS re-globs on
# every build, so a header added later is installed without a manual re-configure.
file(GLOB_RECURSE _zo2_headers CONFIGURE_DEPENDS
     RELATIVE "${PROJECT_SOURCE_DIR}/include"
     "${PROJECT_SOURCE_DIR}/include/zo2/*.hpp" "${PROJECT_SOURCE_DIR}/include/zo2/*.h"
     "${PROJECT_SOURCE_DIR}/include/zo2/*.cuh" "${PROJECT_SOURCE_DIR}/include/zo2/*.inl")
foreach(_zo2_header IN LISTS _zo2_headers)
  get_filename_component(_zo2_header_dir "${_zo2_header}" DIRECTORY)
  install(FILES "${PROJECT_SOURCE_DIR}/include/${_zo2_header}"
          DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/${_zo2_header_dir}"
          COMPONENT zo2_headers)
endforeach()
unset(_zo2_headers)
unset(_zo2_header)
unset(_zo2_header_dir)

install(TARGETS zo2_core EXPORT zo2Targets)
install(EXPORT zo2Targets
        NAMESPACE zo2::
        FILE zo2Targets.cmake
        DESTINATION "${ZO2_INSTALL_CMAKEDIR}"
        COMPONENT zo2_cmake)
if(TARGET zo2_models)
  install(TARGETS zo2_models zo2 EXPORT zo2ModelsTargets)
  install(EXPORT zo2ModelsTargets
          NAMESPACE zo2::
          FILE zo2ModelsTargets.cmake
          DESTINATION "${ZO2_INSTALL_CMAKEDIR}"
          COMPONENT zo2_cmake)
endif()

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/zo2Config.cmake.in"
  "${PROJECT_BINARY_DIR}/zo2Config.cmake"
  INSTALL_DESTINATION "${ZO2_INSTALL_CMAKEDIR}")

# 0.x: a minor version may break the API, so only the same minor version is compatible.
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/zo2ConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  COMPATIBILITY SameMinorVersion
  ARCH_INDEPENDENT)

install(FILES "${PROJECT_BINARY_DIR}/zo2Config.cmake"
              "${PROJECT_BINARY_DIR}/zo2ConfigVersion.cmake"
        DESTINATION "${ZO2_INSTALL_CMAKEDIR}"
        COMPONENT zo2_cmake)

foreach(_zo2_doc LICENSE README.md)
  if(EXISTS "${PROJECT_SOURCE_DIR}/${_zo2_doc}")
    install(FILES "${PROJECT_SOURCE_DIR}/${_zo2_doc}"
            DESTINATION "${CMAKE_INSTALL_DATADIR}/doc/zo2"
            COMPONENT zo2_headers)
  endif()
endforeach()
