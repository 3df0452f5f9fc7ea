// zo2/io/bpe_tokenizer.hpp -- GPT-2 byte-level BPE (vocab.json + merges.txt), giving the same
// ids as Hugging Face's GPT2Tokenizer / `tokenizers` ByteLevel BPE with add_prefix_space=False.
//
// Encoding is three steps, each as GPT-2 defines it:
//  1. split the text with the GPT-2 regex
//       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//     (written out by hand over code points: std::regex knows no \p{L});
//  2. map each byte of a piece to a printable code point (the byte-to-unicode table), so the
//     vocabulary is made of strings yet covers every byte sequence;
//  3. merge adjacent symbols, lowest merge rank first, until no listed pair remains.
// Special tokens (OPT's <s>, <pad>, </s>, <unk>) found in the text are emitted as single ids,
// as the Hugging Face tokenizers do, and OPT's bos `</s>` can be prepended.
#pragma once

#include <zo2/core/error.hpp>
#include <zo2/io/json_limits.hpp>
#include <zo2/io/unicode.hpp>

#include <nlohmann/json.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace zo2::io {

namespace bpe_detail {

/// GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 bytes
/// (controls, space, NBSP, soft hyphen) to U+0100 onwards, in byte order.
inline const std::array<char32_t, 256>& byte_to_code_point() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> map{};
    char32_t next_unprintable = 256;
    for (unsigned b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      map[b] = printable ? b : next_unprintable++;
    }
    return map;
  }();
  return table;
}

inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path.string(), "cannot open");
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) throw FileError(path.string(), "read failed");
  return content.str();
}

/// The leftmost special token at or after a position, for positions that only move forward
/// (one encode() call). Each token's next occurrence is remembered and searched for again only
/// once the position has passed it, so the text is scanned about once per special token, not
/// once per special token per match (quadratic in a text full of "</s>").
class SpecialScanner {
 public:
  struct Match {
    std::size_t offset;  // text.size() when none
    std::int32_t id;     // -1 when none
    std::size_t length;  // 0 when none
  };

  SpecialScanner(std::string_view text, const std::vector<std::pair<std::string, std::int32_t>>& specials)
      : text_(text), specials_(&specials), next_(specials.size(), kUnknown) {}

  /// The leftmost match at or after `from` (the longest where several start there); `from`
  /// must not be less than in the previous call.
  Match next(std::size_t from) {
    Match best{text_.size(), -1, 0};
    for (std::size_t i = 0; i < specials_->size(); ++i) {
      const auto& [token, id] = (*specials_)[i];
      if (next_[i] == kUnknown || next_[i] < from) {
        const std::size_t at = text_.find(token, from);
        next_[i] = at == std::string_view::npos ? text_.size() : at;
        scanned_ += next_[i] - from;
      }
      const std::size_t at = next_[i];
      if (at == text_.size()) continue;
      if (at < best.offset || (at == best.offset && token.size() > best.length)) best = {at, id, token.size()};
    }
    return best;
  }

  /// Bytes the searches have stepped over so far, summed over the special tokens: at most
  /// about text.size() per token.
  std::size_t bytes_scanned() const noexcept { return scanned_; }

 private:
  static constexpr std::size_t kUnknown = static_cast<std::size_t>(-1);
  std::string_view text_;
  const std::vector<std::pair<std::string, std::int32_t>>* specials_;
  std::vector<std::size_t> next_;  // each token's next occurrence; text.size(): none left
  std::size_t scanned_ = 0;
};

}  // namespace bpe_detail

/// Splits text into GPT-2 pre-tokens (views into `text`). Exposed for tests and for callers
/// who want to see the pieces.
inline std::vector<std::string_view> gpt2_pre_tokenize(std::string_view text) {
  using namespace unicode;
  enum class Kind : std::uint8_t { Letter, Number, Space, Other };
  const std::vector<Utf8Unit> units = decode_utf8(text);
  std::vector<Kind> kinds(units.size());
  for (std::size_t i = 0; i < units.size(); ++i) {
    const char32_t cp = units[i].code_point;
    kinds[i] = is_letter(cp) ? Kind::Letter : is_number(cp) ? Kind::Number : is_whitespace(cp) ? Kind::Space : Kind::Other;
  }
  const std::size_t n = units.size();
  const auto cp_at = [&](std::size_t i) -> char32_t { return i < n ? units[i].code_point : 0; };
  const auto run_end = [&](std::size_t i, Kind kind) {
    while (i < n && kinds[i] == kind) ++i;
    return i;
  };

  std::vector<std::string_view> pieces;
  std::size_t i = 0;
  while (i < n) {
    std::size_t end = i;  // one past the last unit of the match
    // 's|'t|'re|'ve|'m|'ll|'d  (lower case only, as in GPT-2)
    if (cp_at(i) == U'\'') {
      const char32_t a = cp_at(i + 1), b = cp_at(i + 2);
      if (a == U's' || a == U't' || a == U'm' || a == U'd') {
        end = i + 2;
      } else if ((a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l')) {
        end = i + 3;
      }
    }
    // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': an optional space, then a run of one kind.
    // The space is ASCII 0x20 only; without it the run must start right here.
    if (end == i) {
      const std::size_t start = (cp_at(i) == U' ' && i + 1 < n && kinds[i + 1] != Kind::Space) ? i + 1 : i;
      if (kinds[start] != Kind::Space) end = run_end(start, kinds[start]);
    }
    // '\s+(?!\S)|\s+': a whitespace run; when a non-space follows it, its last unit is left
    // for the next piece (so " word" keeps its space), unless the run is a single unit.
    if (end == i) {
      const std::size_t run = run_end(i, Kind::Space);
      end = (run < n && run - i > 1) ? run - 1 : run;
    }
    const std::size_t byte_begin = units[i].offset;
    const std::size_t byte_end = units[end - 1].offset + units[end - 1].length;
    pieces.push_back(text.substr(byte_begin, byte_end - byte_begin));
    i = end;
  }
  return pieces;
}

/// (At namespace scope, not nested: GCC refuses a nested struct with default member
/// initializers as a default argument of its enclosing class's members.)
struct BpeTokenizerOptions {
  /// Prepended by encode(text, add_bos = true); OPT uses "</s>" (id 2).
  std::string bos_token = "</s>";
  /// Strings matched verbatim in the text and emitted as one id (those missing from the
  /// vocabulary are ignored). Empty: the text is never split on special tokens.
  std::vector<std::string> special_tokens = {"<s>", "<pad>", "</s>", "<unk>"};
};

/// A GPT-2 byte-level BPE tokenizer.
class BpeTokenizer {
 public:
  using Options = BpeTokenizerOptions;

  /// Loads vocab.json and merges.txt from `directory`.
  static BpeTokenizer from_directory(const std::filesystem::path& directory, Options options = {}) {
    return from_files(directory / "vocab.json", directory / "merges.txt", std::move(options));
  }

  static BpeTokenizer from_files(const std::filesystem::path& vocab_json,
                                 const std::filesystem::path& merges_txt, Options options = {}) {
    BpeTokenizer tokenizer;
    tokenizer.load_vocab(vocab_json);
    tokenizer.load_merges(merges_txt);
    tokenizer.setup_bytes_and_specials(options);
    return tokenizer;
  }

  /// Token ids of `text`; with add_bos, the bos token's id comes first (OPT's convention).
  std::vector<std::int32_t> encode(std::string_view text, bool add_bos = false) const {
    std::vector<std::int32_t> ids;
    if (add_bos) ids.push_back(bos_id());
    std::size_t position = 0;
    bpe_detail::SpecialScanner specials(text, specials_);
    while (position < text.size()) {
      const auto [special_at, special_id, special_length] = specials.next(position);
      for (std::string_view piece : gpt2_pre_tokenize(text.substr(position, special_at - position))) {
        encode_piece(piece, ids);
      }
      if (special_length == 0) break;
      ids.push_back(special_id);
      position = special_at + special_length;
    }
    return ids;
  }

  /// The bytes the ids stand for. Token boundaries need not fall on UTF-8 boundaries, so a
  /// slice of ids can decode to partial characters; the bytes are returned as they are.
  std::string decode(std::span<const std::int32_t> ids) const {
    std::string text;
    for (const std::int32_t id : ids) {
      if (id < 0 || static_cast<std::size_t>(id) >= id_to_token_.size() || !id_present_[id]) {
        throw Error("BpeTokenizer::decode: token id " + std::to_string(id) + " is not in the vocabulary");
      }
      if (is_special_[id]) {
        text += id_to_token_[id];
        continue;
      }
      for (const unicode::Utf8Unit& unit : unicode::decode_utf8(id_to_token_[id])) {
        const int byte = unit.code_point < code_point_to_byte_.size() ? code_point_to_byte_[unit.code_point] : -1;
        if (byte < 0) {
          throw Error("BpeTokenizer::decode: token " + std::to_string(id) + " ('" + id_to_token_[id] +
                      "') holds a character outside the byte-level alphabet");
        }
        text.push_back(static_cast<char>(byte));
      }
    }
    return text;
  }

  std::string decode(const std::vector<std::int32_t>& ids) const {
    return decode(std::span<const std::int32_t>(ids));
  }

  /// The id of Options::bos_token; throws if the vocabulary lacks it.
  std::int32_t bos_id() const {
    if (!bos_id_) throw Error("BpeTokenizer: the vocabulary has no bos token '" + bos_token_ + "'");
    return *bos_id_;
  }

  std::optional<std::int32_t> token_to_id(const std::string& token) const {
    const auto found = token_to_id_.find(token);
    if (found == token_to_id_.end()) return std::nullopt;
    return found->second;
  }

  /// Number of ids: one more than the largest id in vocab.json.
  std::size_t vocab_size() const noexcept { return id_to_token_.size(); }

 private:
  struct Merge {
    std::int32_t rank;
    std::int32_t merged_id;
  };
  struct Cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<std::int32_t>> pieces;
  };
  // Text has a bounded number of distinct pieces in practice, but a pathological stream (say,
  // random numbers) need not; past this many the cache starts over.
  static constexpr std::size_t kMaxCachedPieces = 1 << 16;

  BpeTokenizer() : cache_(std::make_unique<Cache>()) {}

  static std::uint64_t pair_key(std::int32_t left, std::int32_t right) noexcept {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) | static_cast<std::uint32_t>(right);
  }

  void load_vocab(const std::filesystem::path& path) {
    const std::string file = path.string();
    const std::string text = bpe_detail::read_text_file(path);
    check_json_depth(text, file);
    nlohmann::json vocab;
    try {
      vocab = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw FileError(file, std::string("not valid JSON: ") + e.what());  // names line and column
    }
    if (!vocab.is_object()) throw FileError(file, "expected a JSON object {token: id}");
    // Ids index a table of vocab_size() entries: they may leave gaps, but not ask for a table
    // far larger than the file's entries (an id near INT32_MAX would be 2^31 strings).
    const std::int64_t max_id = 2 * static_cast<std::int64_t>(vocab.size()) + 1024;
    for (const auto& [token, id_value] : vocab.items()) {
      if (!id_value.is_number_integer() || id_value.get<std::int64_t>() < 0 ||
          id_value.get<std::int64_t>() > INT32_MAX - 1) {
        throw FileError(file, "token '" + token + "' has id " + id_value.dump() + ", not a non-negative integer");
      }
      if (id_value.get<std::int64_t>() >= max_id) {
        throw FileError(file, "token '" + token + "' has id " + id_value.dump() + ", far beyond the file's " +
                                  std::to_string(vocab.size()) + " entries (ids must be below " +
                                  std::to_string(max_id) + ")");
      }
      const auto id = static_cast<std::int32_t>(id_value.get<std::int64_t>());
      if (static_cast<std::size_t>(id) >= id_to_token_.size()) {
        id_to_token_.resize(static_cast<std::size_t>(id) + 1);
        id_present_.resize(static_cast<std::size_t>(id) + 1, false);
      }
      if (id_present_[id]) {
        throw FileError(file, "id " + std::to_string(id) + " is given to both '" + id_to_token_[id] + "' and '" + token + "'");
      }
      id_to_token_[id] = token;
      id_present_[id] = true;
      token_to_id_.emplace(token, id);
    }
  }

  void load_merges(const std::filesystem::path& path) {
    const std::string file = path.string();
    const std::string text = bpe_detail::read_text_file(path);
    std::size_t line_number = 0;
    std::int32_t rank = 0;
    std::size_t line_start = 0;
    while (line_start < text.size()) {
      std::size_t line_end = text.find('\n', line_start);
      if (line_end == std::string::npos) line_end = text.size();
      std::string_view line(text.data() + line_start, line_end - line_start);
      line_start = line_end + 1;
      ++line_number;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty() || (line_number == 1 && line.starts_with("#version"))) continue;

      const std::size_t space = line.find(' ');
      if (space == std::string_view::npos || space == 0 || space + 1 == line.size() ||
          line.find(' ', space + 1) != std::string_view::npos) {
        throw FileError(file, "line " + std::to_string(line_number) + ": expected two tokens separated by one space, got '" +
                                  std::string(line) + "'");
      }
      const std::string left(line.substr(0, space));
      const std::string right(line.substr(space + 1));
      const auto id_of = [&](const std::string& token) {
        const auto found = token_to_id_.find(token);
        if (found == token_to_id_.end()) {
          throw FileError(file, "line " + std::to_string(line_number) + ": token '" + token + "' is not in the vocabulary");
        }
        return found->second;
      };
      const std::int32_t left_id = id_of(left), right_id = id_of(right), merged_id = id_of(left + right);
      // A pair listed twice keeps its later rank, as GPT2Tokenizer's dict and tokenizers do.
      merges_.insert_or_assign(pair_key(left_id, right_id), Merge{rank++, merged_id});
    }
  }

  void setup_bytes_and_specials(const Options& options) {
    const auto& to_code_point = bpe_detail::byte_to_code_point();
    code_point_to_byte_.assign(512, -1);
    for (unsigned b = 0; b < 256; ++b) {
      code_point_to_byte_[to_code_point[b]] = static_cast<std::int16_t>(b);
      std::string symbol;
      unicode::append_utf8(symbol, to_code_point[b]);
      const auto found = token_to_id_.find(symbol);
      byte_id_[b] = found == token_to_id_.end() ? -1 : found->second;
    }
    is_special_.assign(id_to_token_.size(), false);
    for (const std::string& token : options.special_tokens) {
      const auto found = token_to_id_.find(token);
      if (token.empty() || found == token_to_id_.end()) continue;
      specials_.emplace_back(token, found->second);
      is_special_[found->second] = true;
    }
    bos_token_ = options.bos_token;
    if (const auto found = token_to_id_.find(bos_token_); found != token_to_id_.end()) bos_id_ = found->second;
  }

  void encode_piece(std::string_view piece, std::vector<std::int32_t>& out) const {
    {
      std::lock_guard lock(cache_->mutex);
      const auto found = cache_->pieces.find(std::string(piece));
      if (found != cache_->pieces.end()) {
        out.insert(out.end(), found->second.begin(), found->second.end());
        return;
      }
    }
    std::vector<std::int32_t> symbols;
    symbols.reserve(piece.size());
    for (const char c : piece) {
      const auto byte = static_cast<unsigned char>(c);
      if (byte_id_[byte] < 0) {
        throw Error("BpeTokenizer::encode: the vocabulary has no token for byte 0x" + hex_byte(byte) +
                    " (a byte-level vocabulary must hold all 256)");
      }
      symbols.push_back(byte_id_[byte]);
    }
    apply_merges(symbols);
    out.insert(out.end(), symbols.begin(), symbols.end());

    std::lock_guard lock(cache_->mutex);
    if (cache_->pieces.size() >= kMaxCachedPieces) cache_->pieces.clear();
    cache_->pieces.emplace(std::string(piece), std::move(symbols));
  }

  /// GPT-2's bpe(): repeatedly take the adjacent pair of lowest rank and merge every
  /// occurrence of it, left to right, until no adjacent pair has a rank.
  void apply_merges(std::vector<std::int32_t>& symbols) const {
    while (symbols.size() > 1) {
      const Merge* best = nullptr;
      std::int32_t best_left = 0, best_right = 0;
      for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
        const auto found = merges_.find(pair_key(symbols[i], symbols[i + 1]));
        if (found != merges_.end() && (best == nullptr || found->second.rank < best->rank)) {
          best = &found->second;
          best_left = symbols[i];
          best_right = symbols[i + 1];
        }
      }
      if (best == nullptr) return;
      std::size_t write = 0;
      for (std::size_t read = 0; read < symbols.size(); ++write) {
        if (read + 1 < symbols.size() && symbols[read] == best_left && symbols[read + 1] == best_right) {
          symbols[write] = best->merged_id;
          read += 2;
        } else {
          symbols[write] = symbols[read];
          read += 1;
        }
      }
      symbols.resize(write);
    }
  }

  static std::string hex_byte(unsigned byte) {
    const char* digits = "0123456789abcdef";
    return {digits[byte >> 4], digits[byte & 15]};
  }

  std::vector<std::string> id_to_token_;
  std::vector<bool> id_present_;
  std::vector<bool> is_special_;
  std::unordered_map<std::string, std::int32_t> token_to_id_;
  std::unordered_map<std::uint64_t, Merge> merges_;
  std::array<std::int32_t, 256> byte_id_{};
  std::vector<std::int16_t> code_point_to_byte_;  // byte-level alphabet: U+0021..U+0143
  std::vector<std::pair<std::string, std::int32_t>> specials_;
  std::string bos_token_;
  std::optional<std::int32_t> bos_id_;
  std::unique_ptr<Cache> cache_;  // behind a pointer: the mutex would make the class immovable
};

}  // namespace zo2::io
