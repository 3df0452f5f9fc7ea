// zo2-compare-runs: compares two zo2-opt runs for the data-parallel tests (tests/mpi/dp_tests.sh).
//   zo2-compare-runs logs A.jsonl B.jsonl REL [N REL_N]
//                                                    every step's loss_plus and loss_minus agree to REL
//                                                    relative (same steps, same skipped flags), the
//                                                    first N steps to REL_N
//   zo2-compare-runs weights A.safetensors B.safetensors ABS
//                                                    same tensors and shapes, max |a - b| <= ABS
// Prints the largest difference found; exits 1 (with the step or tensor) when over the bound.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/io/safetensors.hpp>

namespace {

std::vector<nlohmann::json> read_log(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

int compare_logs(const std::string& a_path, const std::string& b_path, double rel, std::size_t first_n, double first_rel) {
  const auto a = read_log(a_path), b = read_log(b_path);
  if (a.size() != b.size() || a.empty()) {
    std::fprintf(stderr, "logs differ in length: %zu vs %zu steps\n", a.size(), b.size());
    return 1;
  }
  double worst = 0, worst_first = 0;
  std::size_t worst_step = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i]["step"] != b[i]["step"] || a[i].value("skipped", false) != b[i].value("skipped", false)) {
      std::fprintf(stderr, "line %zu: steps or skipped flags differ\n", i);
      return 1;
    }
    for (const char* key : {"loss_plus", "loss_minus"}) {
      const double x = a[i][key].get<double>(), y = b[i][key].get<double>();
      const double d = std::abs(x - y) / std::max(std::abs(x), 1e-300);
      if (i < first_n && !(d <= worst_first)) worst_first = d;
      if (!(d <= worst)) {
        worst = d;
        worst_step = a[i]["step"].get<std::size_t>();
      }
    }
  }
  std::printf("logs: %zu steps, largest relative difference of a loss %.3g (step %zu), bound %.3g", a.size(), worst,
              worst_step, rel);
  if (first_n) std::printf("; first %zu steps %.3g, bound %.3g", first_n, worst_first, first_rel);
  std::printf("\n");
  return worst <= rel && worst_first <= first_rel ? 0 : 1;
}

int compare_weights(const std::string& a_path, const std::string& b_path, double abs_bound) {
  const auto a = zo2::io::SafetensorsFile::open(a_path);
  const auto b = zo2::io::SafetensorsFile::open(b_path);
  if (a.names() != b.names()) {
    std::fprintf(stderr, "the files hold different tensors\n");
    return 1;
  }
  double worst = 0;
  std::string worst_name;
  std::size_t count = 0;
  for (const std::string& name : a.names()) {
    if (a.entry(name).shape != b.entry(name).shape) {
      std::fprintf(stderr, "%s: shapes differ\n", name.c_str());
      return 1;
    }
    const std::vector<float> x = a.read_as_float(name), y = b.read_as_float(name);
    count += x.size();
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double d = std::abs(static_cast<double>(x[i]) - static_cast<double>(y[i]));
      if (!(d <= worst)) {
        worst = d;
        worst_name = name;
      }
    }
  }
  std::printf("weights: %zu values in %zu tensors, max |difference| %.3g (%s), bound %.3g\n", count, a.names().size(),
              worst, worst_name.c_str(), abs_bound);
  return worst <= abs_bound ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 && !(argc == 7 && std::string(argv[1]) == "logs")) {
    std::fprintf(stderr, "usage: zo2-compare-runs logs A.jsonl B.jsonl REL [N REL_N] | weights A.safetensors B.safetensors ABS\n");
    return 2;
  }
  try {
    const std::string what = argv[1];
    const double bound = std::stod(argv[4]);
    if (what == "logs")
      return compare_logs(argv[2], argv[3], bound, argc == 7 ? std::stoul(argv[5]) : 0, argc == 7 ? std::stod(argv[6]) : 0);
    if (what == "weights") return compare_weights(argv[2], argv[3], bound);
    std::fprintf(stderr, "unknown comparison '%s'\n", what.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "zo2-compare-runs: %s\n", e.what());
    return 1;
  }
}
