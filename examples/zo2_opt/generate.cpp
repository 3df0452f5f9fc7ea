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
  s.summary = "zo2-opt generate: continue a prompt with a model (OPT, LLaMA, Qwen2/3, Mistral)";
  s.usage = "zo2-opt generate --model DIR [--prompt TEXT] [options]   (the prompt is read from stdin without --prompt)";
  s.options = {
      {"--model", "DIR", "HF checkpoint directory or a zo2-opt checkpoint", ""},
      {"--tokenizer", "DIR", "directory with tokenizer.json, or vocab.json + merges.txt", "the model directory"},
      {"--prompt", "TEXT", "the text to continue", "stdin"},
      {"--input-ids", "LIST", "comma-separated token ids instead of a prompt (used as given: no special token is added)", ""},
      {"--dump-logits", "FILE", "write the logits of the prompt's positions as a float32 .npy [tokens, vocab]", ""},
      {"--max-new-tokens", "N", "tokens to generate", "32"},
      {"--temperature", "X", "0: greedy; > 0: sample from softmax(logits / X)", "0"},
      {"--top-p", "X", "with --temperature > 0: sample from the smallest set of tokens with probability >= X", "1"},
      {"--seed", "N", "seed of the sampler", "0"},
      {"--ignore-eos", "", "keep going past the end-of-sequence token (config.json's eos_token_id)", ""},
      {"--json", "", "print {\"prompt\", \"completion\", \"ids\"} instead of the text", ""},
      {"--device", "auto|cpu|cuda", "where to compute (auto: the GPU when one is present)", "auto"},
  };
  s.options.push_back(compute_option_spec());
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

/// The length of `text` without an incomplete UTF-8 character at its end, nor a trailing U+FFFD
/// (a lossy decoder's stand-in for one): what can be printed before the next token arrives.
std::size_t complete_prefix(const std::string& text) {
  std::size_t end = text.size();
  while (end >= 3 && text.compare(end - 3, 3, "\xEF\xBF\xBD") == 0) end -= 3;
  for (std::size_t back = 1; back <= 3 && back <= end; ++back) {
    const auto c = static_cast<unsigned char>(text[end - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back for the lead
    const std::size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return need > back ? end - back : end;
  }
  return end;
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
  const std::string compute = parse_compute(args, device);
  const double temperature = args.number("--temperature", 0.0);
  const double top_p = args.number("--top-p", 1.0);
  if (temperature < 0) throw UsageError("generate: --temperature must be >= 0");
  if (!(top_p > 0 && top_p <= 1)) throw UsageError("generate: --top-p must be in (0, 1]");
  const std::int64_t max_new = args.integer("--max-new-tokens", 32);
  if (max_new < 0) throw UsageError("generate: --max-new-tokens must be >= 0");

  LoadedModel model = load_model_dir(resolve_model_dir(*args.get("--model")));
  std::optional<Tokenizer> tokenizer = model.tokenizer;
  if (args.has("--tokenizer")) tokenizer = Tokenizer::from_directory(*args.get("--tokenizer"));
  // Without a tokenizer, only token ids go in and out (--input-ids; the output is --json's, its
  // texts null): enough for a model directory that ships none, and for --dump-logits.
  if (!tokenizer && !args.has("--input-ids"))
    throw UsageError("generate: " + *args.get("--model") +
                     " has no tokenizer (tokenizer.json, or vocab.json + merges.txt); pass --tokenizer DIR, or --input-ids");
  if (tokenizer) check_tokenizer_fits(args, *tokenizer, model.config);
  std::string prompt;
  std::vector<std::int32_t> ids;
  if (args.has("--input-ids")) {
    if (args.has("--prompt")) throw UsageError("generate: --prompt and --input-ids are exclusive");
    for (const std::string& piece : split_list(*args.get("--input-ids"))) {
      char* end = nullptr;
      const long v = std::strtol(piece.c_str(), &end, 10);
      if (*end != '\0' || v < 0 || v >= model.config.vocab_size())
        throw UsageError("generate: --input-ids: '" + piece + "' is not a token id in [0, " + std::to_string(model.config.vocab_size()) + ")");
      ids.push_back(static_cast<std::int32_t>(v));
    }
    if (ids.empty()) throw UsageError("generate: --input-ids is empty");
    if (tokenizer) prompt = tokenizer->decode(ids);
  } else {
    if (args.has("--prompt")) prompt = *args.get("--prompt");
    else prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    ids = tokenizer->encode(prompt, true);
  }
  const std::size_t prompt_length = ids.size();
  if (static_cast<std::int64_t>(ids.size()) > model.config.max_position_embeddings())
    throw UsageError("generate: the prompt has " + std::to_string(ids.size()) + " tokens, more than max_position_embeddings = " +
                     std::to_string(model.config.max_position_embeddings()));
  const ModelConfig config = model.config;
  EngineOptions engine_options;
  engine_options.device = device;
  engine_options.compute = compute;
  apply_offload_flags(args, engine_options);
  auto engine = make_engine(config, *model.parameters, engine_options);
  model.parameters.reset();  // the checkpoint's mapping: the engine holds the parameters now
  const std::size_t vocab = static_cast<std::size_t>(config.vocab_size());
  if (args.has("--dump-logits")) write_npy(*args.get("--dump-logits"), engine->logits(ids), ids.size(), vocab);
  Sampler rng{args.unsigned_integer("--seed", 0)};
  const bool json_out = args.flag("--json") || !tokenizer;
  if (!json_out) {
    std::fputs(prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  // The completion is decoded as a whole sequence, never token by token (a token may end inside
  // a UTF-8 character; SentencePiece decoders treat a sequence's first token specially): the text
  // of prompt + completion past the prompt's own text, printed as it grows, an incomplete
  // character at its end held back until the next token completes it.
  const std::string prompt_decoded =
      tokenizer ? tokenizer->decode(std::span<const std::int32_t>(ids.data(), prompt_length)) : std::string();
  auto completion = [&] {
    const std::string all = tokenizer->decode(ids);
    if (all.compare(0, prompt_decoded.size(), prompt_decoded) == 0) return all.substr(prompt_decoded.size());
    return tokenizer->decode(std::span<const std::int32_t>(ids.data() + prompt_length, ids.size() - prompt_length));
  };
  std::string printed;
  auto print_completion = [&](bool final) {
    const std::string text = completion();
    const std::size_t upto = final ? text.size() : complete_prefix(text);
    if (upto <= printed.size() || text.compare(0, printed.size(), printed) != 0) return;
    std::fwrite(text.data() + printed.size(), 1, upto - printed.size(), stdout);
    std::fflush(stdout);
    printed = text.substr(0, upto);
  };
  for (std::int64_t k = 0; k < max_new; ++k) {
    if (static_cast<std::int64_t>(ids.size()) >= config.max_position_embeddings()) {
      std::fprintf(stderr, "\nzo2-opt: stopped at max_position_embeddings = %lld tokens\n", static_cast<long long>(config.max_position_embeddings()));
      break;
    }
    const std::vector<float> logits = engine->next_token_logits(ids, vocab);
    const std::int32_t next = pick_token(logits, temperature, top_p, rng);
    if (config.is_eos(next) && !args.flag("--ignore-eos")) break;
    ids.push_back(next);
    if (!json_out) print_completion(false);
  }
  const std::vector<std::int32_t> generated(ids.begin() + static_cast<std::ptrdiff_t>(prompt_length), ids.end());
  if (json_out) {
    const nlohmann::json out = {{"prompt", tokenizer ? nlohmann::json(prompt) : nlohmann::json(nullptr)},
                                {"prompt_ids", std::vector<std::int32_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(prompt_length))},
                                {"completion", tokenizer ? nlohmann::json(completion()) : nlohmann::json(nullptr)},
                                {"ids", generated}};
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    print_completion(true);
    std::printf("\n");
  }
  return 0;
}

}  // namespace zo2_opt
