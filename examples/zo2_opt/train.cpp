// zo2-opt train: zeroth-order fine-tuning (MeZO-SGD and the ZO-Bench family) with progress,
// logging, evaluation, checkpoints, resume and export.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>
#include <zo2/offload/writeback_log.hpp>

#include <zo2/models/opt/layout.hpp>

#include "checkpoint.hpp"
#include "cli.hpp"
#include "commands.hpp"
#include "data.hpp"
#include "demo_corpus.hpp"
#include "engine.hpp"
#include "eval.hpp"
#include "model_setup.hpp"
#include "options.hpp"
#include "parallel.hpp"
#include "progress.hpp"

namespace zo2_opt {

namespace {

/// The process's peak resident set (VmHWM of /proc/self/status), where the system reports it.
std::optional<std::size_t> host_peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmHWM:") {
      std::size_t kb = 0;
      if (status >> kb) return kb * 1024;
      return std::nullopt;
    }
    status.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return std::nullopt;
}

}  // namespace

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The demo's settings, measured on a shared 2-core machine: 2000 steps in ~50 s, the loss on the
// corpus falls from 5.55 (uniform over 260 tokens) to ~2.8. MeZO's usable learning rate scales
// inversely with the parameter count; for this ~150k-parameter model 4e-3 is about the largest
// that stays stable (8e-3 diverges at hidden 96).
constexpr double kDemoLr = 4e-3;
constexpr double kDemoEps = 1e-3;
constexpr std::uint64_t kDemoSteps = 2000;
constexpr std::int64_t kDemoBatch = 16;
constexpr std::int64_t kDemoSeqLen = 64;
constexpr std::uint64_t kDemoSeed = 1;

/// Models from this size on get a line before their engine is built and progress while it
/// loads (seconds to minutes).
constexpr std::size_t kLoadNoticeParameters = 1'000'000'000;

CommandSpec train_spec() {
  CommandSpec s;
  s.name = "train";
  s.summary = "zo2-opt train: fine-tune a model (OPT, LLaMA, Qwen2/3, Mistral: config.json's model_type) with zeroth-order optimization (MeZO-SGD and the ZO-Bench family: forward passes only, no backward)";
  s.usage = "zo2-opt train (--demo | --model DIR | --preset NAME | --resume DIR) [--data FILE | --text FILE] [options]";
  s.options = {
      {"--demo", "", "built-in demo: a small random OPT fine-tuned on an embedded corpus (no files needed)", ""},
      {"--model", "DIR", "HF checkpoint directory (config.json with model_type opt, llama, qwen2, qwen3 or mistral; model.safetensors or a sharded index; tokenizer.json or vocab.json + merges.txt)", ""},
      {"--preset", "NAME", "random weights with a published shape: opt-125m, opt-350m, opt-1.3b, ..., llama-3.2-1b, llama-3-8b, mistral-7b, qwen2.5-7b, qwen3-8b, qwen3-32b (or 'demo')", ""},
      {"--layers", "N", "with --preset/--demo: number of decoder layers", ""},
      {"--hidden", "N", "with --preset/--demo: hidden size (OPT: ffn = 4x; LLaMA family: the preset's ffn ratio, head_dim = hidden / heads)", ""},
      {"--heads", "N", "with --preset/--demo: attention heads", ""},
      {"--vocab-size", "N", "with --preset: vocabulary size", "the tokenizer's"},
      {"--tokenizer", "DIR", "directory with tokenizer.json, or vocab.json + merges.txt", "the model's; else bytes"},
      {"--data", "FILE", "training data: .jsonl ({\"text\"}, {\"prompt\",\"label\"}, {\"input_ids\"}), else plain text", ""},
      {"--text", "FILE", "training data: a plain text file, cut into --seq-len windows", ""},
      {"--template", "TEXT", "classification prompt template; {prompt} is replaced", "{prompt}"},
      {"--candidates", "LIST", "classification label words, e.g. \"great,terrible\" (loss on the label's tokens)", ""},
      {"--eval-data", "FILE", "evaluation data (same formats)", "the training data"},
      {"--eval-every", "N", "evaluate every N steps", "0 (start and end only)"},
      {"--eval-limit", "N", "evaluate at most N examples", "256"},
      {"--device", "auto|cpu|cuda", "where to compute (auto: the GPU when one is present)", "auto"},
      compute_option_spec(),
      {"--offload", "", "keep the weights in host memory and stream blocks to the GPU (ZO2)", ""},
      {"--codec", "NAME", "with --offload: how blocks are stored for transfer (fp32, bf16, bf16p: bf16 packed losslessly in ~12.6 bits, fp16, int8)", ""},
      {"--gpu-memory-budget", "GIB", "with --offload: GPU memory the engine may hold (above the minimum: a third slot, then resident blocks)", ""},
      {"--optimizer-state", "DTYPE", "with --offload: zo-mmt's and zo-adam's per-parameter state in fp32 or bf16 (half the bytes it moves; each stored value rounded to nearest)", "fp32"},
      {"--writeback-every", "K", "with --offload: write each streamed block back to host memory every K steps (1..64; 0: measured: training steps are timed at K = 1, 2, 4, 8 from the second step on (27 at most), the fastest K is kept and logged); the GPU replays the host copy's lag after each upload, results unchanged", "1"},
      {"--slots", "N", "with --offload: device slots the streamed blocks pass through (2..8); a third lets a slot's next upload start before its write-back ends (faster where the link's duplex is slower than one way), one block's GPU memory more; results unchanged", "2 (a GPU budget buys a third)"},
      {"--two-copies", "", "with --offload: keep theta + eps z and theta - eps z on the GPU at once instead of rewriting one between the two forwards: one block's (and the embedding's) size more GPU memory, one pass over each block less; faster where the GPU, not the link, sets the step; results unchanged", ""},
      {"--lr", "X", "learning rate", "1e-6; demo 4e-3"},
      {"--eps", "X", "perturbation scale", "1e-3"},
      {"--weight-decay", "X", "weight decay (weights only, not biases or LayerNorm)", "0"},
      {"--optimizer", "NAME", "zo-sgd (MeZO), zo-sign (sign of g), zo-mmt (momentum), zo-adam, zo-cons (keep the best of theta, theta -+ lr g z; 5 forwards a step)", "zo-sgd"},
      {"--momentum", "M", "zo-mmt's momentum", "0.9"},
      {"--beta1", "B1", "zo-adam's beta1", "0.9"},
      {"--beta2", "B2", "zo-adam's beta2", "0.999"},
      {"--adam-eps", "X", "zo-adam's epsilon", "1e-8"},
      {"--queries", "Q", "independent perturbations per step (q-SPSA; 1..16): the update follows their mean; offloaded, a block runs all 2Q forwards while it is on the GPU", "1"},
      {"--estimator", "NAME", "two-side: (L(theta+eps z) - L(theta-eps z)) / 2 eps; one-side: (L(theta+eps z) - L(theta)) / eps", "two-side"},
      {"--accumulate", "N", "micro-batches of --batch examples per step, sharing one z (effective batch N x --batch at the activation memory of --batch)", "1"},
      {"--lr-schedule", "NAME", "constant or cosine (linear warm-up, then cosine to 0)", "constant"},
      {"--warmup", "N", "warm-up steps of the cosine schedule", "0"},
      {"--steps", "N", "total number of steps (a resumed run continues up to N)", "100; demo 2000"},
      {"--batch", "N", "examples per step", "16"},
      {"--seq-len", "N", "longest sequence; text is cut into windows of this many tokens", "min(max_position_embeddings, 128); demo 64"},
      {"--seed", "N", "seed of the perturbations, the batch order and random weights", "0; demo 1"},
      {"--checkpoint-every", "N", "save a checkpoint every N steps (and at the end)", "0 (never)"},
      {"--checkpoint-dir", "DIR", "where checkpoints go (DIR/step-NNNNNNNN)", "checkpoints"},
      {"--resume", "DIR", "continue bit-exactly from a checkpoint (or the newest one in DIR)", ""},
      {"--log", "FILE", "append one JSON line per step (step, loss_plus, loss_minus, g, lr, tokens_per_s, elapsed_s; per-query g with --queries, zo-cons's losses and choice)", ""},
      {"--export", "DIR", "write an HF-loadable model (config.json, model.safetensors, tokenizer files) at the end", ""},
      {"--quiet", "", "no progress line", ""},
  };
  add_data_parallel_options(s);
  s.epilog =
      "Examples:\n"
      "  zo2-opt train --demo\n"
      "  zo2-opt train --model opt-125m/ --data sst2.jsonl --template \"{prompt} It was\" \\\n"
      "      --candidates \"terrible,great\" --lr 1e-6 --eps 1e-3 --steps 20000 --batch 16\n"
      "  zo2-opt train --preset opt-125m --layers 2 --hidden 128 --text book.txt --steps 500\n"
      "  zo2 train --model Qwen2.5-0.5B/ --data sst2.jsonl --template \"{prompt} It was\" --candidates \"terrible,great\"\n"
      "  zo2 train --preset qwen3-32b --layers 2 --hidden 256 --tokenizer Qwen3-32B/ --text book.txt\n"
      "  zo2-opt train --demo --optimizer zo-adam --lr 1e-3 --queries 4 --accumulate 2\n"
      "  zo2-opt train --resume checkpoints/ --steps 1000\n";
  return s;
}

/// A setting that a resumed run takes from state.json unless the command line gives it.
struct Resolver {
  const Args& args;
  const json* state;  // the checkpoint's "train"/"optimizer" section, or null
  std::vector<std::string> overridden;

  template <class T, class Read>
  T pick(const std::string& flag, const char* key, T fallback, Read read) {
    std::optional<T> saved;
    if (state && state->contains(key) && !(*state)[key].is_null()) saved = (*state)[key].get<T>();
    if (args.has(flag)) {
      T v = read();
      if (saved && !(v == *saved)) overridden.push_back(flag);
      return v;
    }
    return saved ? *saved : fallback;
  }
  double number(const std::string& flag, const char* key, double fallback) {
    return pick<double>(flag, key, fallback, [&] { return args.number(flag, fallback); });
  }
  std::uint64_t count(const std::string& flag, const char* key, std::uint64_t fallback) {
    return pick<std::uint64_t>(flag, key, fallback, [&] { return args.unsigned_integer(flag, fallback); });
  }
  std::string text(const std::string& flag, const char* key, const std::string& fallback) {
    return pick<std::string>(flag, key, fallback, [&] { return args.str(flag, fallback); });
  }
};

std::string fixed(double x, int digits = 4) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  return buf;
}

std::string describe_eval(const EvalResult& r) {
  std::string s = "loss " + fixed(r.loss) + "  ppl " + fixed(std::exp(r.loss), 2);
  if (r.accuracy) s += "  accuracy " + fixed(100.0 * *r.accuracy, 1) + "%";
  return s;
}

}  // namespace

int run_train(const std::vector<std::string>& argv) {
  const CommandSpec spec = train_spec();
  const Args args(spec, argv);
  if (args.help()) {
    std::fputs(render_help(spec).c_str(), stdout);
    return 0;
  }
  const std::string device = parse_device(args);

  const int sources = args.has("--demo") + args.has("--model") + args.has("--preset") + args.has("--resume");
  if (sources == 0) throw UsageError("train: say where the model comes from: --demo, --model DIR, --preset NAME or --resume DIR");
  if (args.has("--model") + args.has("--preset") + args.has("--resume") > 1)
    throw UsageError("train: --model, --preset and --resume are exclusive");
  if ((args.has("--layers") || args.has("--hidden") || args.has("--heads") || args.has("--vocab-size")) &&
      !args.has("--preset") && !(args.has("--demo") && !args.has("--resume")))
    throw UsageError("train: --layers/--hidden/--heads/--vocab-size apply only to --preset or --demo (random weights)");
  if (args.has("--data") && args.has("--text")) throw UsageError("train: --data and --text are exclusive");
  DataParallelRun dp(args, device);  // under mpirun -np N: this rank's part (parallel.hpp)

  // ---- resume state -------------------------------------------------------------------------
  std::optional<fs::path> resume_dir;
  json state;
  if (args.has("--resume")) {
    resume_dir = find_checkpoint(*args.get("--resume"));
    state = read_state(*resume_dir);
  }
  const json* saved_train = resume_dir && state.contains("train") ? &state["train"] : nullptr;
  const json* saved_opt = resume_dir && state.contains("optimizer") ? &state["optimizer"] : nullptr;
  // Where to compute: the command line's choice, else (resuming on a GPU) the checkpoint's
  // offload settings, so `train --resume DIR --steps N` continues the run as it was configured.
  const json* saved_engine =
      saved_train && saved_train->contains("engine") && (*saved_train)["engine"].is_object() ? &(*saved_train)["engine"] : nullptr;
  EngineOptions engine_options;
  engine_options.device = device;
  // A run resumed on the GPU keeps its checkpoint's forward precision unless told otherwise.
  engine_options.compute = parse_compute(args, device, saved_engine ? saved_engine->value("compute", "fp32") : "fp32");
  const bool use_saved_engine = saved_engine && device == "cuda" && !args.has("--offload");
  engine_options.offload = use_saved_engine ? saved_engine->value("offload", false) : args.flag("--offload");
  engine_options.codec = args.str("--codec", use_saved_engine && engine_options.offload ? saved_engine->value("codec", "") : "");
  if (args.has("--gpu-memory-budget")) engine_options.gpu_memory_budget_gib = args.number("--gpu-memory-budget", 0);
  else if (use_saved_engine && engine_options.offload && saved_engine->contains("gpu_memory_budget_gib") &&
           (*saved_engine)["gpu_memory_budget_gib"].is_number())
    engine_options.gpu_memory_budget_gib = (*saved_engine)["gpu_memory_budget_gib"].get<double>();
  if (!engine_options.offload && (args.has("--codec") || args.has("--gpu-memory-budget")))
    throw UsageError("train: --codec and --gpu-memory-budget apply only with --offload");
  if (args.has("--host-master") && !(engine_options.offload && device == "cuda"))
    throw UsageError("train: --host-master applies only with --device cuda --offload");
  // Offloaded under mpirun: the ranks of this host share one pinned host master.
  if (engine_options.offload && device == "cuda") engine_options.shared_master = dp.shared_host_master();
  {
    // A resumed offloaded run keeps its checkpoint's state type unless told otherwise.
    const std::string saved_state = saved_engine ? saved_engine->value("optimizer_state", "fp32") : "fp32";
    const std::string dtype = args.str("--optimizer-state", engine_options.offload ? saved_state : "fp32");
    if (dtype != "fp32" && dtype != "bf16")
      throw UsageError("train: --optimizer-state wants fp32 or bf16, got '" + dtype + "'");
    if (args.has("--optimizer-state") && !engine_options.offload)
      throw UsageError("train: --optimizer-state applies only with --offload");
    if (saved_engine && engine_options.offload && dtype != saved_state)
      throw UsageError("train: --optimizer-state " + dtype + " differs from the checkpoint's " + saved_state +
                       " (the saved state would be rounded or widened)");
    engine_options.state_bf16 = dtype == "bf16";
  }
  if (args.has("--slots")) {
    const std::uint64_t slots = args.unsigned_integer("--slots", 2);
    if (slots < 2 || slots > 8) throw UsageError("train: --slots wants 2 to 8, got " + std::to_string(slots));
    if (!engine_options.offload) throw UsageError("train: --slots applies only with --offload");
    engine_options.slots = static_cast<std::size_t>(slots);
  }
  if (args.flag("--two-copies")) {
    if (!engine_options.offload) throw UsageError("train: --two-copies applies only with --offload");
    engine_options.two_perturbed_copies = true;
  }
  if (args.has("--writeback-every")) {
    if (!engine_options.offload) throw UsageError("train: --writeback-every applies only with --offload");
    const std::uint64_t k = args.unsigned_integer("--writeback-every", 1);
    if (k > zo2::offload::kMaxWritebackEvery)
      throw UsageError("train: --writeback-every wants 0 to " + std::to_string(zo2::offload::kMaxWritebackEvery) +
                       ", got " + std::to_string(k));
    engine_options.writeback_every = static_cast<unsigned>(k);
  }

  const bool demo = args.flag("--demo") ||
                    (saved_train && !args.has("--data") && !args.has("--text") && saved_train->value("demo", false));

  Resolver train_r{args, saved_train, {}};
  Resolver opt_r{args, saved_opt, {}};
  std::uint64_t seed = resume_dir ? state["seed"].get<std::uint64_t>() : (demo ? kDemoSeed : 0);
  if (args.has("--seed")) {
    const std::uint64_t s = args.unsigned_integer("--seed", 0);
    if (resume_dir && s != seed) train_r.overridden.push_back("--seed");
    seed = s;
  }

  // ---- model and tokenizer ------------------------------------------------------------------
  std::optional<LoadedModel> model;
  std::optional<Tokenizer> tokenizer;
  if (resume_dir) {
    model = load_model_dir(*resume_dir);
    if (state.value("tokenizer", "") == "bytes") model->tokenizer = Tokenizer::bytes();
  } else if (args.has("--model")) {
    model = load_model_dir(*args.get("--model"));
  }
  if (args.has("--tokenizer")) tokenizer = Tokenizer::from_directory(*args.get("--tokenizer"));
  else if (model && model->tokenizer) tokenizer = model->tokenizer;
  if (!model) {  // random weights: --preset or --demo
    if (!tokenizer) tokenizer = Tokenizer::bytes();
    const std::string preset = args.str("--preset", "demo");
    std::int64_t vocab = args.integer("--vocab-size", 0);
    if (vocab == 0 && preset != "demo" && tokenizer->is_bytes()) vocab = Tokenizer::kByteVocabSize;
    if (vocab == 0 && !tokenizer->is_bytes()) vocab = static_cast<std::int64_t>(tokenizer->vocab_size());
    ModelConfig config = preset_config(preset, args.integer("--layers", 0), args.integer("--hidden", 0),
                                       args.integer("--heads", 0), vocab);
    if (static_cast<std::size_t>(config.vocab_size()) < tokenizer->vocab_size())
      throw UsageError("train: --vocab-size " + std::to_string(config.vocab_size()) + " is smaller than the tokenizer's " +
                       std::to_string(tokenizer->vocab_size()));
    // Made group by group as the engine takes them (the CPU engine's whole store is checked
    // against the machine's memory then).
    model = LoadedModel{config, random_source(config, seed), std::nullopt,
                        (preset == "demo" ? std::string("demo model") : preset) + " (random weights, seed " + std::to_string(seed) + ")"};
  }
  const ModelConfig config = model->config;
  if (tokenizer) check_tokenizer_fits(args, *tokenizer, config);
  const std::int32_t pad = static_cast<std::int32_t>(std::max<std::int64_t>(0, config.pad_token_id()));

  // ---- hyper-parameters ---------------------------------------------------------------------
  zo2::ZOConfig zo;
  zo.seed = seed;
  zo.lr = opt_r.number("--lr", "lr", demo ? kDemoLr : 1e-6);
  zo.eps = opt_r.number("--eps", "eps", demo ? kDemoEps : 1e-3);
  zo.weight_decay = opt_r.number("--weight-decay", "weight_decay", 0.0);
  {
    // Checkpoints before the family say "mezo-sgd".
    std::string saved_algorithm = saved_opt ? saved_opt->value("algorithm", "mezo-sgd") : "zo-sgd";
    if (saved_algorithm == "mezo-sgd") saved_algorithm = "zo-sgd";
    const std::string method = args.str("--optimizer", saved_algorithm);
    if (saved_opt && args.has("--optimizer") && method != saved_algorithm) opt_r.overridden.push_back("--optimizer");
    try {
      zo.method = zo2::parse_method(method, "--optimizer");
      zo.estimator = zo2::parse_estimator(opt_r.text("--estimator", "estimator", "two-side"), "--estimator");
    } catch (const zo2::ConfigError& e) {
      throw UsageError(std::string("train: ") + e.what());
    }
  }
  zo.queries = static_cast<unsigned>(std::min<std::uint64_t>(opt_r.count("--queries", "queries", 1), 1u << 20));
  zo.momentum = opt_r.number("--momentum", "momentum", 0.9);
  zo.beta1 = opt_r.number("--beta1", "beta1", 0.9);
  zo.beta2 = opt_r.number("--beta2", "beta2", 0.999);
  zo.adam_eps = opt_r.number("--adam-eps", "adam_eps", 1e-8);
  const std::uint64_t accumulate = opt_r.count("--accumulate", "accumulate", 1);
  if (accumulate < 1 || accumulate > 4096) throw UsageError("train: --accumulate must be in [1, 4096]");
  if (accumulate > 1 && zo.method == zo2::ZOMethod::kConservative)
    throw UsageError("train: --accumulate: zo-cons takes one batch per step");
  for (const char* flag : {"--momentum"})
    if (args.has(flag) && zo.method != zo2::ZOMethod::kMomentum) throw UsageError(std::string("train: ") + flag + " applies only to --optimizer zo-mmt");
  for (const char* flag : {"--beta1", "--beta2", "--adam-eps"})
    if (args.has(flag) && zo.method != zo2::ZOMethod::kAdam) throw UsageError(std::string("train: ") + flag + " applies only to --optimizer zo-adam");
  const std::string schedule = opt_r.text("--lr-schedule", "lr_schedule", "constant");
  const std::uint64_t warmup = opt_r.count("--warmup", "warmup_steps", 0);
  const std::uint64_t total_steps = train_r.count("--steps", "total_steps", demo ? kDemoSteps : 100);
  const std::uint64_t batch_size = train_r.count("--batch", "batch", demo ? kDemoBatch : 16);
  const std::uint64_t eval_every = train_r.count("--eval-every", "eval_every", 0);
  const std::uint64_t eval_limit = train_r.count("--eval-limit", "eval_limit", 256);
  const std::uint64_t checkpoint_every = train_r.count("--checkpoint-every", "checkpoint_every", 0);
  const fs::path checkpoint_dir = train_r.text("--checkpoint-dir", "checkpoint_dir", "checkpoints");
  if (schedule == "cosine") zo.lr_schedule = zo2::cosine_schedule(warmup, std::max<std::uint64_t>(1, total_steps));
  else if (schedule != "constant") throw UsageError("train: --lr-schedule must be constant or cosine, got '" + schedule + "'");
  if (batch_size == 0) throw UsageError("train: --batch must be > 0");
  try {
    zo.validate();
  } catch (const zo2::ConfigError& e) {
    // Name the flag the user typed (ZOConfig names its field).
    std::string flag = "--" + e.field();
    std::replace(flag.begin(), flag.end(), '_', '-');
    throw UsageError("train: " + flag + ": " + e.what());
  }
  const std::uint64_t start_step = resume_dir ? state["step"].get<std::uint64_t>() : 0;
  if (start_step > total_steps)
    throw UsageError("train: the checkpoint is at step " + std::to_string(start_step) + ", past --steps " + std::to_string(total_steps));

  // ---- data ---------------------------------------------------------------------------------
  DataOptions data_options;
  {
    // The resumed run's --seq-len/--template/--candidates default to the checkpoint's.
    std::vector<std::string> forwarded;
    auto forward = [&](const char* flag, const char* key) {
      if (args.has(flag)) {
        forwarded.push_back(flag);
        forwarded.push_back(*args.get(flag));
      } else if (saved_train && saved_train->contains(key) && !(*saved_train)[key].is_null()) {
        forwarded.push_back(flag);
        const auto& v = (*saved_train)[key];
        forwarded.push_back(v.is_string() ? v.get<std::string>() : v.dump());
      }
    };
    forward("--seq-len", "seq_len");
    forward("--template", "template");
    forward("--candidates", "candidates");
    if (demo && std::find(forwarded.begin(), forwarded.end(), "--seq-len") == forwarded.end()) {
      forwarded.push_back("--seq-len");
      forwarded.push_back(std::to_string(std::min<std::int64_t>(kDemoSeqLen, config.max_position_embeddings())));
    }
    CommandSpec data_spec{"train", "", "", {{"--seq-len", "N", "", ""}, {"--template", "T", "", ""}, {"--candidates", "L", "", ""}}, ""};
    data_options = data_options_from(Args(data_spec, forwarded), config, 128);
  }
  const Tokenizer* tok = tokenizer ? &*tokenizer : nullptr;
  std::string data_kind, data_path;
  Dataset train;
  if (args.has("--data") || args.has("--text")) {
    data_kind = args.has("--text") ? "text" : "file";
    const std::string given = args.has("--text") ? *args.get("--text") : *args.get("--data");
    data_path = fs::absolute(given).string();  // recorded for --resume
    train = load_dataset(given, data_kind == "text", tok, data_options);
  } else if (demo) {
    if (!tok) throw UsageError("train: --demo needs a tokenizer");
    data_kind = "demo";
    train = text_windows(demo_corpus(), "demo corpus", *tok, data_options);
  } else if (saved_train && saved_train->contains("data") && !(*saved_train)["data"].is_null()) {
    data_kind = saved_train->value("data_kind", "file");
    data_path = (*saved_train)["data"].get<std::string>();
    train = load_dataset(data_path, data_kind == "text", tok, data_options);
  } else {
    throw UsageError("train: no training data: pass --data FILE (JSONL or text) or --text FILE, or use --demo");
  }
  std::optional<Dataset> eval_set;
  const std::string eval_path = train_r.text("--eval-data", "eval_data", "");
  if (!eval_path.empty()) eval_set = load_dataset(eval_path, false, tok, data_options);
  const Dataset& eval_data = eval_set ? *eval_set : train;
  const std::string eval_name = eval_set ? eval_path : (train.source + (eval_limit < train.examples.size() ? " (first " + std::to_string(eval_limit) + ")" : ""));

  // ---- engine -------------------------------------------------------------------------------
  if (args.has("--export") || checkpoint_every) (void)max_shard_bytes();  // a bad ZO2_OPT_MAX_SHARD_BYTES now, not at the end
  engine_options.zo = zo;
  engine_options.start_step = start_step;
  const std::string model_description = model->description;
  if (dp.root() && config.parameter_count() >= kLoadNoticeParameters) {
    // A large model takes a while to draw or read, encode and pin: say so before it starts, and
    // while it loads.
    std::fprintf(stderr, "load      %zu parameters into the %s engine ...\n", config.parameter_count(),
                 engine_options.offload ? "offloading" : engine_options.device.c_str());
    std::fflush(stderr);
    engine_options.report_load_progress = true;
  }
  const auto load_start = std::chrono::steady_clock::now();
  auto engine = make_engine(config, *model->parameters, engine_options);
  const double load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
  model.reset();
  // The int8 codec's masters are restored from their codes and row scales, not re-quantized.
  std::string encoded_note;
  if (resume_dir) {
    const SavedProgress progress_saved = saved_progress(state);
    engine->restore_progress({progress_saved.step, seed, progress_saved.skipped_steps, progress_saved.updates});
    // Both state files are read one group at a time from their mappings (GroupStateFile), so a
    // resume never holds the whole model's optimizer state or encoded masters in memory.
    const auto saved_rule_state = GroupStateFile::open_rule_state(*resume_dir);
    const unsigned slots = zo2::rule_state_slots(zo.method == zo2::ZOMethod::kMomentum ? zo2::RuleId::kMomentum
                                                 : zo.method == zo2::ZOMethod::kAdam   ? zo2::RuleId::kAdam
                                                                                        : zo2::RuleId::kSgd);
    if (saved_rule_state && slots > 0 && saved_rule_state->slots() == slots) restore_rule_state(*engine, *saved_rule_state);
    else if (slots > 0)
      std::printf("note      the checkpoint holds no %s state (%s): it starts from zero, so the run will not match an "
                  "uninterrupted one\n",
                  zo2::method_name(zo.method), kRuleStateFile);

    if (const auto encoded = GroupStateFile::open_encoded_state(*resume_dir)) {
      const bool wanted = engine_options.offload && encoded->codec() == engine_options.codec;
      if (wanted) restore_encoded_state(*engine, *encoded);
      encoded_note = wanted ? "restored the " + encoded->codec() + " codec's codes and row scales from " + kEncodedStateFile
                            : std::string("not using ") + kEncodedStateFile + " (codec " + encoded->codec() +
                                  "): this run re-encodes the float weights";
    }
  }
  // Every rank has its model (restored): the communicator, and a barrier before the first step
  // (a rank sharing its host master must not read it before the host's first rank has set it).
  dp.attach(*engine, zo, batch_size, accumulate);
  // With accumulation, step t draws accumulate x batch examples and cuts them into micro-batches.
  const BatchSchedule schedule_of_batches(train.examples.size(), batch_size * accumulate, seed);

  const bool quiet = args.flag("--quiet") || !dp.root();
  std::printf("model     %s: %s, %zu parameters\n", model_description.c_str(), config.summary().c_str(),
              config.parameter_count());
  const std::string load_report = engine->load_report();
  std::printf("load      %.1f s to build the engine%s\n", load_seconds,
              load_report.empty() ? "" : (": " + load_report).c_str());
  std::printf("tokenizer %s\n", tok ? tok->description().c_str() : "none (pre-tokenized data)");
  std::printf("data      %s: %zu %s (%s)%s\n", train.source.c_str(), train.examples.size(),
              data_kind == "file" ? "examples" : "windows",
              train.kind == TaskKind::classification ? "classification" : "language modelling",
              train.truncated ? (", " + std::to_string(train.truncated) + " cut to --seq-len").c_str() : "");
  std::string rule_settings;
  if (zo.method == zo2::ZOMethod::kMomentum) rule_settings = " momentum " + fixed(zo.momentum, 3);
  if (zo.method == zo2::ZOMethod::kAdam)
    rule_settings = " betas (" + fixed(zo.beta1, 3) + ", " + fixed(zo.beta2, 4) + ") eps " + [&] {
      char b[32];
      std::snprintf(b, sizeof b, "%g", zo.adam_eps);
      return std::string(b);
    }();
  std::printf("optimizer %s%s, %s estimate, %u quer%s, lr %g eps %g weight decay %g (%s), batch %llu%s, seq-len %zu, seed %llu, device %s\n",
              zo2::method_name(zo.method), rule_settings.c_str(), zo2::estimator_name(zo.estimator), zo.queries,
              zo.queries == 1 ? "y" : "ies", zo.lr, zo.eps, zo.weight_decay, schedule.c_str(),
              static_cast<unsigned long long>(batch_size),
              accumulate > 1 ? (" x " + std::to_string(accumulate) + " accumulated").c_str() : "", data_options.seq_len,
              static_cast<unsigned long long>(seed), engine->device_description().c_str());
  if (resume_dir) std::printf("resume    from %s at step %llu\n", resume_dir->string().c_str(), static_cast<unsigned long long>(start_step));
  if (!encoded_note.empty()) std::printf("resume    %s\n", encoded_note.c_str());
  if (saved_engine && saved_engine->contains("description") &&
      saved_engine->value("description", "") != engine->device_description())
    std::printf("note      the checkpoint was computed on %s, this run on %s: rounding differs, so the run will not "
                "match an uninterrupted one bit for bit\n",
                saved_engine->value("description", "").c_str(), engine->device_description().c_str());
  if (resume_dir) {
    // Checkpoints before the field existed were written under scheme 1.
    const int saved_scheme = state.contains("noise_scheme") && state["noise_scheme"].is_number_integer()
                                 ? state["noise_scheme"].get<int>()
                                 : 1;
    if (saved_scheme != zo2::kNoiseScheme)
      std::printf("note      the checkpoint was written under noise scheme %d, this build draws scheme %d "
                  "(zo2/core/philox.hpp: kNoiseScheme): the run continues correctly but will not match an "
                  "uninterrupted one bit for bit\n",
                  saved_scheme, zo2::kNoiseScheme);
  }
  for (const auto& flag : train_r.overridden) std::printf("note      %s differs from the checkpoint's: the run will not match an uninterrupted one\n", flag.c_str());
  for (const auto& flag : opt_r.overridden) std::printf("note      %s differs from the checkpoint's: the run will not match an uninterrupted one\n", flag.c_str());
  std::fflush(stdout);

  const EvalResult start_eval = evaluate_dataset(*engine, eval_data, batch_size, pad, eval_limit);
  std::printf("start     %s  (on %s)\n", describe_eval(start_eval).c_str(), eval_name.c_str());
  std::fflush(stdout);

  std::ofstream log;
  if (args.has("--log") && dp.root()) {
    log.open(*args.get("--log"), std::ios::app);
    if (!log) throw zo2::FileError(*args.get("--log"), "cannot open for writing");
  }

  auto state_json = [&](std::uint64_t step) {
    const zo2::OptimizerState s = engine->state();
    return json{
        {"format", "zo2-opt-checkpoint/1"},
        {"noise_scheme", zo2::kNoiseScheme},
        {"step", step},
        {"seed", seed},
        {"skipped_steps", s.skipped_steps},
        {"updates", s.updates},
        {"tokenizer", tok ? tok->kind() : "none"},
        {"optimizer", {{"algorithm", zo2::method_name(zo.method)}, {"lr", zo.lr}, {"eps", zo.eps},
                       {"weight_decay", zo.weight_decay}, {"lr_schedule", schedule}, {"warmup_steps", warmup},
                       {"estimator", zo2::estimator_name(zo.estimator)}, {"queries", zo.queries},
                       {"accumulate", accumulate}, {"momentum", zo.momentum}, {"beta1", zo.beta1},
                       {"beta2", zo.beta2}, {"adam_eps", zo.adam_eps}}},
        {"train", {{"total_steps", total_steps}, {"batch", batch_size}, {"seq_len", data_options.seq_len},
                   {"demo", data_kind == "demo"}, {"data_kind", data_kind},
                   {"data", data_path.empty() ? json(nullptr) : json(data_path)},
                   {"template", data_options.template_text},
                   {"candidates", data_options.candidates.empty() ? json(nullptr) : json([&] {
                      std::string l;
                      for (const auto& c : data_options.candidates) l += (l.empty() ? "" : ",") + c;
                      return l;
                    }())},
                   {"eval_data", eval_path.empty() ? json(nullptr) : json(fs::absolute(eval_path).string())},
                   {"eval_every", eval_every}, {"eval_limit", eval_limit},
                   {"checkpoint_every", checkpoint_every}, {"checkpoint_dir", fs::absolute(checkpoint_dir).string()},
                   {"engine", {{"device", engine_options.device}, {"compute", engine_options.compute},
                               {"offload", engine_options.offload},
                               {"codec", engine_options.offload ? json(engine_options.codec.empty() ? "fp32" : engine_options.codec) : json(nullptr)},
                               {"gpu_memory_budget_gib", engine_options.gpu_memory_budget_gib ? json(*engine_options.gpu_memory_budget_gib) : json(nullptr)},
                               {"optimizer_state", engine_options.state_bf16 ? "bf16" : "fp32"},
                               {"description", engine->device_description()}}}}},
        {"model", config.to_json()},
    };
  };

  Progress progress(start_step, total_steps, quiet);
  double smoothed = start_eval.loss, tokens_per_s = 0;
  std::uint64_t values_lost = 0;  // engine->values_lost() as last reported
  std::uint64_t tokens_total = 0, last_checkpoint = resume_dir ? start_step : ~0ull;
  double first_losses = 0, last_losses = 0;
  std::size_t first_count = 0;
  std::vector<double> recent;
  const std::uint64_t window = std::max<std::uint64_t>(1, std::min<std::uint64_t>(50, (total_steps - start_step + 9) / 10));
  for (std::uint64_t t = start_step; t < total_steps; ++t) {
    const std::vector<std::size_t> indices = schedule_of_batches.indices(t);
    std::vector<TokenBatch> micro;
    std::size_t tokens = 0;
    for (std::size_t m = 0; m < accumulate; ++m) {
      const std::size_t from = std::min(indices.size(), m * batch_size), to = std::min(indices.size(), from + batch_size);
      if (from == to) break;
      const std::vector<std::size_t> part(indices.begin() + from, indices.begin() + to);
      micro.push_back(make_batch(train, dp.shard(part), pad));
      tokens += dp.size() > 1 ? DataParallelRun::tokens(train, part) : micro.back().real_tokens();
    }
    const auto t0 = std::chrono::steady_clock::now();
    const zo2::StepResult r = micro.size() == 1 ? engine->step(micro[0]) : engine->step_accumulated(micro);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tokens_total += tokens;
    const double step_tps = dt > 0 ? static_cast<double>(tokens) / dt : 0;
    tokens_per_s = t == start_step ? step_tps : 0.9 * tokens_per_s + 0.1 * step_tps;
    const double mean = 0.5 * (r.loss_plus + r.loss_minus);
    if (std::isfinite(mean)) {
      smoothed = t == start_step ? mean : 0.95 * smoothed + 0.05 * mean;
      if (first_count < window) {
        first_losses += mean;
        ++first_count;
      }
      recent.push_back(mean);
      if (recent.size() > window) recent.erase(recent.begin());
    }
    json line = {{"step", t}, {"loss_plus", r.loss_plus}, {"loss_minus", r.loss_minus}, {"g", r.projected_grad},
                 {"lr", r.lr}, {"tokens_per_s", step_tps}, {"elapsed_s", progress.elapsed_s()}};
    if (r.skipped) line["skipped"] = true;
    if (r.queries > 1) line["g_queries"] = std::vector<double>(r.query_grads, r.query_grads + r.queries);
    if (zo.method == zo2::ZOMethod::kConservative && !r.skipped) {
      line["loss_base"] = r.loss_base;
      line["loss_descent"] = r.loss_descent;
      line["loss_ascent"] = r.loss_ascent;
      line["kept"] = r.conservative_choice;
    }
    if (auto notice = engine->take_notice()) {
      if (dp.root()) progress.note(*notice);
      line["notice"] = *notice;
    }
    if (const std::uint64_t lost = engine->values_lost(); lost != values_lost) {
      // Silent loss is the one thing a lossless codec must never do: say it at once.
      progress.note("warning   step " + std::to_string(t) + ": " + std::to_string(lost - values_lost) +
                    " weights flushed to zero (" + std::to_string(lost) +
                    " in all): a packed tensor's escape list was full; --codec bf16 stores every value");
      values_lost = lost;
      line["values_lost"] = lost;
    }
    if (eval_every && (t + 1) % eval_every == 0 && t + 1 < total_steps) {
      const EvalResult ev = evaluate_dataset(*engine, eval_data, batch_size, pad, eval_limit);
      progress.note("eval      step " + std::to_string(t + 1) + "  " + describe_eval(ev));
      line["eval_loss"] = ev.loss;
      if (ev.accuracy) line["eval_accuracy"] = *ev.accuracy;
    }
    if (log.is_open()) {
      log << line.dump() << "\n";
      log.flush();
    }
    progress.update(t, smoothed, tokens_per_s, engine->device_memory_used());
    dp.after_step(*engine, t + 1, total_steps, checkpoint_every);
    if (dp.root() && checkpoint_every && (t + 1) % checkpoint_every == 0 && t + 1 < total_steps) {
      const auto encoded = encoded_state_source(*engine);
      const auto rule_state = rule_state_source(*engine);
      const fs::path saved = save_checkpoint(checkpoint_dir, t + 1, config, engine->model_layout(), engine->group_reader(),
                                             tok, state_json(t + 1), encoded ? &*encoded : nullptr,
                                             rule_state ? &*rule_state : nullptr);
      last_checkpoint = t + 1;
      progress.note("checkpoint " + saved.string());
    }
  }
  progress.finish();
  for (double l : recent) last_losses += l;
  const double train_seconds = progress.elapsed_s();
  const std::uint64_t steps_run = total_steps - start_step;

  if (dp.root() && checkpoint_every && last_checkpoint != total_steps) {
    const auto encoded = encoded_state_source(*engine);
    const auto rule_state = rule_state_source(*engine);
    const fs::path saved = save_checkpoint(checkpoint_dir, total_steps, config, engine->model_layout(),
                                           engine->group_reader(), tok, state_json(total_steps),
                                           encoded ? &*encoded : nullptr, rule_state ? &*rule_state : nullptr);
    std::printf("checkpoint %s\n", saved.string().c_str());
  }
  const EvalResult end_eval = evaluate_dataset(*engine, eval_data, batch_size, pad, eval_limit);
  std::printf("end       %s  (on %s)\n", describe_eval(end_eval).c_str(), eval_name.c_str());
  if (steps_run > 0) {
    std::printf("training  %llu steps in %s (%.1f ms/step, %.0f tokens/s), batch loss %.4f -> %.4f (mean of first/last %zu steps)",
                static_cast<unsigned long long>(steps_run), format_duration(train_seconds).c_str(),
                1000.0 * train_seconds / static_cast<double>(steps_run), static_cast<double>(tokens_total) / train_seconds,
                first_count ? first_losses / static_cast<double>(first_count) : std::nan(""),
                recent.empty() ? std::nan("") : last_losses / static_cast<double>(recent.size()), recent.size());
    if (engine->state().skipped_steps) std::printf(", %llu steps skipped (non-finite loss)", static_cast<unsigned long long>(engine->state().skipped_steps));
    std::printf("\n");
  }
  if (args.has("--export") && dp.root()) {
    export_model(*args.get("--export"), config, engine->model_layout(), engine->group_reader(), tok);
    std::printf("export    %s (config.json, model.safetensors%s)\n", args.get("--export")->c_str(), tok ? ", tokenizer" : "");
  }
  json summary = {{"steps", steps_run}, {"final_step", total_steps}, {"seconds", train_seconds},
                  {"start_loss", start_eval.loss}, {"end_loss", end_eval.loss}};
  // Host memory (docs/benchmarks.md, "Host memory"): the peak resident set of the whole run, and
  // what an offloaded run's parameters rest in (the codec's host store); the first should stay
  // within ~1.1 x the second plus a few blocks.
  if (const std::optional<std::size_t> peak = host_peak_rss_bytes()) {
    const std::optional<std::size_t> at_rest = engine->host_parameter_bytes();
    std::printf("memory    host peak RSS %.2f GiB (VmHWM)", static_cast<double>(*peak) / (1u << 30));
    if (at_rest)
      std::printf(", the offload codec's host store %.2f GiB (peak / store %.2f)", static_cast<double>(*at_rest) / (1u << 30),
                  *at_rest ? static_cast<double>(*peak) / static_cast<double>(*at_rest) : 0.0);
    std::printf("\n");  // (not in the summary line: runs that compute the same compare it whole)
  }
  if (values_lost) summary["values_lost"] = values_lost;
  if (end_eval.accuracy) summary["end_accuracy"] = *end_eval.accuracy;
  std::printf("%s\n", json{{"summary", summary}}.dump().c_str());
  return 0;
}

}  // namespace zo2_opt
