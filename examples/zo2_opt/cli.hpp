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

/// Parsed arguments of one subcommand.
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
  std::string command_;
  std::map<std::string, std::string> values_;
  bool help_ = false;
};

std::string render_help(const CommandSpec& spec);

/// "great,terrible" -> {"great", "terrible"} (empty pieces dropped, spaces trimmed).
std::vector<std::string> split_list(const std::string& text, char separator = ',');

}  // namespace zo2_opt
