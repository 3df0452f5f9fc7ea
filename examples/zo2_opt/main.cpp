// zo2 (alias zo2-opt): fine-tune, evaluate and sample language models with MeZO-SGD. One program
// for every model family: the model directory's config.json picks it (model_type opt: OPT;
// llama, qwen2, qwen3, mistral: the LLaMA family).
//
// Every failure is one line on stderr ("zo2: <what>, naming the file, line or flag at fault")
// and a non-zero exit status: 2 for a usage error, 1 for anything else.
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include <zo2/core/error.hpp>

#include "cli.hpp"
#include "commands.hpp"

namespace {

std::string usage(const std::string& name) {
  return name + ": zeroth-order (MeZO-SGD) fine-tuning of language models with zo2\n"
         "\n"
         "Usage: " + name + " <command> [options]\n"
         "\n"
         "Commands:\n"
         "  train      fine-tune a model (try: " + name + " train --demo)\n"
         "  eval       loss, perplexity, or accuracy of a model on a dataset\n"
         "  generate   continue a prompt (greedy or top-p sampling)\n"
         "  tokenize   text to token ids (JSON)\n"
         "\n"
         "Models: Hugging Face checkpoint directories; config.json's model_type picks the family:\n"
         "  opt                              OPT (the demo's family)\n"
         "  llama, qwen2, qwen3, mistral     the LLaMA family (LLaMA 2/3, Qwen2/2.5/3, Mistral)\n"
         "The program is zo2; zo2-opt is the same program under its former name.\n"
         "\n"
         "Run '" + name + " <command> --help' for the options of a command.\n";
}

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  // "zo2" or "zo2-opt" (the alias): usage lines and messages say the name it was run by.
  const std::string invoked = argc > 0 && argv[0] ? std::filesystem::path(argv[0]).filename().string() : "";
  zo2_opt::set_program_name(invoked.empty() ? "zo2" : invoked);
  const std::string& name = zo2_opt::program_name();
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(usage(name).c_str(), args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  try {
    if (command == "train") return zo2_opt::run_train(args);
    if (command == "eval") return zo2_opt::run_eval(args);
    if (command == "generate") return zo2_opt::run_generate(args);
    if (command == "tokenize") return zo2_opt::run_tokenize(args);
    std::fprintf(stderr, "%s: unknown command '%s' (commands: train, eval, generate, tokenize; see %s --help)\n",
                 name.c_str(), command.c_str(), name.c_str());
    return 2;
  } catch (const zo2_opt::UsageError& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: %s\n", name.c_str(), one_line(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: %s\n", name.c_str(), one_line(e.what()).c_str());
    return 1;
  }
}
