// zo2-opt: the subcommands. Each takes the arguments after its name and returns the exit status.
#pragma once

#include <string>
#include <vector>

namespace zo2_opt {

int run_train(const std::vector<std::string>& args);
int run_eval(const std::vector<std::string>& args);
int run_generate(const std::vector<std::string>& args);
int run_tokenize(const std::vector<std::string>& args);

}  // namespace zo2_opt
