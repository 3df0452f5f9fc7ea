#include "eval.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include <nlohmann/json.hpp>

#include "checkpoint.hpp"
#include "cli.hpp"
#include "commands.hpp"
#include "model_setup.hpp"
#include "offload_flags.hpp"
#include "options.hpp"

namespace zo2_opt {

EvalResult evaluate_dataset(Engine& engine, const Dataset& data, std::size_t batch_size, std::int32_t pad_id,
                            std::size_t limit,
                            const std::function<void(std::size_t, double, std::size_t)>& per_example) {
  const std::size_t n = limit == 0 ? data.examples.size() : std::min(limit, data.examples.size());
  const std::size_t step = per_example ? 1 : std::max<std::size_t>(1, batch_size);
  EvalResult result;
  double total = 0;
  std::vector<std::size_t> indices;
  for (std::size_t start = 0; start < n; start += step) {
    indices.resize(std::min(step, n - start));
    std::iota(indices.begin(), indices.end(), start);
    const TokenBatch batch = make_batch(data, indices, pad_id);
    const std::size_t targets = batch.target_tokens();
    if (targets == 0) continue;
    const double loss = engine.loss(batch);
    total += loss * static_cast<double>(targets);
    result.tokens += targets;
    if (per_example) per_example(start, loss, targets);
  }
  result.examples = n;
  result.loss = result.tokens ? total / static_cast<double>(result.tokens) : std::nan("");
  if (data.kind == TaskKind::classification) {
    std::size_t correct = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const Example& e = data.examples[i];
      const std::span<const std::int32_t> prompt(e.ids.data(), e.prompt_length);
      const std::vector<double> scores = engine.score_candidates(prompt, data.candidate_ids);
      const auto best = std::max_element(scores.begin(), scores.end()) - scores.begin();
      correct += best == e.label_index;
    }
    result.accuracy = n ? static_cast<double>(correct) / static_cast<double>(n) : 0.0;
  }
  return result;
}

namespace {

CommandSpec eval_spec() {
  CommandSpec s;
  s.name = "eval";
  s.summary = "zo2-opt eval: loss and perplexity (language modelling) or accuracy (classification) of a model (OPT, LLaMA, Qwen2/3, Mistral)";
  s.usage = "zo2-opt eval --model DIR (--data FILE | --text FILE) [options]";
  s.options = {
      {"--model", "DIR", "HF checkpoint directory or a zo2-opt checkpoint (directory or --checkpoint-dir)", ""},
      {"--tokenizer", "DIR", "directory with tokenizer.json, or vocab.json + merges.txt", "the model directory"},
      {"--data", "FILE", "JSONL ({\"text\"}, {\"prompt\",\"label\"} or {\"input_ids\"}) or plain text", ""},
      {"--text", "FILE", "plain text file, cut into --seq-len windows", ""},
      {"--template", "TEXT", "classification prompt template; {prompt} is replaced by the prompt", "{prompt}"},
      {"--candidates", "LIST", "comma-separated label words for classification, e.g. \"great,terrible\"", ""},
      {"--batch", "N", "examples per forward", "8"},
      {"--seq-len", "N", "longest sequence (longer text is cut)", "min(max_position_embeddings, 512)"},
      {"--limit", "N", "evaluate only the first N examples", "all"},
      {"--per-example", "", "print one JSON line per example with its mean token loss", ""},
      {"--device", "auto|cpu|cuda", "where to compute (auto: the GPU when one is present)", "auto"},
  };
  s.options.push_back(compute_option_spec());
  for (OptionSpec& o : offload_option_specs()) s.options.push_back(std::move(o));
  s.epilog = "Prints one JSON object: {\"loss\", \"perplexity\", \"tokens\", \"examples\"[, \"accuracy\"]}.\n";
  return s;
}

}  // namespace

int run_eval(const std::vector<std::string>& argv) {
  const CommandSpec spec = eval_spec();
  const Args args(spec, argv);
  if (args.help()) {
    std::fputs(render_help(spec).c_str(), stdout);
    return 0;
  }
  if (!args.has("--model")) throw UsageError("eval: --model DIR is required");
  const std::string device = parse_device(args);
  const std::string compute = parse_compute(args, device);
  LoadedModel model = load_model_dir(resolve_model_dir(*args.get("--model")));
  std::optional<Tokenizer> tokenizer = model.tokenizer;
  if (args.has("--tokenizer")) tokenizer = Tokenizer::from_directory(*args.get("--tokenizer"));
  if (tokenizer) check_tokenizer_fits(args, *tokenizer, model.config);
  const DataOptions data_options = data_options_from(args, model.config, 512);
  if (!args.has("--data") && !args.has("--text")) throw UsageError("eval: --data FILE or --text FILE is required");
  const Dataset data = args.has("--text")
                           ? load_dataset(*args.get("--text"), true, tokenizer ? &*tokenizer : nullptr, data_options)
                           : load_dataset(*args.get("--data"), false, tokenizer ? &*tokenizer : nullptr, data_options);
  EngineOptions engine_options;
  engine_options.device = device;
  engine_options.compute = compute;
  apply_offload_flags(args, engine_options);
  auto engine = make_engine(model.config, *model.parameters, engine_options);
  model.parameters.reset();  // the checkpoint's mapping: the engine holds the parameters now
  const std::int32_t pad = static_cast<std::int32_t>(std::max<std::int64_t>(0, model.config.pad_token_id()));
  const bool per_example = args.flag("--per-example");
  const EvalResult r = evaluate_dataset(
      *engine, data, static_cast<std::size_t>(args.integer("--batch", 8)), pad,
      static_cast<std::size_t>(args.integer("--limit", 0)),
      per_example ? std::function<void(std::size_t, double, std::size_t)>([&](std::size_t i, double loss, std::size_t tokens) {
        nlohmann::json line = {{"index", i}, {"origin", data.examples[i].origin}, {"loss", loss}, {"tokens", tokens}};
        std::printf("%s\n", line.dump().c_str());
      })
                  : std::function<void(std::size_t, double, std::size_t)>{});
  nlohmann::json out = {{"loss", r.loss}, {"perplexity", std::exp(r.loss)}, {"tokens", r.tokens}, {"examples", r.examples}};
  if (r.accuracy) out["accuracy"] = *r.accuracy;
  if (per_example) out = {{"summary", out}};
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

}  // namespace zo2_opt
