"""OFFLINE CI ONLY: stands in for ConanCenter's eigen/3.4.0 with Debian's libeigen3-dev.

Conan's "system package" pattern: the recipe packages nothing, checks that the distribution
package is installed, and tells consumers to use the distribution's own CMake config
(cmake_find_mode none: CMakeDeps writes no Eigen3-config.cmake, so find_package(Eigen3) finds
/usr/share/eigen3/cmake/Eigen3Config.cmake). A normal user gets eigen from ConanCenter.
"""
from conan import ConanFile
from conan.tools.system.package_manager import Apt

required_conan_version = ">=2.0"


class EigenSystemConan(ConanFile):
    name = "eigen"
    version = "3.4.0"
    description = "System Eigen (Debian libeigen3-dev) standing in for ConanCenter's eigen"
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"

    def package_id(self):
        self.info.clear()

    def system_requirements(self):
        # Default tools.system.package_manager:mode is "check": fails if the package is missing.
        Apt(self).install(["libeigen3-dev"])

    def package_info(self):
        self.cpp_info.set_property("cmake_file_name", "Eigen3")
        self.cpp_info.set_property("cmake_target_name", "Eigen3::Eigen")
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.includedirs = ["/usr/include/eigen3"]
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
