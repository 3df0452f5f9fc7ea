"""Conan 2 recipe for zo2, a header-only C++20 library for zeroth-order (MeZO-SGD) fine-tuning.

Normal use (dependencies from ConanCenter):

    conan create packaging/conan -s compiler.cppstd=20            # from the repository root
    # consumer conanfile: requires("zo2/0.1.0"); CMake: find_package(zo2 CONFIG REQUIRED)
    #                     target_link_libraries(app PRIVATE zo2::zo2)

A normal user gets eigen/3.4.0 and nlohmann_json/3.11.x from ConanCenter. CI has no network:
packaging/conan/ci_offline.sh exports tiny "system" stand-ins under the same names and versions
(packaging/conan/system/) that point at the Debian packages, and runs `conan create` with no
remote.

Option `cuda` (default False): adds the component `zo2::cuda` (zo2::zo2 plus CUDA::cudart,
cublas, cublasLt, curand from the consumer's own CUDA toolkit, found with find_package
(CUDAToolkit) by a build module). The package itself is the same either way: headers only.
"""
import os

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.cmake import CMake, CMakeDeps, CMakeToolchain, cmake_layout
from conan.tools.files import copy, load, rmdir, save

required_conan_version = ">=2.0"

# A build module the generated zo2-config.cmake includes when the `cuda` option is on.
_CUDA_BUILD_MODULE = """\
# Added by zo2's Conan recipe (option cuda=True): resolve zo2::cuda's CUDA libraries against
# the consumer's own CUDA toolkit; zo2 is header-only, so nothing was linked at package time.
find_package(CUDAToolkit REQUIRED)
if(TARGET zo2::cuda)
  set_property(TARGET zo2::cuda APPEND PROPERTY INTERFACE_LINK_LIBRARIES
               CUDA::cudart CUDA::cublas CUDA::cublasLt CUDA::curand)
  # As in zo2's own zo2::cuda: C++20 for nvcc, and Eigen's flags under nvcc.
  set_property(TARGET zo2::cuda APPEND PROPERTY INTERFACE_COMPILE_OPTIONS
               "$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20;--expt-relaxed-constexpr;-diag-suppress=20012>")
endif()
"""


class Zo2Conan(ConanFile):
    name = "zo2"
    description = ("Header-only C++20 zeroth-order (MeZO-SGD) full-parameter fine-tuning with "
                   "host-memory offloading of transformer blocks")
    license = "Apache-2.0"
    topics = ("mezo", "zeroth-order", "fine-tuning", "offloading", "header-only", "cuda")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    options = {"cuda": [True, False]}
    default_options = {"cuda": False}
    no_copy_source = True

    @property
    def _source_root(self):
        # The recipe lives in <repo>/packaging/conan.
        return os.path.abspath(os.path.join(self.recipe_folder, os.pardir, os.pardir))

    def set_version(self):
        if self.version:
            return
        import re
        cmakelists = load(self, os.path.join(self._source_root, "CMakeLists.txt"))
        match = re.search(r"project\(\s*zo2\s+VERSION\s+([0-9][0-9.]*)", cmakelists)
        self.version = match.group(1)

    def export_sources(self):
        root = self._source_root
        copy(self, "CMakeLists.txt", root, self.export_sources_folder)
        copy(self, "include/*", root, self.export_sources_folder)
        copy(self, "cmake/*", root, self.export_sources_folder)
        copy(self, "LICENSE*", root, self.export_sources_folder)
        copy(self, "README.md", root, self.export_sources_folder)

    def layout(self):
        cmake_layout(self)

    def requirements(self):
        # Header-only all the way down: zo2's public headers include both.
        self.requires("eigen/3.4.0", transitive_headers=True)
        self.requires("nlohmann_json/[~3.11]", transitive_headers=True)

    def package_id(self):
        # Headers only, identical for every setting and for cuda=True/False (the option only
        # changes package_info()).
        self.info.clear()

    def validate(self):
        check_min_cppstd(self, 20)

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["ZO2_BUILD_TESTS"] = False
        tc.cache_variables["ZO2_BUILD_EXAMPLES"] = False
        tc.cache_variables["ZO2_BUILD_BENCH"] = False
        tc.cache_variables["ZO2_INSTALL"] = True
        # CUDA only decides whether zo2's own CUDA tests/examples would be built: never here.
        tc.cache_variables["ZO2_ENABLE_CUDA"] = False
        tc.generate()
        CMakeDeps(self).generate()

    def build(self):
        # Nothing to compile; configuring checks that the dependencies are found.
        cmake = CMake(self)
        cmake.configure()

    def package(self):
        CMake(self).install()
        # Conan generates its own zo2-config.cmake from package_info(); the one zo2 installs for
        # plain CMake users would only shadow it.
        rmdir(self, os.path.join(self.package_folder, "share", "cmake"))
        rmdir(self, os.path.join(self.package_folder, "lib", "cmake"))
        copy(self, "LICENSE*", self.source_folder, os.path.join(self.package_folder, "licenses"))
        save(self, os.path.join(self.package_folder, self._cuda_build_module), _CUDA_BUILD_MODULE)

    @property
    def _cuda_build_module(self):
        return os.path.join("share", "conan", "zo2", "zo2-cuda-libraries.cmake")

    def package_info(self):
        self.cpp_info.set_property("cmake_file_name", "zo2")
        self.cpp_info.set_property("cmake_target_name", "zo2::zo2_all")

        core = self.cpp_info.components["core"]
        core.set_property("cmake_target_name", "zo2::zo2")
        core.bindirs = []
        core.libdirs = []
        core.requires = ["eigen::eigen", "nlohmann_json::nlohmann_json"]
        if self.settings.os in ("Linux", "FreeBSD"):
            core.system_libs = ["pthread", "m"]

        if self.options.cuda:
            cuda = self.cpp_info.components["cuda"]
            cuda.set_property("cmake_target_name", "zo2::cuda")
            cuda.bindirs = []
            cuda.libdirs = []
            cuda.includedirs = []
            cuda.requires = ["core"]
            self.cpp_info.set_property("cmake_build_modules", [self._cuda_build_module])
