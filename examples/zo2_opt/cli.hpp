// zo2-opt: command-line parsing. Each subcommand declares its options in a table; the parser
// rejects unknown flags, missing values and malformed numbers with a one-line message that
// names the flag, and renders the same table as --help.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace zo2_opt {

/// A user error: printed as "zo2-opt: <message>" on one line, exit status 2 or 1.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct OptionSpec {
  std::string name;     // "--lr"
  std::string metavar;  // "X"; empty: a switch that takes no value
  std::string help;
  std::string default_text;  // shown in --help, not applied by the parser
};

struct CommandSpec {
  std::string name;     // "train"
  std::string summary;  // one line
  std::string usage;    // "zo2-opt train [options]"
  std::vector<OptionSpec> options;
  std::string epilog;   // examples, shown after the options
};

/// Largest --batch (and state.json's train.batch): far beyond what a step can use, small
/// enough that a batch's token buffers never ask for absurd memory.
inline constexpr std::uint64_t kMaxBatch = std::uint64_t{1} << 16;
/// Largest --gpu-memory-budget, in GiB (64 TiB: more than any device holds).
inline constexpr double kMaxGpuMemoryBudgetGib = 65536.0;

/// The range the parser enforces on a flag's value, in whichever subcommand declares it.
struct FlagRange {
  const char* name;
  double min, max;
};
inline constexpr FlagRange kFlagRanges[] = {
    {"--batch", 1, static_cast<double>(kMaxBatch)},
    {"--gpu-memory-budget", 0, kMaxGpuMemoryBudgetGib},
};

/// Parsed arguments of one subcommand. number(), integer() and unsigned_integer() reject a
/// malformed value, and one outside the flag's kFlagRanges entry, naming the flag.
class Args {
 public:
  Args(const CommandSpec& spec, const std::vector<std::string>& argv);

  bool help() const { return help_; }
  bool has(const std::string& name) const { return values_.count(name) != 0; }
  bool flag(const std::string& name) const { return has(name); }
  std::optional<std::string> get(const std::string& name) const;
  std::string str(const std::string& name, const std::string& fallback) const;
  double number(const std::string& name, double fallback) const;
  std::int64_t integer(const std::string& name, std::int64_t fallback) const;
  std::uint64_t unsigned_integer(const std::string& name, std::uint64_t fallback) const;
  const std::string& command() const { return command_; }

 private:
  /// Throws UsageError naming the flag when `value` is outside its kFlagRanges entry.
  void check_range(const std::string& name, double value, const std::string& text) const;

  std::string command_;
  std::map<std::string, std::string> values_;
  bool help_ = false;
};

/// The name the program was invoked by ("zo2", or its alias "zo2-opt"), for usage lines and
/// messages; "zo2-opt" until main() sets it.
const std::string& program_name();
void set_program_name(std::string name);

/// The spec's table as --help prints it, "zo2-opt" in its texts replaced by program_name().
std::string render_help(const CommandSpec& spec);

/// "great,terrible" -> {"great", "terrible"} (empty pieces dropped, spaces trimmed).
std::vector<std::string> split_list(const std::string& text, char separator = ',');

}  // namespace zo2_opt
