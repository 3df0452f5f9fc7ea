// bench/cpu_opt_step.cpp -- the Eigen (CPU reference) path: forward and MeZO step of an OPT
// preset at batch 1, random tokens and weights, so CPU regressions show up as numbers.
//
//   cpu_opt_step [--preset opt-125m] [--seq 256] [--steps 3] [--help]
// Prints one JSON line: forward and step time (median), tokens/s, host RSS.
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <thread>

#include <zo2/zo2.hpp>

#include "bench_util.hpp"

int main(int argc, char** argv) {
  std::string preset = "opt-125m";
  std::size_t seq = 256, steps = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "cpu_opt_step: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--preset") preset = next();
    else if (a == "--seq") seq = std::stoul(next());
    else if (a == "--steps") steps = std::stoul(next());
    else if (a == "--help" || a == "-h") {
      std::cout << "usage: cpu_opt_step [--preset NAME] [--seq N] [--steps N]\n"
                   "Times the CPU (Eigen) OPT forward and MeZO step at batch 1 on random data and\n"
                   "prints one JSON line.\n";
      return 0;
    } else {
      std::cerr << "cpu_opt_step: unknown argument " << a << " (see --help)\n";
      return 2;
    }
  }
  try {
    const zo2::opt::OPTConfig cfg = zo2::opt::OPTConfig::preset(preset);
    zo2::opt::OPTModel<float> model(cfg);
    zo2::ParameterStore<float> store(zo2::opt::model_layout(cfg));
    std::mt19937_64 rng(1);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (std::size_t g = 0; g < store.num_groups(); ++g) {
      auto view = store.group(zo2::GroupIndex{g});
      for (std::size_t j = 0; j < view.layout().total_elements(); ++j) view.data()[j] = normal(rng);
    }
    zo2::opt::OPTModel<float>::Batch batch;
    batch.batch = 1;
    batch.seq = seq;
    std::uniform_int_distribution<int> token(3, static_cast<int>(cfg.vocab_size) - 1);
    for (std::size_t s = 0; s < seq; ++s) batch.input_ids.push_back(token(rng));
    batch.labels = batch.input_ids;

    zo2::Resident<float, float> policy(store);
    zo2::ZOConfig zc;
    zc.lr = 1e-6;
    zc.eps = 1e-3;
    zo2::ZOOptimizer opt(model, policy, zc);
    opt.step(batch);  // warm-up: workspace allocation
    std::vector<double> step_s, forward_s;
    for (std::size_t i = 0; i < steps; ++i) {
      double t0 = zo2_bench::now_seconds();
      opt.step(batch);
      step_s.push_back(zo2_bench::now_seconds() - t0);
      t0 = zo2_bench::now_seconds();
      opt.evaluate(batch);
      forward_s.push_back(zo2_bench::now_seconds() - t0);
    }
    const double step = zo2_bench::median(step_s);
    zo2_bench::JsonLine()
        .add("bench", "cpu_opt_step")
        .add("model", preset)
        .add("params", static_cast<long long>(zo2::opt::parameter_count(cfg)))
        .add("batch", 1)
        .add("seq", seq)
        .add("hardware_threads", std::thread::hardware_concurrency())
        .add("eigen_threads", Eigen::nbThreads())
        .add("timed_steps", steps)
        .add("forward_s_median", zo2_bench::median(forward_s))
        .add("step_s_median", step)
        .add("step_s_min", zo2_bench::quantile(step_s, 0.0))
        .add("step_s_max", zo2_bench::quantile(step_s, 1.0))
        .add("tokens_per_s", static_cast<double>(seq) / step)
        .add("host_rss_bytes", zo2_bench::peak_host_rss_bytes())
        .print();
  } catch (const std::exception& e) {
    std::cerr << "cpu_opt_step: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
