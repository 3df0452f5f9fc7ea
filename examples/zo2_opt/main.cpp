// zo2-opt: fine-tune, evaluate and sample OPT models with MeZO-SGD (zo2).
//
// Every failure is one line on stderr ("zo2-opt: <what>, naming the file, line or flag at
// fault") and a non-zero exit status: 2 for a usage error, 1 for anything else.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include <zo2/core/error.hpp>

#include "cli.hpp"
#include "commands.hpp"

namespace {

const char* kUsage =
    "zo2-opt: zeroth-order (MeZO-SGD) fine-tuning of OPT models with zo2\n"
    "\n"
    "Usage: zo2-opt <command> [options]\n"
    "\n"
    "Commands:\n"
    "  train      fine-tune a model (try: zo2-opt train --demo)\n"
    "  eval       loss, perplexity, or accuracy of a model on a dataset\n"
    "  generate   continue a prompt (greedy or top-p sampling)\n"
    "  tokenize   text to token ids (JSON)\n"
    "\n"
    "Run 'zo2-opt <command> --help' for the options of a command.\n";

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  try {
    if (command == "train") return zo2_opt::run_train(args);
    if (command == "eval") return zo2_opt::run_eval(args);
    if (command == "generate") return zo2_opt::run_generate(args);
    if (command == "tokenize") return zo2_opt::run_tokenize(args);
    std::fprintf(stderr, "zo2-opt: unknown command '%s' (commands: train, eval, generate, tokenize; see zo2-opt --help)\n",
                 command.c_str());
    return 2;
  } catch (const zo2_opt::UsageError& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "zo2-opt: %s\n", one_line(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "zo2-opt: %s\n", one_line(e.what()).c_str());
    return 1;
  }
}
