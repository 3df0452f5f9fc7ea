// bench/bench_config.hpp -- zo2_bench's command line and the configurations it expands to
// (host only, no CUDA: `zo2_bench --list` runs without a GPU).
//
// A configuration is one (model, policy, codec, dtype, batch, seq, steps, warmup). Named sets:
//   reference  the protocol of docs/benchmarks.md: resident OPT-125M..13B in bf16 and fp16;
//              offloaded OPT-125M..13B with the bf16, fp16 and int8 codecs, and 1.3B..13B with
//              bf16p in three slots; OPT-30B offloaded (bf16) when the host has >= 100 GB
//              available (--min-host-gb-30b)
//   quick      a minute's sanity check: 125M and 1.3B, resident and offloaded
//   llama      the LLaMA family (models/llama): Llama-3.2-1B and Llama-3-8B resident in bf16;
//              Llama-3.2-1B, Llama-3-8B, Qwen2.5-7B, Qwen3-32B offloaded with bf16p (three
//              slots, as the reference set) and int8. An offloaded row is skipped when the
//              host's MemAvailable cannot hold its pinned blocks (host_memory_needed)
// or explicit lists: --model opt-1.3b,opt-6.7b --policy resident,offload --codec bf16,int8 ...
// A model name picks the family: "opt-..." (or a bare OPT size) is OPT, a LLaMA-family preset
// name (zo2::llama::LlamaConfig::preset_names()) is LLaMA.
#pragma once

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_util.hpp"

#include <zo2/models/llama/config.hpp>
#include <zo2/models/llama/layout.hpp>
#include <zo2/models/opt/config.hpp>
#include <zo2/models/opt/layout.hpp>

namespace zo2_bench {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct RunConfig {
  std::string model;   // an OPT preset (opt-125m ... opt-175b) or a LLaMA-family one (model_family)
  std::string policy;  // resident | offload
  std::string codec;   // offload: bf16 | bf16p | fp16 | int8 | fp32 (what rests on the host and crosses
                       // PCIe); resident: the master's storage precision (= dtype)
  std::string dtype;   // bf16 | fp16: the forward's precision (weights and activations)
  int batch = 1, seq = 2048, steps = 10, warmup = 3;
  std::size_t slots = 0;  // offload: device slots; 0: --slots (the set's bf16p rows use 3, see expand)
  std::string optimizer = "zo-sgd";  // the ZO rule (zo2::parse_method)
  int queries = 1;                   // perturbations per step
  int writeback_every = 1;  // offload: OffloadOptions::writeback_every (0: chosen by a timed trial)
};

struct Options {
  std::string set;  // "", "reference", "quick", "llama"
  std::vector<std::string> models, policies, codecs, dtypes;
  std::vector<std::string> optimizers;  // empty: zo-sgd
  std::vector<int> queries;             // empty: 1
  std::vector<int> writeback_every;     // offload: write-back every K steps (empty: 1; 0: by a timed trial)
  int batch = 1, seq = 2048;
  int steps = -1, warmup = -1;  // -1: the set's choice (10 timed steps, 3 warm-up; 2 for >= 13B)
  double deadline_s = 0;        // > 0: start no configuration that would end after this
  double min_host_gb_30b = 100; // the reference set's OPT-30B needs this much MemAvailable
  bool timeline = false;        // offload: the per-block timeline of the last timed step
  bool list = false;            // print the expanded configurations and exit (no GPU needed)
  bool extras = false;          // also: host-side update rate (the write-back argument), attention rates
  bool help = false;
  std::size_t gpu_budget = 0;   // HostOffload gpu_memory_budget in bytes (0: the minimum)
  std::size_t slots = 2, prefetch = 1;
  bool two_copies = false;  // offload: both perturbed copies at once (OffloadOptions::one_perturbed_copy = false)
  bool state_bf16 = false;  // offload: the rule state in bf16 (OffloadOptions::rule_state_bf16)
  std::string flash = "auto";  // the flash-attention kernel: auto | mma | wgmma
  int gemm_autotune = 0;       // cuBLASLt algorithms timed per GEMM shape (0: the heuristic's first)
};

inline const char* usage_text_template() {
  return R"(Usage: zo2_bench (--set NAME | --model LIST) [options]

Runs MeZO-SGD steps of OPT and LLaMA-family models (random weights, random tokens) with
zo2's CUDA engine and prints one JSON line per configuration: step time (median, p10, p90, min,
max over the timed steps, CUDA events), tokens/s, peak GPU memory (zo2's own allocations and the
device's view), host RSS, the compute floor (4 * params * tokens / bf16 GEMM rate) and the PCIe
floor (bytes crossing per step / pinned bandwidth), both measured in the same run, the ratio of
the step time to the larger floor, and the PyTorch reference (docs/benchmarks.md).

Configurations:
  --set reference      resident 125m,1.3b,6.7b,13b x bf16,fp16; offloaded 125m..13b x codecs
                       bf16,fp16,int8; offloaded 1.3b..13b bf16p in 3 slots (whatever --slots
                       says); offloaded 30b bf16 when the host has enough memory
  --set quick          125m and 1.3b, resident bf16 and offloaded bf16 (1.3b also int8)
  --set llama          resident llama-3.2-1b,llama-3-8b in bf16; offloaded llama-3.2-1b,
                       llama-3-8b,qwen2.5-7b,qwen3-32b with bf16p in 3 slots (whatever --slots
                       says) and int8; an offloaded row is skipped when MemAvailable cannot hold it
  --model LIST         OPT: opt-125m,opt-1.3b,... (the "opt-" may be left out); LLaMA family:
                       MODELS_LLAMA
  --policy LIST        resident | offload                          (default resident)
  --codec LIST         offload: bf16 | bf16p | fp16 | int8 | fp32  (default bf16; bf16p: bf16
                       values packed losslessly in ~12.6 bits, offload/packed_bf16.hpp)
  --dtype LIST         bf16 | fp16 (default: bf16; offload with the fp16 codec: fp16)
  --batch N            sequences per step                          (default 1)
  --seq N              tokens per sequence                         (default 2048)
  --steps N            timed steps, >= 1                           (default 10)
  --warmup N           untimed steps before them                   (default 3; 2 for >= 13B)
  --optimizer LIST     zo-sgd | zo-sign | zo-mmt | zo-adam | zo-cons (default zo-sgd; zo-mmt and
                       zo-adam keep per-element state, counted in the memory numbers)
  --queries LIST       perturbations per step, 1..16 (default 1); with --set, every set entry
                       runs with each

Options:
  --deadline S         start no configuration that would end more than S seconds after the
                       start (estimated); those print {"kind":"skipped"}
  --timeline           offload: print the per-block timeline of the last timed step (a table on
                       stderr and a {"kind":"timeline"} line)
  --gpu-budget GIB     offload: HostOffload gpu_memory_budget (0: the minimum, every block
                       streams; a budget below the minimum is an error naming the minimum)
  --slots N            offload: device slots (default 2)
  --prefetch N         offload: blocks uploaded ahead (default 1)
  --two-copies         offload: keep theta+ez and theta-ez at once (default: one copy, more memory saved)
  --state-bf16         offload: keep zo-mmt's / zo-adam's state in bf16 (half its PCIe bytes; default fp32)
  --writeback-every LIST
                       offload: write a streamed block back to host memory every K steps (1..64;
                       0: chosen as zo2-opt chooses it, by timing steps at K = 1, 2, 4, 8 after
                       the warm-up (at most 27 steps; the line's writeback_trial); default 1); every
                       offloaded configuration runs with each K. The results are K = 1's
                       bit for bit; the host copy's lag is replayed on the GPU after each upload
  --flash KERNEL       the flash-attention kernel: auto (wgmma on Hopper in a build for sm_90a,
                       else mma.sync), mma, wgmma                  (default auto)
  --gemm-autotune N    time up to N cuBLASLt algorithms per GEMM shape at its first run and keep
                       the fastest, in the model and in the GEMM-rate measurement (default 0:
                       the heuristic's first choice; OPTCudaOptions::gemm_autotune says why)
  --min-host-gb-30b G  the reference set runs OPT-30B offloaded when MemAvailable >= G GB
                       (default 100)
  --extras             also measure the host-side update rate (the alternative to write-back) and
                       flash vs materialized attention at OPT shapes
  --list               print the configurations ({"kind":"planned"}) and exit; needs no GPU
  --help               this text

Output lines (stdout): {"kind":"env"} once (device, GEMM rate, pinned bandwidth), then one
{"kind":"config"} per configuration, {"kind":"skipped"} or {"kind":"error"} where one did not run.
Exit status: 0 when every configuration ran, 1 when one failed, 2 for a usage error, 3 without a
CUDA device.
)";
}

inline std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ",") + n;
  return out;
}

/// The usage text, with the LLaMA-family presets the library knows filled in.
inline std::string usage_text() {
  std::string text = usage_text_template();
  const std::string key = "MODELS_LLAMA";
  text.replace(text.find(key), key.size(), join(zo2::llama::LlamaConfig::preset_names()));
  return text;
}

/// Which model type a configuration runs: OPT (opt::OPTCudaModel) or the LLaMA family
/// (llama::LlamaCudaModel).
enum class ModelFamily { kOpt, kLlama };

inline bool is_llama_preset(const std::string& name) {
  for (const std::string& p : zo2::llama::LlamaConfig::preset_names())
    if (p == name) return true;
  return false;
}

/// The family of a canonical model name (canonical_model's result).
inline ModelFamily model_family(const std::string& model) {
  return is_llama_preset(model) ? ModelFamily::kLlama : ModelFamily::kOpt;
}

/// "1.3b" or "opt-1.3b" -> "opt-1.3b", "Llama-3-8B" -> "llama-3-8b", checked against the OPT and
/// LLaMA-family presets.
inline std::string canonical_model(std::string name) {
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (is_llama_preset(name)) return name;
  const std::string typed = name;
  if (name.rfind("opt-", 0) != 0) name = "opt-" + name;
  for (const std::string& p : zo2::opt::OPTConfig::preset_names())
    if (p == name) return name;
  // A bare size ("1.4b") is reported as the OPT name it was read as, anything else as typed.
  if (!typed.empty() && !std::isdigit(static_cast<unsigned char>(typed[0]))) name = typed;
  std::string valid;
  for (const std::string& p : zo2::opt::OPTConfig::preset_names()) valid += (valid.empty() ? "" : ", ") + p;
  for (const std::string& p : zo2::llama::LlamaConfig::preset_names()) valid += ", " + p;
  throw UsageError("unknown model '" + name + "'; valid: " + valid);
}

/// Parameters as transformers counts them (a tied LM head once), in the model family's layout:
/// what the compute floor multiplies.
inline std::size_t model_params(const std::string& model) {
  if (model_family(model) == ModelFamily::kLlama)
    return zo2::llama::parameter_count(zo2::llama::LlamaConfig::preset(model));
  return zo2::opt::parameter_count(zo2::opt::OPTConfig::preset(model));
}

inline int parse_int(const std::string& key, const std::string& v, int min) {
  char* end = nullptr;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < min || x > 1'000'000)
    throw UsageError(key + " wants an integer >= " + std::to_string(min) + ", got '" + v + "'");
  return static_cast<int>(x);
}

inline double parse_double(const std::string& key, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x >= 0)) throw UsageError(key + " wants a number >= 0, got '" + v + "'");
  return x;
}

inline std::vector<std::string> parse_list(const std::string& key, const std::string& v,
                                           const std::vector<std::string>& allowed) {
  std::vector<std::string> out = split(v);
  if (out.empty()) throw UsageError(key + " wants a comma-separated list, got '" + v + "'");
  for (const std::string& x : out) {
    bool ok = allowed.empty();
    for (const std::string& a : allowed) ok = ok || a == x;
    if (!ok) {
      std::string valid;
      for (const std::string& a : allowed) valid += (valid.empty() ? "" : ", ") + a;
      throw UsageError(key + ": unknown value '" + x + "'; valid: " + valid);
    }
  }
  return out;
}

/// Parses argv (`--key value` or `--key=value`). Throws UsageError with a message naming the
/// option at fault.
inline Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i], value;
    bool has_value = false;
    if (const auto eq = key.find('='); key.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = key.substr(eq + 1), key = key.substr(0, eq), has_value = true;
    }
    const auto flag = [&] {
      if (has_value) throw UsageError(key + " takes no value");
    };
    const auto next = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) throw UsageError(key + " needs a value");
      return argv[++i];
    };
    if (key == "--help" || key == "-h") flag(), o.help = true;
    else if (key == "--list") flag(), o.list = true;
    else if (key == "--timeline") flag(), o.timeline = true;
    else if (key == "--extras") flag(), o.extras = true;
    else if (key == "--set") {
      o.set = next();
      if (o.set != "reference" && o.set != "quick" && o.set != "llama")
        throw UsageError("--set: unknown set '" + o.set + "'; valid: reference, quick, llama");
    } else if (key == "--model" || key == "--models") {
      o.models.clear();
      for (const std::string& m : parse_list(key, next(), {})) o.models.push_back(canonical_model(m));
    } else if (key == "--policy" || key == "--policies") o.policies = parse_list(key, next(), {"resident", "offload"});
    else if (key == "--codec" || key == "--codecs") o.codecs = parse_list(key, next(), {"bf16", "bf16p", "fp16", "int8", "fp32"});
    else if (key == "--dtype" || key == "--dtypes") o.dtypes = parse_list(key, next(), {"bf16", "fp16"});
    else if (key == "--optimizer" || key == "--optimizers")
      o.optimizers = parse_list(key, next(), {"zo-sgd", "zo-sign", "zo-mmt", "zo-adam", "zo-cons"});
    else if (key == "--queries") {
      o.queries.clear();
      for (const std::string& q : split(next())) {
        const int n = parse_int(key, q, 1);
        if (n > 16) throw UsageError("--queries: at most 16, got " + q);
        o.queries.push_back(n);
      }
    }
    else if (key == "--batch") o.batch = parse_int(key, next(), 1);
    else if (key == "--seq") o.seq = parse_int(key, next(), 2);
    else if (key == "--steps") o.steps = parse_int(key, next(), 1);
    else if (key == "--warmup") o.warmup = parse_int(key, next(), 0);
    else if (key == "--deadline") o.deadline_s = parse_double(key, next());
    else if (key == "--min-host-gb-30b") o.min_host_gb_30b = parse_double(key, next());
    else if (key == "--gpu-budget") o.gpu_budget = static_cast<std::size_t>(parse_double(key, next()) * (1ull << 30));
    else if (key == "--slots") o.slots = static_cast<std::size_t>(parse_int(key, next(), 2));
    else if (key == "--prefetch") o.prefetch = static_cast<std::size_t>(parse_int(key, next(), 1));
    else if (key == "--two-copies") flag(), o.two_copies = true;
    else if (key == "--state-bf16") flag(), o.state_bf16 = true;
    else if (key == "--writeback-every") {
      o.writeback_every.clear();
      for (const std::string& k : split(next())) {
        const int n = parse_int(key, k, 0);
        if (n > 64) throw UsageError("--writeback-every: at most 64, got " + k);
        o.writeback_every.push_back(n);
      }
      if (o.writeback_every.empty()) throw UsageError("--writeback-every wants a comma-separated list of K");
    }
    else if (key == "--gemm-autotune") o.gemm_autotune = parse_int(key, next(), 0);
    else if (key == "--flash") {
      const auto kernel = parse_list(key, next(), {"auto", "mma", "wgmma"});
      if (kernel.size() != 1) throw UsageError("--flash takes one of auto, mma, wgmma");
      o.flash = kernel[0];
    }
    else throw UsageError("unknown option '" + key + "' (--help lists them)");
  }
  if (o.help) return o;
  if (o.set.empty() && o.models.empty()) throw UsageError("name a set (--set reference|quick|llama) or models (--model ...)");
  if (!o.set.empty() && !o.models.empty()) throw UsageError("--set and --model exclude each other");
  if (!o.set.empty() && (!o.policies.empty() || !o.codecs.empty() || !o.dtypes.empty()))
    throw UsageError("--policy/--codec/--dtype choose configurations: use them with --model, not --set");
  if (o.prefetch > o.slots - 1) throw UsageError("--prefetch must be at most --slots - 1");
  for (const std::string& m : o.optimizers)
    for (int q : o.queries)
      if (m == "zo-cons" && q != 1) throw UsageError("--queries: zo-cons takes one query per step");
  return o;
}

struct Skipped {
  RunConfig config;
  std::string why;
};

struct Plan {
  std::vector<RunConfig> configs;
  std::vector<Skipped> skipped;  // decided before running (host memory)
};

/// The offloaded forward's dtype for a codec when none is asked for: the codec's own 16-bit
/// type, bf16 otherwise.
inline std::string default_dtype_for_codec(const std::string& codec) { return codec == "fp16" ? "fp16" : "bf16"; }

/// Bytes per parameter of what an offloaded step moves each way (the codec), or the master's.
inline double codec_bytes_per_param(const std::string& codec) {
  if (codec == "fp32") return 4;
  if (codec == "int8") return 1.0;  // plus a float scale per row: negligible
  if (codec == "bf16p") return 12.57 / 8;  // packed bf16 with its escape room
  return 2;
}

/// Host memory an offloaded configuration needs, roughly (an upper bound): every parameter in
/// the codec's format (the pinned blocks are most of them), and 8 GB for what setup draws and
/// encodes one group at a time (Qwen3-32B's embedding: 3.1 GB of fp32 values and its encoding)
/// and the process itself.
inline double host_memory_needed(const std::string& model, const std::string& codec) {
  return static_cast<double>(model_params(model)) * codec_bytes_per_param(codec) + 8e9;
}

/// Expands the options into configurations. `host_available` (bytes, MemAvailable) decides
/// whether the reference set includes OPT-30B and the llama set Qwen3-32B.
inline Plan expand(const Options& o, long long host_available) {
  Plan plan;
  const auto add = [&](const std::string& model, const std::string& policy, const std::string& codec,
                       const std::string& dtype, std::size_t slots = 0) {
    RunConfig c;
    c.model = model, c.policy = policy, c.codec = codec, c.dtype = dtype, c.slots = slots;
    c.batch = o.batch, c.seq = o.seq;
    const bool big = model_params(model) > 10'000'000'000ull;
    c.steps = o.steps > 0 ? o.steps : 10;
    c.warmup = o.warmup >= 0 ? o.warmup : big ? 2 : 3;
    plan.configs.push_back(c);
  };
  if (o.set == "reference") {
    for (const char* m : {"opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b"})
      for (const char* d : {"bf16", "fp16"}) add(m, "resident", d, d);
    for (const char* m : {"opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b"})
      for (const char* c : {"bf16", "fp16", "int8"}) add(m, "offload", c, default_dtype_for_codec(c));
    // Packed bf16 moves ~0.79x the bytes of bf16, but its pass re-encodes a block before the
    // write-back can start, and with two slots the next upload into that slot waits for the
    // write-back. A third slot decouples them: OPT-6.7B on an H200, 0.2145-0.2184 s with two
    // slots (2.16 GB), 0.205 s with three (2.47 GB, still under the reference's 2.5 GB;
    // bench/results/h200-2026-12-02-bf16p-slots-ab.jsonl).
    for (const char* m : {"opt-1.3b", "opt-6.7b", "opt-13b"}) add(m, "offload", "bf16p", "bf16", 3);
    const double need = o.min_host_gb_30b * 1e9;
    if (static_cast<double>(host_available) >= need) {
      add("opt-30b", "offload", "bf16", "bf16");
    } else {
      add("opt-30b", "offload", "bf16", "bf16");
      plan.skipped.push_back({plan.configs.back(), "host memory: MemAvailable " +
                                                       std::to_string(host_available / 1000000000) + " GB < " +
                                                       std::to_string(static_cast<long long>(o.min_host_gb_30b)) +
                                                       " GB (--min-host-gb-30b)"});
      plan.configs.pop_back();
    }
  } else if (o.set == "llama") {
    // The two that fit an 80 GB GPU with room resident, and the family offloaded (bf16p in three
    // slots, as the reference set runs it). Qwen3-32B's int8 offload fits a ~6 GB GPU: the
    // policy's minimum (budget 0) is 5.64 GB -- the embedding and the untied LM head in int8
    // (0.78 GB each), one bf16 perturbed copy of each (1.56 GB each), two slots of 0.49 GB --
    // and the model's activations at seq 2048 add ~0.5 GB. Its bf16p minimum is 7.9 GB in three
    // slots (7.1 GB in two), its bf16 minimum 8.2 GB: the two vocabulary-sized tensors' masters
    // and perturbed copies alone take 5.6 and 6.2 GB.
    for (const char* m : {"llama-3.2-1b", "llama-3-8b"}) add(m, "resident", "bf16", "bf16");
    for (const char* m : {"llama-3.2-1b", "llama-3-8b", "qwen2.5-7b", "qwen3-32b"}) {
      for (const char* codec : {"bf16p", "int8"}) {
        add(m, "offload", codec, "bf16", std::string(codec) == "bf16p" ? 3 : 0);
        const double need = host_memory_needed(m, codec);
        if (static_cast<double>(host_available) < need) {
          plan.skipped.push_back({plan.configs.back(), "host memory: MemAvailable " +
                                                           std::to_string(host_available / 1000000000) + " GB < " +
                                                           std::to_string(static_cast<long long>(need / 1e9)) +
                                                           " GB (pinned blocks and setup)"});
          plan.configs.pop_back();
        }
      }
    }
  } else if (o.set == "quick") {
    add("opt-125m", "resident", "bf16", "bf16");
    add("opt-1.3b", "resident", "bf16", "bf16");
    add("opt-125m", "offload", "bf16", "bf16");
    add("opt-1.3b", "offload", "bf16", "bf16");
    add("opt-1.3b", "offload", "int8", "bf16");
  } else {
    const std::vector<std::string> policies = o.policies.empty() ? std::vector<std::string>{"resident"} : o.policies;
    const std::vector<std::string> codecs = o.codecs.empty() ? std::vector<std::string>{"bf16"} : o.codecs;
    for (const std::string& m : o.models)
      for (const std::string& p : policies) {
        if (p == "resident") {
          for (const std::string& d : o.dtypes.empty() ? std::vector<std::string>{"bf16"} : o.dtypes) add(m, p, d, d);
        } else {
          for (const std::string& c : codecs)
            for (const std::string& d : o.dtypes.empty() ? std::vector<std::string>{default_dtype_for_codec(c)} : o.dtypes)
              add(m, p, c, d);
        }
      }
  }
  // Every configuration with each optimizer and query count.
  const std::vector<std::string> optimizers = o.optimizers.empty() ? std::vector<std::string>{"zo-sgd"} : o.optimizers;
  const std::vector<int> queries = o.queries.empty() ? std::vector<int>{1} : o.queries;
  if (optimizers.size() > 1 || queries.size() > 1 || optimizers[0] != "zo-sgd" || queries[0] != 1) {
    std::vector<RunConfig> all;
    for (const RunConfig& c : plan.configs)
      for (const std::string& m : optimizers)
        for (int q : queries) {
          RunConfig r = c;
          r.optimizer = m;
          r.queries = q;
          all.push_back(r);
        }
    plan.configs = std::move(all);
  }
  // Every offloaded configuration with each write-back interval.
  if (!o.writeback_every.empty() && !(o.writeback_every.size() == 1 && o.writeback_every[0] == 1)) {
    std::vector<RunConfig> all;
    for (const RunConfig& c : plan.configs) {
      if (c.policy != "offload") {
        all.push_back(c);
        continue;
      }
      for (int k : o.writeback_every) {
        RunConfig r = c;
        r.writeback_every = k;
        all.push_back(r);
      }
    }
    plan.configs = std::move(all);
  }
  return plan;
}

/// The reference implementation's numbers (ZO2, PyTorch; H100 80GB; fp16, batch 1, seq 2048),
/// from the design notes (ARCHITECTURE.md, "The numbers to beat"). Negative: not measured.
struct Reference {
  double mezo_gpu_s = -1;      // MeZO with the model on the GPU (the resident counterpart)
  double zo2_offload_s = -1;   // ZO2 offloaded
  double zo2_gpu_bytes = -1;   // ZO2 offloaded, torch-allocated GPU memory ("GB" read as 1e9 B)
};

inline Reference reference_for(const RunConfig& c) {
  if (c.batch != 1 || c.seq != 2048) return {};
  if (c.model == "opt-125m") return {0.040, 0.041, 0.8e9};
  if (c.model == "opt-1.3b") return {0.077, 0.118, 1.5e9};
  if (c.model == "opt-6.7b") return {0.323, 0.450, 2.5e9};
  return {};
}

/// Forward passes of the whole model per step: 2 per query (two-side), zo-cons 5.
inline double forwards_per_step(const RunConfig& c) { return c.optimizer == "zo-cons" ? 5.0 : 2.0 * c.queries; }

/// Rough seconds a configuration takes (setup + all steps), for --deadline. Rates: the measured
/// GEMM rate (TFLOP/s) and concurrent pinned bandwidth (GB/s); setup rates are from H100 runs.
inline double estimate_seconds(const RunConfig& c, double gemm_tflops, double bidir_gbps) {
  const double params = static_cast<double>(model_params(c.model));
  const double tokens = static_cast<double>(c.batch) * c.seq;
  const double compute = forwards_per_step(c) * 2.0 * params * tokens / (gemm_tflops * 1e12);
  double setup = 0, step = 0;
  if (c.policy == "resident") {
    setup = 1.5 + params * 2 / 20e9;
    step = 2.6 * compute + 0.004;
  } else {
    const double bytes = params * codec_bytes_per_param(c.codec);
    setup = 2.0 + bytes / 1.2e9;  // pin, zero and fill host memory
    step = std::max(2.6 * compute, 1.15 * bytes / (bidir_gbps * 1e9)) + 0.004;
  }
  return setup + (c.warmup + c.steps) * step + 1.0;
}

inline JsonLine& add_config_fields(JsonLine& line, const RunConfig& c) {
  line.add("model", c.model).add("policy", c.policy).add("codec", c.codec).add("dtype", c.dtype)
      .add("batch", c.batch).add("seq", c.seq).add("optimizer", c.optimizer).add("queries", c.queries);
  if (c.policy == "offload") line.add("writeback_every", c.writeback_every);  // as asked (0: from the link)
  return line;
}

/// The device slots an offloaded configuration runs with: its own, or --slots (0 for resident).
inline std::size_t planned_slots(const RunConfig& c, const Options& o) {
  return c.policy == "offload" ? (c.slots ? c.slots : o.slots) : 0;
}

}  // namespace zo2_bench
