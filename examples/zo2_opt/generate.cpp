// zo2-opt generate: continue a prompt, greedily or by top-p (nucleus) sampling.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <numeric>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>

#include "checkpoint.hpp"
#include "cli.hpp"
#include "commands.hpp"
#include "engine.hpp"
#include "model_setup.hpp"
#include "offload_flags.hpp"
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
      {"--input-ids", "LIST", "comma-separated token ids instead of a prompt (used as given: no </s> is added)", ""},
      {"--dump-logits", "FILE", "write the logits of the prompt's positions as a float32 .npy [tokens, vocab]", ""},
      {"--max-new-tokens", "N", "tokens to generate", "32"},
      {"--temperature", "X", "0: greedy; > 0: sample from softmax(logits / X)", "0"},
      {"--top-p", "X", "with --temperature > 0: sample from the smallest set of tokens with probability >= X", "1"},
      {"--seed", "N", "seed of the sampler", "0"},
      {"--ignore-eos", "", "keep going past </s>", ""},
      {"--json", "", "print {\"prompt\", \"completion\", \"ids\"} instead of the text", ""},
      {"--device", "auto|cpu|cuda", "where to compute (auto: the GPU when one is present)", "auto"},
  };
  for (OptionSpec& o : offload_option_specs()) s.options.push_back(std::move(o));
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

/// A float32 .npy file of shape [rows, cols] (NumPy format 1.0), for check_export_hf.py.
void write_npy(const std::string& path, const std::vector<float>& data, std::size_t rows, std::size_t cols) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) + ", " +
                       std::to_string(cols) + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // magic(6)+version(2)+len(2)+header+\n: multiple of 64
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) throw zo2::FileError(path, "cannot create");
  out.write("\x93NUMPY\x01\x00", 8);
  const std::uint16_t length = static_cast<std::uint16_t>(header.size());
  const char le[2] = {static_cast<char>(length & 0xff), static_cast<char>(length >> 8)};
  out.write(le, 2);
  out << header;
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!out) throw zo2::FileError(path, "write failed");
}

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
  check_tokenizer_fits(args, *tokenizer, model.config);
  std::string prompt;
  std::vector<std::int32_t> ids;
  if (args.has("--input-ids")) {
    if (args.has("--prompt")) throw UsageError("generate: --prompt and --input-ids are exclusive");
    for (const std::string& piece : split_list(*args.get("--input-ids"))) {
      char* end = nullptr;
      const long v = std::strtol(piece.c_str(), &end, 10);
      if (*end != '\0' || v < 0 || v >= model.config.vocab_size)
        throw UsageError("generate: --input-ids: '" + piece + "' is not a token id in [0, " + std::to_string(model.config.vocab_size) + ")");
      ids.push_back(static_cast<std::int32_t>(v));
    }
    if (ids.empty()) throw UsageError("generate: --input-ids is empty");
    prompt = tokenizer->decode(ids);
  } else {
    if (args.has("--prompt")) prompt = *args.get("--prompt");
    else prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    ids = tokenizer->encode(prompt, true);
  }
  const std::size_t prompt_length = ids.size();
  if (static_cast<std::int64_t>(ids.size()) > model.config.max_position_embeddings)
    throw UsageError("generate: the prompt has " + std::to_string(ids.size()) + " tokens, more than max_position_embeddings = " +
                     std::to_string(model.config.max_position_embeddings));
  const zo2::opt::OPTConfig config = model.config;
  EngineOptions engine_options;
  engine_options.device = device;
  apply_offload_flags(args, engine_options);
  auto engine = make_engine(config, std::move(model.store), engine_options);
  const std::size_t vocab = static_cast<std::size_t>(config.vocab_size);
  if (args.has("--dump-logits")) write_npy(*args.get("--dump-logits"), engine->logits(ids), ids.size(), vocab);
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
    const std::vector<float> logits = engine->next_token_logits(ids, vocab);
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
    const nlohmann::json out = {{"prompt", prompt},
                                {"prompt_ids", std::vector<std::int32_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(prompt_length))},
                                {"completion", tokenizer->decode(generated)},
                                {"ids", generated}};
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
  }
  return 0;
}

}  // namespace zo2_opt
