"""OFFLINE CI ONLY: stands in for ConanCenter's nlohmann_json/3.11.x with Debian's
nlohmann-json3-dev (3.11.2 on Debian 12). ci_offline.sh exports it under the version the system
package has (`conan export ... --version`).

Conan's "system package" pattern: nothing is packaged; cmake_find_mode none makes consumers use
the distribution's /usr/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake. A normal user gets
nlohmann_json from ConanCenter.
"""
from conan import ConanFile
from conan.tools.system.package_manager import Apt

required_conan_version = ">=2.0"


class NlohmannJsonSystemConan(ConanFile):
    name = "nlohmann_json"
    description = "System nlohmann-json (Debian) standing in for ConanCenter's nlohmann_json"
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"

    def package_id(self):
        self.info.clear()

    def system_requirements(self):
        Apt(self).install(["nlohmann-json3-dev"])

    def package_info(self):
        self.cpp_info.set_property("cmake_file_name", "nlohmann_json")
        self.cpp_info.set_property("cmake_target_name", "nlohmann_json::nlohmann_json")
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.includedirs = ["/usr/include"]
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
