# cmake/zo2Install.cmake -- install rules and the CMake package (find_package(zo2 CONFIG)).
#
# Included from the top-level CMakeLists.txt when ZO2_INSTALL is on. What gets installed:
#   <prefix>/include/zo2/...                         every header, .hpp and .cuh alike
#   <prefix>/<ZO2_INSTALL_CMAKEDIR>/zo2Config.cmake
#                                  zo2ConfigVersion.cmake   (ARCH_INDEPENDENT: header-only)
#                                  zo2Targets.cmake         (zo2::zo2)
#
# zo2::cuda is deliberately NOT in the exported target set. The library is header-only, so
# zo2::cuda is nothing but "zo2::zo2 + the CUDA libraries the .cuh headers call": zo2Config.cmake
# creates it itself when a consumer asks for the `cuda` component and its own CUDAToolkit is
# found. Consequences:
#   - one installed package serves both kinds of consumers, whether or not zo2 itself was
#     configured with ZO2_ENABLE_CUDA (that switch only decides whether zo2's own CUDA tests,
#     examples and benchmarks are built);
#   - find_package(zo2 CONFIG REQUIRED) with no component never looks for CUDA, so it works on a
#     machine without a CUDA toolkit;
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

install(TARGETS zo2 EXPORT zo2Targets)
install(EXPORT zo2Targets
        NAMESPACE zo2::
        FILE zo2Targets.cmake
        DESTINATION "${ZO2_INSTALL_CMAKEDIR}"
        COMPONENT zo2_cmake)

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
