#include "data.hpp"

#include <algorithm>
#include <fstream>
#include <optional>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>
#include <zo2/io/json_limits.hpp>

#include "fs_util.hpp"

namespace zo2_opt {

namespace fs = std::filesystem;

namespace {

std::string join(const std::vector<std::string>& items) {
  std::string s;
  for (const auto& i : items) s += (s.empty() ? "" : ", ") + i;
  return s;
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (std::size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
  return text;
}

zo2::Error line_error(const std::string& origin, const std::string& why) { return zo2::Error(origin + ": " + why); }

std::vector<std::int32_t> int_array(const nlohmann::json& value, const char* field, const std::string& origin,
                                    std::int64_t vocab_size, bool allow_ignore) {
  if (!value.is_array()) throw line_error(origin, std::string("\"") + field + "\" must be an array of integers");
  std::vector<std::int32_t> out;
  out.reserve(value.size());
  for (const auto& v : value) {
    if (!v.is_number_integer()) throw line_error(origin, std::string("\"") + field + "\" must hold integers only, got " + v.dump());
    const std::int64_t x = v.get<std::int64_t>();
    const bool ok = (x >= 0 && (vocab_size <= 0 || x < vocab_size)) || (allow_ignore && x == kIgnore);
    if (!ok)
      throw line_error(origin, std::string("\"") + field + "\" holds " + std::to_string(x) +
                                   ", outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    out.push_back(static_cast<std::int32_t>(x));
  }
  return out;
}

/// Windows of seq_len tokens, each starting with `bos` when the tokenizer has one (Qwen's has
/// none: the windows are then seq_len tokens of text).
void add_windows(Dataset& d, const std::vector<std::int32_t>& tokens, std::optional<std::int32_t> bos,
                 const DataOptions& o, const std::string& origin) {
  const std::size_t body = bos ? std::max<std::size_t>(1, o.seq_len - 1) : std::max<std::size_t>(1, o.seq_len);
  for (std::size_t start = 0; start < tokens.size(); start += body) {
    const std::size_t count = std::min(body, tokens.size() - start);
    if (count < 1 || (!bos && count < 2)) break;  // a lone token predicts nothing
    Example e;
    const std::size_t head = bos ? 1 : 0;
    e.ids.resize(head + count);
    if (bos) e.ids[0] = *bos;
    std::copy_n(tokens.begin() + static_cast<std::ptrdiff_t>(start), count, e.ids.begin() + static_cast<std::ptrdiff_t>(head));
    e.labels = e.ids;
    e.origin = origin + ":window " + std::to_string(d.examples.size() + 1);
    d.examples.push_back(std::move(e));
  }
}

const Tokenizer& need_tokenizer(const Tokenizer* t, const std::string& origin) {
  if (!t)
    throw line_error(origin, "text needs a tokenizer: the model directory has no tokenizer.json or vocab.json/merges.txt (pass --tokenizer DIR, or use pre-tokenized {\"input_ids\": [...]} data)");
  return *t;
}

}  // namespace

std::vector<std::int32_t> prompt_ids(const Tokenizer& tokenizer, const std::string& template_text,
                                     const std::string& prompt) {
  return tokenizer.encode(replace_all(template_text, "{prompt}", prompt), /*add_special=*/true);
}

Dataset text_windows(std::string_view text, const std::string& source, const Tokenizer& tokenizer,
                     const DataOptions& options) {
  Dataset d;
  d.source = source;
  add_windows(d, tokenizer.encode(text, false), tokenizer.bos_id(), options, source);
  if (d.examples.empty()) throw zo2::FileError(source, "holds no text");
  return d;
}

Dataset load_dataset(const fs::path& path, bool plain_text, const Tokenizer* tokenizer, const DataOptions& o) {
  const std::string file = path.string();
  const std::string ext = path.extension().string();
  if (plain_text || (ext != ".jsonl" && ext != ".json")) {
    const std::string text = read_file(path);
    return text_windows(text, file, need_tokenizer(tokenizer, file), o);
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw zo2::FileError(file, fs::exists(path) ? "cannot open" : "no such file");
  Dataset d;
  d.source = file;
  bool kind_known = false;
  std::string line;
  for (std::size_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string origin = file + ":" + std::to_string(number);
    if (zo2::io::json_nesting_depth(line) > zo2::io::kMaxJsonDepth) throw line_error(origin, zo2::io::json_depth_message());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      std::string why = e.what();
      if (const auto at = why.find("parse error"); at != std::string::npos) why = why.substr(at);
      throw line_error(origin, "not valid JSON (" + why + ")");
    }
    if (!j.is_object()) throw line_error(origin, "expected a JSON object, got " + std::string(j.type_name()));
    Example e;
    e.origin = origin;
    TaskKind kind = TaskKind::language_model;
    if (j.contains("input_ids")) {
      e.ids = int_array(j["input_ids"], "input_ids", origin, o.vocab_size, false);
      if (e.ids.empty()) throw line_error(origin, "\"input_ids\" is empty");
      if (static_cast<std::int64_t>(e.ids.size()) > o.max_positions)
        throw line_error(origin, "sequence of " + std::to_string(e.ids.size()) +
                                     " tokens is longer than max_position_embeddings = " + std::to_string(o.max_positions));
      if (j.contains("labels")) {
        e.labels = int_array(j["labels"], "labels", origin, o.vocab_size, true);
        if (e.labels.size() != e.ids.size())
          throw line_error(origin, "\"labels\" has " + std::to_string(e.labels.size()) + " entries, \"input_ids\" has " +
                                       std::to_string(e.ids.size()));
      } else {
        e.labels = e.ids;
      }
    } else if (j.contains("prompt") || j.contains("label")) {
      kind = TaskKind::classification;
      if (!j.contains("prompt") || !j["prompt"].is_string()) throw line_error(origin, "\"prompt\" must be a string");
      if (!j.contains("label")) throw line_error(origin, "a classification example needs a \"label\"");
      if (o.candidates.empty())
        throw line_error(origin, "classification examples need --candidates (e.g. --candidates \"great,terrible\")");
      const auto& label = j["label"];
      int index = -1;
      if (label.is_string()) {
        const auto it = std::find(o.candidates.begin(), o.candidates.end(), label.get<std::string>());
        if (it == o.candidates.end())
          throw line_error(origin, "label '" + label.get<std::string>() + "' is not among the candidates (" + join(o.candidates) + ")");
        index = static_cast<int>(it - o.candidates.begin());
      } else if (label.is_number_integer()) {
        const auto x = label.get<std::int64_t>();
        if (x < 0 || x >= static_cast<std::int64_t>(o.candidates.size()))
          throw line_error(origin, "label " + std::to_string(x) + " is not among the candidates (" + join(o.candidates) +
                                       "; an integer label is a 0-based index)");
        index = static_cast<int>(x);
      } else {
        throw line_error(origin, "\"label\" must be a string or an integer index, got " + label.dump());
      }
      const Tokenizer& tok = need_tokenizer(tokenizer, origin);
      if (d.candidate_ids.empty())
        for (const auto& c : o.candidates) {
          d.candidate_ids.push_back(tok.encode(" " + c, false));
          if (d.candidate_ids.back().empty()) throw zo2::Error("--candidates: candidate '" + c + "' encodes to no tokens");
        }
      std::vector<std::int32_t> prompt = prompt_ids(tok, o.template_text, j["prompt"].get<std::string>());
      const auto& cand = d.candidate_ids[static_cast<std::size_t>(index)];
      if (cand.size() + 2 > o.seq_len)
        throw line_error(origin, "candidate '" + o.candidates[static_cast<std::size_t>(index)] + "' does not fit in --seq-len " +
                                     std::to_string(o.seq_len));
      if (prompt.size() + cand.size() > o.seq_len) {  // keep the bos (OPT's </s>) and the end of the prompt
        const std::size_t head = tok.bos_id() && !prompt.empty() && prompt[0] == *tok.bos_id() ? 1 : 0;
        const std::size_t keep = o.seq_len - cand.size() - head;
        prompt.erase(prompt.begin() + static_cast<std::ptrdiff_t>(head), prompt.end() - static_cast<std::ptrdiff_t>(keep));
        ++d.truncated;
      }
      e.ids = prompt;
      e.ids.insert(e.ids.end(), cand.begin(), cand.end());
      e.labels.assign(prompt.size(), kIgnore);
      e.labels.insert(e.labels.end(), cand.begin(), cand.end());
      e.label_index = index;
      e.prompt_length = prompt.size();
    } else if (j.contains("text")) {
      if (!j["text"].is_string()) throw line_error(origin, "\"text\" must be a string");
      const Tokenizer& tok = need_tokenizer(tokenizer, origin);
      e.ids = tok.encode(j["text"].get<std::string>(), true);
      e.labels = e.ids;
    } else {
      throw line_error(origin, "expected \"text\", \"prompt\"+\"label\" or \"input_ids\" in the object");
    }
    if (kind_known && kind != d.kind) throw line_error(origin, "mixes classification and language-modelling examples");
    d.kind = kind;
    kind_known = true;
    if (e.ids.size() > o.seq_len) {
      e.ids.resize(o.seq_len);
      e.labels.resize(o.seq_len);
      ++d.truncated;
    }
    d.examples.push_back(std::move(e));
  }
  if (d.examples.empty()) throw zo2::FileError(file, "holds no examples");
  if (d.kind == TaskKind::classification) d.candidates = o.candidates;
  return d;
}

std::size_t TokenBatch::real_tokens() const {
  return static_cast<std::size_t>(std::count(attention_mask.begin(), attention_mask.end(), 1));
}

std::size_t TokenBatch::target_tokens() const {
  std::size_t n = 0;
  for (std::size_t b = 0; b < batch; ++b)
    for (std::size_t s = 1; s < seq; ++s) n += labels[b * seq + s] != kIgnore;
  return n;
}

TokenBatch make_batch(const Dataset& data, std::span<const std::size_t> indices, std::int32_t pad_id) {
  TokenBatch b;
  b.batch = indices.size();
  for (const std::size_t i : indices) b.seq = std::max(b.seq, data.examples.at(i).ids.size());
  const std::size_t total = b.batch * b.seq;
  b.input_ids.assign(total, pad_id);
  b.attention_mask.assign(total, 0);
  b.labels.assign(total, kIgnore);
  for (std::size_t r = 0; r < indices.size(); ++r) {
    const Example& e = data.examples[indices[r]];
    std::copy(e.ids.begin(), e.ids.end(), b.input_ids.begin() + r * b.seq);
    std::fill_n(b.attention_mask.begin() + r * b.seq, e.ids.size(), 1);
    std::copy(e.labels.begin(), e.labels.end(), b.labels.begin() + r * b.seq);
  }
  return b;
}

BatchSchedule::BatchSchedule(std::size_t num_examples, std::size_t batch_size, std::uint64_t seed)
    : n_(num_examples), batch_(batch_size), seed_(seed) {
  if (n_ == 0) throw zo2::Error("the dataset is empty");
  if (batch_ == 0) throw zo2::ConfigError("batch", "must be > 0");
}

namespace {
std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

const std::vector<std::size_t>& BatchSchedule::permutation(std::uint64_t epoch) const {
  auto it = cache_.find(epoch);
  if (it != cache_.end()) return it->second;
  if (cache_.size() > 4) cache_.clear();
  std::vector<std::size_t> p(n_);
  for (std::size_t i = 0; i < n_; ++i) p[i] = i;
  // Fisher-Yates with our own generator: the same order on every platform and library.
  std::uint64_t state = seed_ * 0x2545f4914f6cdd1dull + epoch + 0x5851f42d4c957f2dull;
  for (std::size_t i = n_; i > 1; --i) {
    const std::size_t j = static_cast<std::size_t>(splitmix64(state) % i);
    std::swap(p[i - 1], p[j]);
  }
  return cache_.emplace(epoch, std::move(p)).first->second;
}

std::vector<std::size_t> BatchSchedule::indices(std::uint64_t step) const {
  std::vector<std::size_t> out;
  out.reserve(batch_);
  for (std::size_t i = 0; i < batch_; ++i) {
    const std::uint64_t position = step * batch_ + i;
    out.push_back(permutation(position / n_)[position % n_]);
  }
  return out;
}

}  // namespace zo2_opt
