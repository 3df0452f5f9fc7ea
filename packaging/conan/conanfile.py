"""Conan 2 recipe for zo2, a header-only C++20 library for zeroth-order (MeZO-SGD) fine-tuning.

Normal use (dependencies from ConanCenter):

    conan create packaging/conan -s compiler.cppstd=20            # from the repository root
    # consumer conanfile: requires("zo2/0.1.0"); CMake: find_package(zo2 CONFIG REQUIRED)
    #                     target_link_libraries(app PRIVATE zo2::zo2)

A normal user gets eigen/3.4.0 and nlohmann_json/3.11.x from ConanCenter. CI has no network:
packaging/conan/ci_offline.sh exports tiny "system" stand-ins under the same names and versions
(packaging/conan/system/) that point at the Debian packages, and runs `conan create` with no
remote.

Components (CMake targets), as in zo2's own CMake package:
  core       zo2::core       the optimizer, parameter store, layer-stack concept, update rules, CPU
                             Resident policy (<zo2/core.hpp>); C++20 and threads only.
  models     zo2::models     core + eigen + nlohmann_json: models/, io/ (and, for nvcc, Eigen's flags
                             --expt-relaxed-constexpr -diag-suppress=20012, from a build module).
  all        zo2::zo2        core + models: everything (<zo2/zo2.hpp>), as in 0.1.
  cuda_core  zo2::cuda_core  core + CUDA::cudart, cublas, cublasLt (no Eigen).   } option cuda
  cuda       zo2::cuda       zo2::zo2 + zo2::cuda_core, as in 0.1.                } (with models)

Option `models` (default True): False drops eigen and nlohmann_json from the requirements and
leaves zo2::core (and zo2::cuda_core): a project that only runs the optimizer on its own layer
stack needs neither library.

Option `cuda` (default False): adds zo2::cuda_core and zo2::cuda; their CUDA libraries come from
the consumer's own CUDA toolkit, found with find_package(CUDAToolkit) by a build module. The
package itself is the same for every option: headers only.
"""
import os

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.cmake import CMake, CMakeDeps, CMakeToolchain, cmake_layout
from conan.tools.files import copy, load, rmdir, save

required_conan_version = ">=2.0"

# Build modules the generated zo2-config.cmake includes. zo2 is header-only: nothing was linked
# at package time, so the CUDA libraries are the consumer's own toolkit's.
_MODELS_BUILD_MODULE = """\
# Added by zo2's Conan recipe (option models=True): Eigen's flags for nvcc, on the models only
# (zo2::core and zo2::cuda_core never carry them), as in zo2's own zo2::models.
if(TARGET zo2::models)
  set_property(TARGET zo2::models APPEND PROPERTY INTERFACE_COMPILE_OPTIONS
               "$<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr;-diag-suppress=20012>")
endif()
"""

_CUDA_BUILD_MODULE = """\
# Added by zo2's Conan recipe (option cuda=True): resolve zo2::cuda_core's CUDA libraries against
# the consumer's own CUDA toolkit (no cuRAND: zo2 draws its perturbations with its own Philox).
find_package(CUDAToolkit REQUIRED)
if(TARGET zo2::cuda_core)
  set_property(TARGET zo2::cuda_core APPEND PROPERTY INTERFACE_LINK_LIBRARIES
               CUDA::cudart CUDA::cublas CUDA::cublasLt)
  # As in zo2's own zo2::cuda_core: C++20 for nvcc.
  set_property(TARGET zo2::cuda_core APPEND PROPERTY INTERFACE_COMPILE_OPTIONS
               "$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>")
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
    options = {"models": [True, False], "cuda": [True, False]}
    default_options = {"models": True, "cuda": False}
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
        # Header-only all the way down: the models' and io/'s public headers include both; the
        # optimizer core (option models=False) includes neither.
        if self.options.models:
            self.requires("eigen/3.4.0", transitive_headers=True)
            self.requires("nlohmann_json/[~3.11]", transitive_headers=True)

    def package_id(self):
        # Headers only, identical for every setting and option (models and cuda only change the
        # requirements and package_info()).
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
        tc.cache_variables["ZO2_WITH_MODELS"] = bool(self.options.models)
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
        save(self, os.path.join(self.package_folder, self._models_build_module), _MODELS_BUILD_MODULE)
        save(self, os.path.join(self.package_folder, self._cuda_build_module), _CUDA_BUILD_MODULE)

    @property
    def _models_build_module(self):
        return os.path.join("share", "conan", "zo2", "zo2-models-flags.cmake")

    @property
    def _cuda_build_module(self):
        return os.path.join("share", "conan", "zo2", "zo2-cuda-libraries.cmake")

    def package_info(self):
        self.cpp_info.set_property("cmake_file_name", "zo2")
        self.cpp_info.set_property("cmake_target_name", "zo2::zo2_all")

        def header_component(name, target, requires):
            c = self.cpp_info.components[name]
            c.set_property("cmake_target_name", target)
            c.bindirs = []
            c.libdirs = []
            c.requires = requires
            if name != "core":
                c.includedirs = []  # the include dir comes with core
            return c

        core = header_component("core", "zo2::core", [])
        if self.settings.os in ("Linux", "FreeBSD"):
            core.system_libs = ["pthread", "m"]

        build_modules = []
        if self.options.models:
            header_component("models", "zo2::models",
                             ["core", "eigen::eigen", "nlohmann_json::nlohmann_json"])
            header_component("all", "zo2::zo2", ["core", "models"])
            build_modules.append(self._models_build_module)

        if self.options.cuda:
            header_component("cuda_core", "zo2::cuda_core", ["core"])
            if self.options.models:
                header_component("cuda", "zo2::cuda", ["all", "cuda_core"])
            build_modules.append(self._cuda_build_module)

        if build_modules:
            self.cpp_info.set_property("cmake_build_modules", build_modules)
