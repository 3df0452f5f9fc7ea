// zo2-opt: the demo corpus (data/demo_corpus.txt), embedded into the binary at build time so
// `zo2-opt train --demo` works from any directory with no files besides the program.
#pragma once

#include <string_view>

namespace zo2_opt {
std::string_view demo_corpus();
}
