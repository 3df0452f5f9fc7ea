// zo2-opt generate: continue a prompt, greedily or by top-p (nucleus) sampling.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <numeric>

#include <nlohmann/json.hpp>

#include "checkpoint.hpp"
#include "cli.hpp"
#include "commands.hpp"
#include "engine.hpp"
#include "model_setup.hpp"
#include "options.hpp"

namespace zo2_opt {

namespace {

CommandSpec generate_spec() {
  CommandSpec s;
  s.name = "generate";
  s.summary = "zo2-opt generate: continue a prompt with an OPT model";
  s.usage = "zo2-opt generate --model DIR [--prompt TEXT] [options]   (the prompt is read from stdin without --prompt)";
  s.options = {
      {"--model", "DIR", "HF checkpoint directory or a zo2-opt checkpoint", ""},
      {"--tokenizer", "DIR", "directory with vocab.json + merges.txt", "the model directory"},
      {"--prompt", "TEXT", "the text to continue", "stdin"},
      {"--max-new-tokens", "N", "tokens to generate", "32"},
      {"--temperature", "X", "0: greedy; > 0: sample from softmax(logits / X)", "0"},
      {"--top-p", "X", "with --temperature > 0: sample from the smallest set of tokens with probability >= X", "1"},
      {"--seed", "N", "seed of the sampler", "0"},
      {"--ignore-eos", "", "keep going past </s>", ""},
      {"--json", "", "print {\"prompt\", \"completion\", \"ids\"} instead of the text", ""},
      {"--device", "cpu|cuda", "where to compute", "cpu"},
  };
  s.epilog = "Example:\n  zo2-opt generate --model out/ --prompt \"The old man\" --temperature 0.8 --top-p 0.9\n";
  return s;
}

struct Sampler {
  std::uint64_t state;
  double uniform() {  // splitmix64 -> [0, 1)
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<double>(z >> 11) * 0x1.0p-53;
  }
};

std::int32_t pick_token(const std::vector<float>& logits, double temperature, double top_p, Sampler& rng) {
  if (temperature <= 0) return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  const double top = *std::max_element(logits.begin(), logits.end());
  std::vector<std::pair<double, std::int32_t>> p(logits.size());
  double sum = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    p[i] = {std::exp((logits[i] - top) / temperature), static_cast<std::int32_t>(i)};
    sum += p[i].first;
  }
  std::sort(p.begin(), p.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  double kept = 0;
  std::size_t n = 0;
  while (n < p.size() && (n == 0 || kept < top_p * sum)) kept += p[n++].first;
  double u = rng.uniform() * kept;
  for (std::size_t i = 0; i < n; ++i) {
    u -= p[i].first;
    if (u < 0) return p[i].second;
  }
  return p[n - 1].second;
}

}  // namespace

int run_generate(const std::vector<std::string>& argv) {
  const CommandSpec spec = generate_spec();
  const Args args(spec, argv);
  if (args.help()) {
    std::fputs(render_help(spec).c_str(), stdout);
    return 0;
  }
  if (!args.has("--model")) throw UsageError("generate: --model DIR is required");
  const std::string device = parse_device(args);
  const double temperature = args.number("--temperature", 0.0);
  const double top_p = args.number("--top-p", 1.0);
  if (temperature < 0) throw UsageError("generate: --temperature must be >= 0");
  if (!(top_p > 0 && top_p <= 1)) throw UsageError("generate: --top-p must be in (0, 1]");
  const std::int64_t max_new = args.integer("--max-new-tokens", 32);
  if (max_new < 0) throw UsageError("generate: --max-new-tokens must be >= 0");

  LoadedModel model = load_model_dir(resolve_model_dir(*args.get("--model")));
  std::optional<Tokenizer> tokenizer = model.tokenizer;
  if (args.has("--tokenizer")) tokenizer = Tokenizer::from_directory(*args.get("--tokenizer"));
  if (!tokenizer)
    throw UsageError("generate: " + (std::filesystem::path(*args.get("--model")) / "vocab.json").string() +
                     " is missing; pass --tokenizer DIR");
  std::string prompt;
  if (args.has("--prompt")) prompt = *args.get("--prompt");
  else prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());

  std::vector<std::int32_t> ids = tokenizer->encode(prompt, true);
  const std::size_t prompt_length = ids.size();
  if (static_cast<std::int64_t>(ids.size()) > model.config.max_position_embeddings)
    throw UsageError("generate: the prompt has " + std::to_string(ids.size()) + " tokens, more than max_position_embeddings = " +
                     std::to_string(model.config.max_position_embeddings));
  const zo2::opt::OPTConfig config = model.config;
  EngineOptions engine_options;
  engine_options.device = device;
  auto engine = make_engine(config, std::move(model.store), engine_options);
  Sampler rng{args.unsigned_integer("--seed", 0)};
  const bool json_out = args.flag("--json");
  if (!json_out) {
    std::fputs(prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  for (std::int64_t k = 0; k < max_new; ++k) {
    if (static_cast<std::int64_t>(ids.size()) >= config.max_position_embeddings) {
      std::fprintf(stderr, "\nzo2-opt: stopped at max_position_embeddings = %lld tokens\n", static_cast<long long>(config.max_position_embeddings));
      break;
    }
    const std::vector<float> logits = engine->next_token_logits(ids);
    const std::int32_t next = pick_token(logits, temperature, top_p, rng);
    if (next == config.eos_token_id && !args.flag("--ignore-eos")) break;
    ids.push_back(next);
    if (!json_out) {
      const std::int32_t one[1] = {next};
      std::fputs(tokenizer->decode(one).c_str(), stdout);
      std::fflush(stdout);
    }
  }
  const std::vector<std::int32_t> generated(ids.begin() + static_cast<std::ptrdiff_t>(prompt_length), ids.end());
  if (json_out) {
    const nlohmann::json out = {{"prompt", prompt}, {"completion", tokenizer->decode(generated)}, {"ids", generated}};
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
  }
  return 0;
}

}  // namespace zo2_opt
