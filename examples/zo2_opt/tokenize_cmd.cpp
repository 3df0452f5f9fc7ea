// zo2-opt tokenize: text in (stdin or --text), token ids out as a JSON array; or back with --decode.
#include <cstdio>
#include <iostream>
#include <iterator>
#include <limits>

#include <nlohmann/json.hpp>
#include <zo2/io/json_file.hpp>

#include "cli.hpp"
#include "commands.hpp"
#include "tokenizer.hpp"

namespace zo2_opt {

namespace {
CommandSpec tokenize_spec() {
  CommandSpec s;
  s.name = "tokenize";
  s.summary = "zo2-opt tokenize: a model directory's tokenizer (tokenizer.json: LLaMA, Qwen, Mistral; else GPT-2 byte-level BPE "
              "from vocab.json + merges.txt: OPT), text to ids as JSON";
  s.usage = "zo2-opt tokenize (--tokenizer DIR | --bytes) [--text TEXT] [options]   (text from stdin without --text)";
  s.options = {
      {"--tokenizer", "DIR", "directory with tokenizer.json, or vocab.json + merges.txt (an HF model directory)", ""},
      {"--bytes", "", "the built-in byte vocabulary of the demo", ""},
      {"--text", "TEXT", "the text to encode", "stdin"},
      {"--no-bos", "", "do not add the tokenizer's special tokens (OPT's leading </s>, LLaMA's <s>; Qwen adds none)", ""},
      {"--decode", "", "the input is a JSON array of ids: print its text instead", ""},
  };
  s.epilog = "Examples:\n  echo 'Hello world' | zo2-opt tokenize --tokenizer opt-125m/\n"
              "  zo2 tokenize --tokenizer Qwen2.5-7B/ --text 'Hello world'\n";
  return s;
}
}  // namespace

int run_tokenize(const std::vector<std::string>& argv) {
  const CommandSpec spec = tokenize_spec();
  const Args args(spec, argv);
  if (args.help()) {
    std::fputs(render_help(spec).c_str(), stdout);
    return 0;
  }
  if (args.has("--tokenizer") == args.flag("--bytes")) throw UsageError("tokenize: pass exactly one of --tokenizer DIR and --bytes");
  const Tokenizer tokenizer = args.flag("--bytes") ? Tokenizer::bytes() : Tokenizer::from_directory(*args.get("--tokenizer"));
  std::string text;
  if (args.has("--text")) text = *args.get("--text");
  else text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  if (args.flag("--decode")) {
    // A flat array: deeper input is refused before parsing (a nested element's dump() in the
    // message would recurse once per level).
    if (zo2::io::json_nesting_depth(text, 1) > 1)
      throw UsageError("tokenize --decode: the input is not a flat JSON array of ids");
    nlohmann::json ids;
    try {
      ids = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      throw UsageError("tokenize --decode: the input is not a JSON array of ids");
    }
    if (!ids.is_array()) throw UsageError("tokenize --decode: the input is not a JSON array of ids");
    std::vector<std::int32_t> v;
    for (const auto& x : ids) {
      if (!x.is_number_integer()) throw UsageError("tokenize --decode: " + zo2::io::json_brief(x) + " is not an integer id");
      // Not get<int32_t>() alone: it would wrap 2^32 + 72 to 72.
      const bool in_range = x.is_number_unsigned() ? x.get<std::uint64_t>() <= std::numeric_limits<std::int32_t>::max()
                                                   : x.get<std::int64_t>() >= 0;
      if (!in_range) throw UsageError("tokenize --decode: id " + x.dump() + " is out of range (0 to 2^31 - 1)");
      v.push_back(static_cast<std::int32_t>(x.get<std::int64_t>()));
    }
    std::fputs(tokenizer.decode(v).c_str(), stdout);
    return 0;
  }
  std::printf("%s\n", nlohmann::json(tokenizer.encode(text, !args.flag("--no-bos"))).dump().c_str());
  return 0;
}

}  // namespace zo2_opt
