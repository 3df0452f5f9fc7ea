// The core_only consumer: zo2::core and nothing else. It must compile with no Eigen and no
// nlohmann-json anywhere: not on the include path, not included by any zo2 header.
#include "tiny_stack.hpp"

#if defined(EIGEN_WORLD_VERSION) || defined(NLOHMANN_JSON_VERSION_MAJOR)
#error "<zo2/core.hpp> included Eigen or nlohmann-json"
#endif
#if __has_include(<Eigen/Core>)
#error "zo2::core put Eigen on the include path"
#endif

int main() { return consumer::run("core_only: zo2::core, no Eigen"); }
