#include "cli.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <utility>

namespace zo2_opt {

namespace {
std::string& program_name_storage() {
  static std::string name = "zo2-opt";
  return name;
}
}  // namespace

const std::string& program_name() { return program_name_storage(); }
void set_program_name(std::string name) { program_name_storage() = std::move(name); }

Args::Args(const CommandSpec& spec, const std::vector<std::string>& argv) : command_(spec.name) {
  for (std::size_t i = 0; i < argv.size(); ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_ = true;
      continue;
    }
    std::optional<std::string> inline_value;
    if (arg.size() > 2 && arg.compare(0, 2, "--") == 0) {
      const auto eq = arg.find('=');
      if (eq != std::string::npos) {
        inline_value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
      }
    } else {
      throw UsageError(spec.name + ": unexpected argument '" + arg + "' (see " + program_name() + " " + spec.name + " --help)");
    }
    const OptionSpec* found = nullptr;
    for (const OptionSpec& o : spec.options)
      if (o.name == arg) found = &o;
    if (!found) throw UsageError(spec.name + ": unknown option '" + arg + "' (see " + program_name() + " " + spec.name + " --help)");
    if (found->metavar.empty()) {
      if (inline_value) throw UsageError(spec.name + ": option '" + arg + "' takes no value");
      values_[arg] = std::string(1, '1');
    } else if (inline_value) {
      values_[arg] = *inline_value;
    } else {
      if (i + 1 >= argv.size()) throw UsageError(spec.name + ": option '" + arg + "' needs a value (" + found->metavar + ")");
      values_[arg] = argv[++i];
    }
  }
}

std::optional<std::string> Args::get(const std::string& name) const {
  const auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::string Args::str(const std::string& name, const std::string& fallback) const {
  return get(name).value_or(fallback);
}

void Args::check_range(const std::string& name, double value, const std::string& text) const {
  for (const FlagRange& r : kFlagRanges) {
    if (name != r.name) continue;
    if (!(value >= r.min && value <= r.max)) {
      std::ostringstream os;
      os << command_ << ": " << name << " must be between " << r.min << " and " << r.max << ", got '" << text << "'";
      throw UsageError(os.str());
    }
  }
}

double Args::number(const std::string& name, double fallback) const {
  const auto v = get(name);
  if (!v) return fallback;
  char* end = nullptr;
  errno = 0;
  const double x = std::strtod(v->c_str(), &end);
  if (v->empty() || *end != '\0' || errno != 0 || !std::isfinite(x))
    throw UsageError(command_ + ": " + name + " expects a number, got '" + *v + "'");
  check_range(name, x, *v);
  return x;
}

std::int64_t Args::integer(const std::string& name, std::int64_t fallback) const {
  const auto v = get(name);
  if (!v) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v->c_str(), &end, 10);
  if (v->empty() || *end != '\0' || errno != 0)
    throw UsageError(command_ + ": " + name + " expects an integer, got '" + *v + "'");
  check_range(name, static_cast<double>(x), *v);
  return x;
}

std::uint64_t Args::unsigned_integer(const std::string& name, std::uint64_t fallback) const {
  const auto v = get(name);
  if (!v) return fallback;
  char* end = nullptr;
  errno = 0;
  const unsigned long long x = std::strtoull(v->c_str(), &end, 10);
  if (v->empty() || (*v)[0] == '-' || *end != '\0' || errno != 0)
    throw UsageError(command_ + ": " + name + " expects a non-negative integer, got '" + *v + "'");
  check_range(name, static_cast<double>(x), *v);
  return x;
}

std::string render_help(const CommandSpec& spec) {
  std::ostringstream os;
  os << spec.summary << "\n\nUsage: " << spec.usage << "\n\nOptions:\n";
  std::size_t width = 0;
  auto left = [](const OptionSpec& o) { return o.name + (o.metavar.empty() ? "" : " " + o.metavar); };
  for (const OptionSpec& o : spec.options) width = std::max(width, left(o).size());
  width = std::max<std::size_t>(width, 10);
  for (const OptionSpec& o : spec.options) {
    const std::string l = left(o);
    os << "  " << l << std::string(width - l.size() + 2, ' ') << o.help;
    if (!o.default_text.empty()) os << " [default: " << o.default_text << "]";
    os << "\n";
  }
  os << "  --help" << std::string(width - 6 + 2, ' ') << "show this help\n";
  if (!spec.epilog.empty()) os << "\n" << spec.epilog;
  std::string text = os.str();
  if (program_name() != "zo2-opt") {
    const std::string from = "zo2-opt ", to = program_name() + " ";
    for (std::size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
      text.replace(at, from.size(), to);
  }
  return text;
}

std::vector<std::string> split_list(const std::string& text, char separator) {
  std::vector<std::string> out;
  std::string piece;
  std::istringstream in(text);
  while (std::getline(in, piece, separator)) {
    const auto b = piece.find_first_not_of(" \t");
    const auto e = piece.find_last_not_of(" \t");
    if (b == std::string::npos) continue;
    out.push_back(piece.substr(b, e - b + 1));
  }
  return out;
}

}  // namespace zo2_opt
