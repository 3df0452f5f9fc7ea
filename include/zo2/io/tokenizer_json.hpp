// zo2/io/tokenizer_json.hpp -- Hugging Face tokenizer.json (the `tokenizers` library's format)
// for BPE models, giving the same ids and decodings as `tokenizers` for the configurations the
// LLaMA family ships:
//   - byte-level BPE behind a Split regex (Qwen2/2.5/3, LLaMA-3): NFC normalizer, Sequence
//     pre-tokenizer [Split(Regex), ByteLevel(use_regex=false)], ByteLevel decoder;
//   - SentencePiece-style BPE (LLaMA-2, Mistral): normalizer Sequence[Prepend("▁"),
//     Replace(" ", "▁")] or a Metaspace pre-tokenizer (prepend_scheme first/always/never),
//     byte_fallback to <0xNN> tokens, fuse_unk, decoder Sequence[Replace, ByteFallback, Fuse,
//     Strip] or Metaspace;
//   - added tokens (special or not; single_word, lstrip, rstrip, normalized), and the
//     post-processor (TemplateProcessing, e.g. "<s> $A" / "<|begin_of_text|> $A"; ByteLevel;
//     Roberta/Bert; Sequence) when encode() is asked to add special tokens.
//
// Encoding follows tokenizers step by step (tokenizer/added_vocabulary.rs, normalizer.rs,
// pre_tokenizers/, models/bpe/): split off the added tokens that match the raw text, normalize
// each remaining piece, split off the added tokens that match normalized text, pre-tokenize,
// run the BPE model on every piece (its merge loop transcribed, ties and all), post-process.
//
// The tokenizer's own regexes run on PCRE2 (8-bit, UTF + UCP, JIT where available), and
// normalization (NFC/NFD/NFKC/NFKD) is utf8proc's: this header includes <pcre2.h> and
// <utf8proc.h>, so a program using it links libpcre2-8 and libutf8proc (CMake: zo2::tokenizers).
// tokenizers compiles its regexes with Oniguruma; the patterns are translated where the two
// engines read the same escape differently: \s and \S become White_Space (PCRE2's \s also
// matches U+180E), \w and \W Oniguruma's word class (letters, marks, numbers, connector
// punctuation, Alphabetic), \h and \H hexadecimal digits, \uHHHH is \x{HHHH}.
//
// Text that is not valid UTF-8 is first made valid as Rust's String::from_utf8_lossy does
// (each maximal invalid subsequence becomes U+FFFD): tokenizers only ever sees valid strings.
//
// Unicode versions: the character classes are PCRE2's (Debian 12's 10.42), the normal forms
// utf8proc's (2.8: Unicode 15). tokenizers normalizes with the tables of an older Unicode
// (about 9.0), and its regexes (Oniguruma) and digit test (Rust's char) know Unicode 16. The
// normal forms are made to agree: tokenizer_json/normalization_barriers.hpp lists the 245 code
// points that tokenizers' tables leave alone and utf8proc's do not (marks and compatibility
// characters assigned since), and each splits a text into pieces normalized on their own, as
// tokenizers' tables treat them. What remains are characters assigned in Unicode 16 where a
// class decides a split. On every code point (tests/fixtures/tokenizer_json/make_fixtures.py
// --every-code-point), the Qwen2- and LLaMA-3-style fixtures give tokenizers' ids for all; the
// NFKC + GPT-2-regex one ("misc") for all but 120, each a Unicode 16 letter or digit.
//
// The parts (in tokenizer_json/): utf8.hpp (UTF-8 as tokenizers sees it), engines.hpp (utf8proc
// normalization, PCRE2 regexes), normalization_barriers.hpp (generated: what tokenizers' tables
// do not normalize), patterns.hpp (what Split and Replace match, the byte-level
// alphabet), pipeline.hpp (the steps, pieces and added tokens); this file reads tokenizer.json
// into them and encodes and decodes.
//
// Not supported, and refused at load with a FileError naming the field: models other than BPE,
// BPE dropout, normalizers other than NFC/NFD/NFKC/NFKD/Prepend/Replace/Strip/ByteLevel/Sequence
// (Lowercase, BertNormalizer, Precompiled, ...), pre-tokenizers other than Split/ByteLevel/
// Metaspace/Digits/WhitespaceSplit/Sequence, decoders other than ByteLevel/Replace/ByteFallback/
// Fuse/Strip/Metaspace/Sequence. "truncation" and "padding" are ignored (run-time settings).
#pragma once

#include <zo2/core/error.hpp>
#include <zo2/io/bpe_tokenizer.hpp>
#include <zo2/io/json_limits.hpp>
#include <zo2/io/tokenizer_json/engines.hpp>
#include <zo2/io/tokenizer_json/patterns.hpp>
#include <zo2/io/tokenizer_json/pipeline.hpp>
#include <zo2/io/tokenizer_json/utf8.hpp>
#include <zo2/io/unicode.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

/// Defined by this header: the tokenizer.json reader is compiled in.
#define ZO2_HAS_TOKENIZER_JSON 1

namespace zo2::io {

/// A tokenizer read from a Hugging Face tokenizer.json with a BPE model.
class TokenizerJson {
 public:
  /// Reads `directory`/tokenizer.json.
  static TokenizerJson from_directory(const std::filesystem::path& directory) {
    return from_file(directory / "tokenizer.json");
  }

  /// Reads a tokenizer.json; a malformed or unsupported file is a FileError naming the file
  /// and the field (e.g. "model.merges[3]", "pre_tokenizer.pretokenizers[0].pattern").
  static TokenizerJson from_file(const std::filesystem::path& path) {
    const std::string text = bpe_detail::read_text_file(path);
    TokenizerJson tokenizer;
    Loader loader{path.string(), tokenizer};
    loader.load(text);
    return tokenizer;
  }

  /// Token ids of `text`. With add_special_tokens, the post-processor's template for a single
  /// sequence applies (e.g. LLaMA's "<s> $A"), as tokenizers' encode(text, add_special_tokens).
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens = false) const {
    using namespace tokenizer_json_detail;
    const std::string valid = to_valid_utf8(text);
    std::vector<Piece> pieces = extract_and_normalize(valid);
    for (const PreTokenizerStep& step : pre_tokenizer_) pre_tokenize(step, pieces);
    std::vector<std::int32_t> ids;
    ids.reserve(valid.size() / 2 + 4);
    for (const Piece& piece : pieces) {
      if (piece.id >= 0) {
        ids.push_back(piece.id);
      } else {
        tokenize(piece.text, ids);
      }
    }
    if (!add_special_tokens || !has_template_) return ids;
    std::vector<std::int32_t> out;
    out.reserve(ids.size() + 4);
    for (const TemplateItem& item : template_) {
      if (item.is_sequence) {
        out.insert(out.end(), ids.begin(), ids.end());
      } else {
        out.insert(out.end(), item.ids.begin(), item.ids.end());
      }
    }
    return out;
  }

  /// The text of `ids`, through the decoder (tokenizers' decode). With skip_special_tokens,
  /// special added tokens are left out. An id outside the vocabulary is an Error.
  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens = false) const {
    using namespace tokenizer_json_detail;
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (const std::int32_t id : ids) {
      const std::string* token = nullptr;
      if (const auto found = added_by_id_.find(id); found != added_by_id_.end()) {
        token = &added_[found->second].decode_form;
      } else if (id >= 0 && static_cast<std::size_t>(id) < id_to_token_.size() && id_present_[id]) {
        token = &id_to_token_[id];
      } else {
        throw Error("TokenizerJson::decode: token id " + std::to_string(id) + " is not in the vocabulary");
      }
      if (skip_special_tokens && special_contents_.contains(*token)) continue;
      tokens.push_back(*token);
    }
    if (!has_decoder_) {
      std::string joined;
      for (std::size_t i = 0; i < tokens.size(); ++i) joined += (i ? " " : "") + tokens[i];
      return joined;
    }
    for (const DecoderStep& step : decoder_) tokens = apply_decoder(step, std::move(tokens));
    std::string out;
    for (const std::string& t : tokens) out += t;
    return out;
  }

  std::string decode(const std::vector<std::int32_t>& ids, bool skip_special_tokens = false) const {
    return decode(std::span<const std::int32_t>(ids), skip_special_tokens);
  }

  /// The id of a token: an added token's content, else a model vocabulary entry.
  std::optional<std::int32_t> token_to_id(const std::string& token) const {
    if (const auto found = added_by_content_.find(token); found != added_by_content_.end()) {
      return added_[found->second].id;
    }
    if (const auto found = vocab_.find(token); found != vocab_.end()) return found->second;
    return std::nullopt;
  }

  /// The token an id stands for (an added token's content, else the model's entry).
  std::optional<std::string> id_to_token(std::int32_t id) const {
    if (const auto found = added_by_id_.find(id); found != added_by_id_.end()) return added_[found->second].content;
    if (id >= 0 && static_cast<std::size_t>(id) < id_to_token_.size() && id_present_[id]) return id_to_token_[id];
    return std::nullopt;
  }

  /// Whether `id` is a special added token (skipped by decode(ids, true)).
  bool is_special(std::int32_t id) const {
    const auto found = added_by_id_.find(id);
    return found != added_by_id_.end() && added_[found->second].special;
  }

  /// The first token the post-processor puts before the text (e.g. "<s>"'s id), if any.
  std::optional<std::int32_t> bos_id() const {
    for (const auto& item : template_) {
      if (item.is_sequence) break;
      if (!item.ids.empty()) return item.ids.front();
    }
    return std::nullopt;
  }

  /// One more than the largest id (model vocabulary and added tokens).
  std::size_t vocab_size() const noexcept { return vocab_size_; }

  /// Entries: the model's vocabulary plus added tokens not in it (tokenizers'
  /// get_vocab_size(with_added_tokens=True)).
  std::size_t token_count() const noexcept { return token_count_; }

  /// The added tokens, in file order (content, id, special).
  std::vector<std::pair<std::string, std::int32_t>> added_tokens() const {
    std::vector<std::pair<std::string, std::int32_t>> out;
    for (const auto& t : added_) out.emplace_back(t.content, t.id);
    return out;
  }

 private:
  using json = nlohmann::json;
  using AddedToken = tokenizer_json_detail::AddedToken;
  using Piece = tokenizer_json_detail::Piece;
  using NormalizerStep = tokenizer_json_detail::NormalizerStep;
  using PreTokenizerStep = tokenizer_json_detail::PreTokenizerStep;
  using DecoderStep = tokenizer_json_detail::DecoderStep;
  using TemplateItem = tokenizer_json_detail::TemplateItem;

  struct Merge {
    std::int32_t rank;
    std::int32_t merged_id;
  };
  struct Cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<std::int32_t>> pieces;
  };
  static constexpr std::size_t kMaxCachedPieces = 1 << 16;
  static constexpr std::size_t kMaxCachedPieceBytes = 256;

  TokenizerJson() : cache_(std::make_unique<Cache>()) {}

  static std::uint64_t pair_key(std::int32_t left, std::int32_t right) noexcept {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) | static_cast<std::uint32_t>(right);
  }

  // ---- loading ----------------------------------------------------------------------------------

  struct Loader {
    std::string file;
    TokenizerJson& t;

    [[noreturn]] void fail(const std::string& field, const std::string& why) const {
      throw FileError(file, "field '" + field + "': " + why);
    }

    const json& member(const json& object, const std::string& path, const char* key) const {
      const auto found = object.find(key);
      if (found == object.end()) fail(join(path, key), "missing");
      return *found;
    }
    static std::string join(const std::string& path, const std::string& key) {
      return path.empty() ? key : path + "." + key;
    }
    std::string string_of(const json& value, const std::string& field) const {
      if (!value.is_string()) fail(field, "expected a string, got " + value.dump());
      return value.get<std::string>();
    }
    std::string string_member(const json& object, const std::string& path, const char* key) const {
      return string_of(member(object, path, key), join(path, key));
    }
    bool bool_member(const json& object, const std::string& path, const char* key, bool fallback) const {
      const auto found = object.find(key);
      if (found == object.end() || found->is_null()) return fallback;
      if (!found->is_boolean()) fail(join(path, key), "expected true or false, got " + found->dump());
      return found->get<bool>();
    }
    std::int64_t int_of(const json& value, const std::string& field, std::int64_t max) const {
      if (!value.is_number_integer() || value.get<std::int64_t>() < 0 || value.get<std::int64_t>() > max) {
        fail(field, "expected an integer from 0 to " + std::to_string(max) + ", got " + value.dump());
      }
      return value.get<std::int64_t>();
    }
    char32_t char_member(const json& object, const std::string& path, const char* key) const {
      const std::string s = string_member(object, path, key);
      const std::vector<char32_t> cps = tokenizer_json_detail::code_points(s);
      if (cps.size() != 1 || !tokenizer_json_detail::is_valid_utf8(s)) fail(join(path, key), "expected one character, got '" + s + "'");
      return cps[0];
    }
    std::string type_of(const json& object, const std::string& path) const {
      if (!object.is_object()) fail(path, "expected an object, got " + object.dump().substr(0, 80));
      return string_member(object, path, "type");
    }
    [[noreturn]] void unsupported(const std::string& path, const std::string& type, const char* supported) const {
      fail(join(path, "type"), "'" + type + "' is not supported (zo2 reads " + supported + ")");
    }

    tokenizer_json_detail::Pattern pattern_member(const json& object, const std::string& path) const {
      const std::string field = join(path, "pattern");
      const json& p = member(object, path, "pattern");
      tokenizer_json_detail::Pattern pattern;
      if (p.is_object() && p.size() == 1 && p.contains("String")) {
        pattern.literal = string_of(p["String"], field + ".String");
      } else if (p.is_object() && p.size() == 1 && p.contains("Regex")) {
        pattern.is_regex = true;
        try {
          pattern.regex = tokenizer_json_detail::Regex(string_of(p["Regex"], field + ".Regex"));
        } catch (const FileError&) {
          throw;
        } catch (const Error& e) {
          fail(field + ".Regex", e.what());
        }
      } else {
        fail(field, "expected {\"String\": ...} or {\"Regex\": ...}, got " + p.dump());
      }
      return pattern;
    }

    void load(const std::string& text) {
      check_json_depth(text, file);  // error messages dump() values, which recurses per level
      json root;
      try {
        root = json::parse(text);
      } catch (const json::exception& e) {
        throw FileError(file, std::string("not valid JSON: ") + e.what());
      }
      if (!root.is_object()) throw FileError(file, "expected a JSON object (a tokenizer.json)");
      if (const auto v = root.find("version"); v != root.end() && !v->is_null()) {
        if (string_of(*v, "version") != "1.0") fail("version", "'" + v->get<std::string>() + "' is not 1.0");
      }
      load_model(member(root, "", "model"));
      if (const auto n = root.find("normalizer"); n != root.end() && !n->is_null()) load_normalizer(*n, "normalizer");
      if (const auto p = root.find("pre_tokenizer"); p != root.end() && !p->is_null()) load_pre_tokenizer(*p, "pre_tokenizer");
      if (const auto d = root.find("decoder"); d != root.end() && !d->is_null()) {
        t.has_decoder_ = true;
        load_decoder(*d, "decoder");
      }
      if (const auto p = root.find("post_processor"); p != root.end() && !p->is_null()) load_post_processor(*p, "post_processor");
      if (const auto a = root.find("added_tokens"); a != root.end() && !a->is_null()) load_added_tokens(*a);
      t.finish();
    }

    void load_model(const json& model) {
      const std::string path = "model";
      if (!model.is_object()) fail(path, "expected an object");
      if (const auto type = model.find("type"); type != model.end()) {
        const std::string name = string_of(*type, "model.type");
        if (name != "BPE") fail("model.type", "'" + name + "' is not supported (zo2 reads BPE models)");
      }
      if (const auto d = model.find("dropout"); d != model.end() && !d->is_null()) {
        if (!d->is_number()) fail("model.dropout", "expected a number or null");
        if (d->get<double>() != 0.0) fail("model.dropout", "BPE dropout is not supported (training-time sampling)");
      }
      if (const auto u = model.find("unk_token"); u != model.end() && !u->is_null()) t.unk_token_ = string_of(*u, "model.unk_token");
      if (const auto p = model.find("continuing_subword_prefix"); p != model.end() && !p->is_null()) {
        t.subword_prefix_ = string_of(*p, "model.continuing_subword_prefix");
      }
      if (const auto s = model.find("end_of_word_suffix"); s != model.end() && !s->is_null()) {
        t.word_suffix_ = string_of(*s, "model.end_of_word_suffix");
      }
      t.fuse_unk_ = bool_member(model, path, "fuse_unk", false);
      t.byte_fallback_ = bool_member(model, path, "byte_fallback", false);
      t.ignore_merges_ = bool_member(model, path, "ignore_merges", false);

      const json& vocab = member(model, path, "vocab");
      if (!vocab.is_object()) fail("model.vocab", "expected an object {token: id}");
      // Ids index a table: gaps are allowed, a table far larger than the entries is not.
      const std::int64_t max_id = 2 * static_cast<std::int64_t>(vocab.size()) + 1024;
      for (const auto& [token, id_value] : vocab.items()) {
        const std::string field = "model.vocab['" + token + "']";
        const auto id = static_cast<std::int32_t>(int_of(id_value, field, std::min<std::int64_t>(max_id, INT32_MAX - 1)));
        if (static_cast<std::size_t>(id) >= t.id_to_token_.size()) {
          t.id_to_token_.resize(static_cast<std::size_t>(id) + 1);
          t.id_present_.resize(static_cast<std::size_t>(id) + 1, false);
        }
        if (t.id_present_[id]) fail(field, "id " + std::to_string(id) + " is also given to '" + t.id_to_token_[id] + "'");
        t.id_to_token_[id] = token;
        t.id_present_[id] = true;
        t.vocab_.emplace(token, id);
      }

      const json& merges = member(model, path, "merges");
      if (!merges.is_array()) fail("model.merges", "expected an array of \"a b\" strings or [a, b] pairs");
      t.merges_.reserve(merges.size());
      const std::size_t prefix_length = t.subword_prefix_.size();
      for (std::size_t rank = 0; rank < merges.size(); ++rank) {
        const std::string field = "model.merges[" + std::to_string(rank) + "]";
        const json& m = merges[rank];
        std::string left, right;
        if (m.is_string()) {
          const std::string s = m.get<std::string>();
          const std::size_t space = s.find(' ');
          if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
            fail(field, "expected two tokens separated by one space, got '" + s + "'");
          }
          left = s.substr(0, space);
          right = s.substr(space + 1);
        } else if (m.is_array() && m.size() == 2) {
          left = string_of(m[0], field + "[0]");
          right = string_of(m[1], field + "[1]");
        } else {
          fail(field, "expected \"a b\" or [\"a\", \"b\"], got " + m.dump());
        }
        const auto id_of = [&](const std::string& token) {
          const auto found = t.vocab_.find(token);
          if (found == t.vocab_.end()) fail(field, "token '" + token + "' is not in model.vocab");
          return found->second;
        };
        if (right.size() < prefix_length) fail(field, "'" + right + "' is shorter than model.continuing_subword_prefix");
        const std::int32_t left_id = id_of(left), right_id = id_of(right);
        const std::int32_t merged_id = id_of(left + right.substr(prefix_length));
        // A pair listed twice keeps its later rank, as tokenizers' map does.
        t.merges_.insert_or_assign(pair_key(left_id, right_id), Merge{static_cast<std::int32_t>(rank), merged_id});
      }
    }

    void load_normalizer(const json& n, const std::string& path) {
      using tokenizer_json_detail::NormalForm;
      using Kind = NormalizerStep::Kind;
      const std::string type = type_of(n, path);
      NormalizerStep step{};
      if (type == "Sequence") {
        const json& list = member(n, path, "normalizers");
        if (!list.is_array()) fail(join(path, "normalizers"), "expected an array");
        for (std::size_t i = 0; i < list.size(); ++i) load_normalizer(list[i], path + ".normalizers[" + std::to_string(i) + "]");
        return;
      } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
        step.kind = Kind::Unicode;
        step.form = type == "NFC" ? NormalForm::NFC : type == "NFD" ? NormalForm::NFD : type == "NFKC" ? NormalForm::NFKC : NormalForm::NFKD;
      } else if (type == "Prepend") {
        step.kind = Kind::Prepend;
        step.text = string_member(n, path, "prepend");
      } else if (type == "Replace") {
        step.kind = Kind::Replace;
        step.pattern = pattern_member(n, path);
        step.text = string_member(n, path, "content");
      } else if (type == "Strip") {
        step.kind = Kind::Strip;
        step.strip_left = bool_member(n, path, "strip_left", false);
        step.strip_right = bool_member(n, path, "strip_right", false);
      } else if (type == "ByteLevel") {
        step.kind = Kind::ByteLevel;
      } else {
        unsupported(path, type, "NFC, NFD, NFKC, NFKD, Prepend, Replace, Strip, ByteLevel, Sequence");
      }
      t.normalizer_.push_back(std::move(step));
      t.has_normalizer_ = true;
    }

    tokenizer_json_detail::PrependScheme prepend_scheme(const json& object, const std::string& path) const {
      using tokenizer_json_detail::PrependScheme;
      PrependScheme scheme = PrependScheme::Always;
      if (const auto s = object.find("prepend_scheme"); s != object.end() && !s->is_null()) {
        const std::string name = string_of(*s, join(path, "prepend_scheme"));
        if (name == "first") {
          scheme = PrependScheme::First;
        } else if (name == "never") {
          scheme = PrependScheme::Never;
        } else if (name == "always") {
          scheme = PrependScheme::Always;
        } else {
          fail(join(path, "prepend_scheme"), "'" + name + "' is not first, never or always");
        }
      }
      // Files from before prepend_scheme: add_prefix_space false means never.
      if (const auto a = object.find("add_prefix_space"); a != object.end() && a->is_boolean() && !a->get<bool>()) {
        if (scheme != PrependScheme::Never) fail(join(path, "add_prefix_space"), "false does not match prepend_scheme");
      }
      return scheme;
    }

    void load_pre_tokenizer(const json& p, const std::string& path) {
      using Kind = PreTokenizerStep::Kind;
      using tokenizer_json_detail::SplitBehavior;
      const std::string type = type_of(p, path);
      PreTokenizerStep step{};
      if (type == "Sequence") {
        const json& list = member(p, path, "pretokenizers");
        if (!list.is_array()) fail(join(path, "pretokenizers"), "expected an array");
        for (std::size_t i = 0; i < list.size(); ++i) load_pre_tokenizer(list[i], path + ".pretokenizers[" + std::to_string(i) + "]");
        return;
      } else if (type == "Split") {
        step.kind = Kind::Split;
        step.pattern = pattern_member(p, path);
        const std::string behavior = string_member(p, path, "behavior");
        if (behavior == "Removed") {
          step.behavior = SplitBehavior::Removed;
        } else if (behavior == "Isolated") {
          step.behavior = SplitBehavior::Isolated;
        } else if (behavior == "MergedWithPrevious") {
          step.behavior = SplitBehavior::MergedWithPrevious;
        } else if (behavior == "MergedWithNext") {
          step.behavior = SplitBehavior::MergedWithNext;
        } else if (behavior == "Contiguous") {
          step.behavior = SplitBehavior::Contiguous;
        } else {
          fail(join(path, "behavior"), "'" + behavior + "' is not Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous");
        }
        step.invert = bool_member(p, path, "invert", false);
      } else if (type == "ByteLevel") {
        step.kind = Kind::ByteLevel;
        step.add_prefix_space = bool_member(p, path, "add_prefix_space", true);
        step.use_regex = bool_member(p, path, "use_regex", true);
        if (step.use_regex) {
          step.pattern.is_regex = true;
          step.pattern.regex = gpt2_regex();
        }
      } else if (type == "Metaspace") {
        step.kind = Kind::Metaspace;
        step.replacement = tokenizer_json_detail::utf8_of(char_member(p, path, "replacement"));
        step.prepend_scheme = prepend_scheme(p, path);
        step.split = bool_member(p, path, "split", true);
      } else if (type == "Digits") {
        step.kind = Kind::Digits;
        step.individual_digits = bool_member(p, path, "individual_digits", false);
      } else if (type == "WhitespaceSplit") {
        step.kind = Kind::WhitespaceSplit;
      } else {
        unsupported(path, type, "Split, ByteLevel, Metaspace, Digits, WhitespaceSplit, Sequence");
      }
      t.pre_tokenizer_.push_back(std::move(step));
    }

    static const tokenizer_json_detail::Regex& gpt2_regex() {
      static const tokenizer_json_detail::Regex regex(
          R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)");
      return regex;
    }

    void load_decoder(const json& d, const std::string& path) {
      using Kind = DecoderStep::Kind;
      const std::string type = type_of(d, path);
      DecoderStep step{};
      if (type == "Sequence") {
        const json& list = member(d, path, "decoders");
        if (!list.is_array()) fail(join(path, "decoders"), "expected an array");
        for (std::size_t i = 0; i < list.size(); ++i) load_decoder(list[i], path + ".decoders[" + std::to_string(i) + "]");
        return;
      } else if (type == "ByteLevel") {
        step.kind = Kind::ByteLevel;
      } else if (type == "Replace") {
        step.kind = Kind::Replace;
        step.pattern = pattern_member(d, path);
        step.content = string_member(d, path, "content");
      } else if (type == "ByteFallback") {
        step.kind = Kind::ByteFallback;
      } else if (type == "Fuse") {
        step.kind = Kind::Fuse;
      } else if (type == "Strip") {
        step.kind = Kind::Strip;
        step.strip_char = char_member(d, path, "content");
        step.strip_start = static_cast<std::size_t>(int_of(member(d, path, "start"), join(path, "start"), 1 << 20));
        step.strip_stop = static_cast<std::size_t>(int_of(member(d, path, "stop"), join(path, "stop"), 1 << 20));
      } else if (type == "Metaspace") {
        step.kind = Kind::Metaspace;
        step.replacement = char_member(d, path, "replacement");
        step.prepend_scheme = prepend_scheme(d, path);
      } else {
        unsupported(path, type, "ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence");
      }
      t.decoder_.push_back(std::move(step));
    }

    std::vector<std::int32_t> ids_of(const json& value, const std::string& field) const {
      if (!value.is_array()) fail(field, "expected an array of ids");
      std::vector<std::int32_t> ids;
      for (std::size_t i = 0; i < value.size(); ++i) {
        ids.push_back(static_cast<std::int32_t>(int_of(value[i], field + "[" + std::to_string(i) + "]", INT32_MAX - 1)));
      }
      return ids;
    }

    void load_post_processor(const json& p, const std::string& path) {
      const std::string type = type_of(p, path);
      if (type == "Sequence") {
        const json& list = member(p, path, "processors");
        if (!list.is_array()) fail(join(path, "processors"), "expected an array");
        for (std::size_t i = 0; i < list.size(); ++i) load_post_processor(list[i], path + ".processors[" + std::to_string(i) + "]");
      } else if (type == "ByteLevel") {
        // Only trims offsets: the ids are unchanged.
      } else if (type == "TemplateProcessing") {
        load_template(p, path);
      } else if (type == "RobertaProcessing" || type == "BertProcessing") {
        // [cls] $A [sep]
        const auto token = [&](const char* key) {
          const json& v = member(p, path, key);
          if (!v.is_array() || v.size() != 2) fail(join(path, key), "expected [token, id]");
          return static_cast<std::int32_t>(int_of(v[1], join(path, key) + "[1]", INT32_MAX - 1));
        };
        t.template_ = {TemplateItem{false, {token("cls")}}, TemplateItem{true, {}}, TemplateItem{false, {token("sep")}}};
        t.has_template_ = true;
      } else {
        unsupported(path, type, "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence");
      }
    }

    void load_template(const json& p, const std::string& path) {
      const json& specials = member(p, path, "special_tokens");
      if (!specials.is_object()) fail(join(path, "special_tokens"), "expected an object");
      const json& single = member(p, path, "single");
      const std::string field = join(path, "single");
      if (!single.is_array()) fail(field, "expected an array of pieces");
      std::vector<TemplateItem> items;
      bool has_sequence = false;
      for (std::size_t i = 0; i < single.size(); ++i) {
        const std::string item_field = field + "[" + std::to_string(i) + "]";
        const json& piece = single[i];
        std::string special;  // a special token's name in special_tokens
        if (piece.is_object() && piece.contains("Sequence")) {
          const json& s = piece["Sequence"];
          const std::string id = s.is_object() && s.contains("id") ? string_of(s["id"], item_field + ".Sequence.id") : "";
          if (id != "A") fail(item_field + ".Sequence.id", "a single sequence's template can only hold $A, got '" + id + "'");
          items.push_back({true, {}});
          has_sequence = true;
          continue;
        } else if (piece.is_object() && piece.contains("SpecialToken")) {
          const json& s = piece["SpecialToken"];
          if (!s.is_object()) fail(item_field + ".SpecialToken", "expected an object");
          special = string_member(s, item_field + ".SpecialToken", "id");
        } else if (piece.is_string()) {  // "$A", "$", "$0" or a special token's name
          const std::string s = piece.get<std::string>();
          const std::string name = s.substr(0, s.find(':'));
          if (name == "$" || name == "$A" || name == "$a" ||
              (name.size() > 1 && name[0] == '$' && name.find_first_not_of("0123456789", 1) == std::string::npos)) {
            items.push_back({true, {}});
            has_sequence = true;
            continue;
          }
          special = name;
        } else {
          fail(item_field, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}, got " + piece.dump());
        }
        const auto found = specials.find(special);
        if (found == specials.end()) fail(join(path, "special_tokens"), "has no entry '" + special + "' (used by " + item_field + ")");
        items.push_back({false, ids_of(member(*found, join(path, "special_tokens") + "." + special, "ids"),
                                       join(path, "special_tokens") + "." + special + ".ids")});
      }
      if (!has_sequence) fail(field, "has no $A");
      t.template_ = std::move(items);
      t.has_template_ = true;
    }

    void load_added_tokens(const json& list) {
      if (!list.is_array()) fail("added_tokens", "expected an array");
      // tokenizers' AddedVocabulary::add_tokens: the id is the model's when the content is in
      // its vocabulary, else the next one after the model's (the file's "id" is only checked
      // there, with a warning).
      std::int64_t next_id = static_cast<std::int64_t>(t.vocab_.size());
      for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string path = "added_tokens[" + std::to_string(i) + "]";
        const json& entry = list[i];
        if (!entry.is_object()) fail(path, "expected an object");
        AddedToken token;
        token.content = string_member(entry, path, "content");
        if (!tokenizer_json_detail::is_valid_utf8(token.content)) fail(join(path, "content"), "is not valid UTF-8");
        token.single_word = bool_member(entry, path, "single_word", false);
        token.lstrip = bool_member(entry, path, "lstrip", false);
        token.rstrip = bool_member(entry, path, "rstrip", false);
        token.special = bool_member(entry, path, "special", false);
        token.normalized = bool_member(entry, path, "normalized", !token.special);
        if (token.content.empty()) continue;
        if (const auto found = t.added_by_content_.find(token.content); found != t.added_by_content_.end()) {
          token.id = t.added_[found->second].id;
        } else if (const auto in_vocab = t.vocab_.find(token.content); in_vocab != t.vocab_.end()) {
          token.id = in_vocab->second;
        } else {
          if (next_id > INT32_MAX - 1) fail(path, "too many added tokens");
          token.id = static_cast<std::int32_t>(next_id++);
        }
        t.added_.push_back(std::move(token));
        t.added_by_content_[t.added_.back().content] = t.added_.size() - 1;
      }
    }
  };

  /// After loading: the added tokens' match and decode forms, matchers and tables.
  void finish() {
    std::size_t max_id_plus_one = id_to_token_.size();
    // A later entry with the same content or id replaces an earlier one, as in tokenizers' maps.
    for (std::size_t i = 0; i < added_.size(); ++i) {
      AddedToken& token = added_[i];
      token.match_form = token.content;
      token.decode_form = token.content;
      if (token.normalized && has_normalizer_) {
        token.match_form = normalize(token.content);
        token.decode_form = token.match_form;
      }
      added_by_id_[token.id] = i;
      if (token.special) special_contents_.insert(token.content);
      max_id_plus_one = std::max(max_id_plus_one, static_cast<std::size_t>(token.id) + 1);
    }
    for (std::size_t i = 0; i < added_.size(); ++i) {
      const AddedToken& token = added_[i];
      if (added_by_id_.at(token.id) != i) continue;  // replaced by a later entry
      (token.normalized ? normalized_matcher_ : raw_matcher_).add(token.match_form, i);
    }
    token_count_ = vocab_.size();
    for (const auto& [content, index] : added_by_content_) {
      if (!vocab_.contains(content)) ++token_count_;
    }
    vocab_size_ = max_id_plus_one;
    for (unsigned b = 0; b < 256; ++b) {
      static constexpr char kHex[] = "0123456789ABCDEF";
      const std::string name = std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
      const auto found = vocab_.find(name);
      byte_fallback_id_[b] = found == vocab_.end() ? -1 : found->second;
    }
  }

  // ---- encoding ---------------------------------------------------------------------------------

  std::string normalize(std::string text) const {
    using namespace tokenizer_json_detail;
    using Kind = NormalizerStep::Kind;
    for (const NormalizerStep& step : normalizer_) {
      switch (step.kind) {
        case Kind::Unicode:
          text = unicode_normalize(text, step.form);
          break;
        case Kind::Prepend:
          if (!text.empty()) text = step.text + text;
          break;
        case Kind::Replace:
          text = replace_all(step.pattern, text, step.text);
          break;
        case Kind::Strip: {
          std::size_t begin = 0, end = text.size(), length = 0;
          if (step.strip_left) {
            while (begin < end && unicode::is_whitespace(code_point_at(text, begin, length))) begin += length;
          }
          if (step.strip_right) {
            while (end > begin) {
              std::size_t start = end - 1;
              while (start > begin && (static_cast<unsigned char>(text[start]) & 0xc0) == 0x80) --start;
              if (!unicode::is_whitespace(code_point_at(text, start, length))) break;
              end = start;
            }
          }
          text = text.substr(begin, end - begin);
          break;
        }
        case Kind::ByteLevel:
          text = to_byte_level(text);
          break;
      }
    }
    return text;
  }

  /// Splits `text` at the matches of `matcher`, with tokenizers' single_word / lstrip / rstrip
  /// rules (AddedVocabulary::find_matches). Pieces are (begin, end, token index or npos).
  struct Cut {
    std::size_t begin, end, token;
  };
  std::vector<Cut> find_added(std::string_view text, const tokenizer_json_detail::AddedTokenMatcher& matcher) const {
    using namespace tokenizer_json_detail;
    constexpr std::size_t kNone = static_cast<std::size_t>(-1);
    std::vector<Cut> cuts;
    if (text.empty()) return {{0, 0, kNone}};
    if (matcher.empty()) return {{0, text.size(), kNone}};
    const auto last_char_is_word = [&](std::size_t end) {  // \w$ on text[..end]
      if (end == 0) return false;
      std::size_t start = end - 1, length = 0;
      while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xc0) == 0x80) --start;
      return is_word_char(code_point_at(text, start, length));
    };
    const auto first_char_is_word = [&](std::size_t begin) {  // ^\w on text[begin..]
      std::size_t length = 0;
      return begin < text.size() && is_word_char(code_point_at(text, begin, length));
    };
    std::size_t start_offset = 0;
    for (std::size_t from = 0; from < text.size();) {
      const auto match = matcher.next(text, from);
      if (!match) break;
      from = match->end;
      std::size_t start = match->start, stop = match->end;
      const AddedToken& token = added_[match->token_index];
      if (token.single_word) {
        const bool start_space = start == 0 || !last_char_is_word(start);
        const bool stop_space = stop == text.size() || !first_char_is_word(stop);
        if (!start_space || !stop_space) continue;
      }
      if (token.lstrip) {
        std::size_t new_start = start, length = 0;
        while (new_start > 0) {
          std::size_t prev = new_start - 1;
          while (prev > 0 && (static_cast<unsigned char>(text[prev]) & 0xc0) == 0x80) --prev;
          if (!unicode::is_whitespace(code_point_at(text, prev, length))) break;
          new_start = prev;
        }
        start = std::max(new_start, start_offset);
      }
      if (token.rstrip) {
        std::size_t length = 0;
        while (stop < text.size() && unicode::is_whitespace(code_point_at(text, stop, length))) stop += length;
      }
      if (start_offset < start) cuts.push_back({start_offset, start, kNone});
      cuts.push_back({start, stop, match->token_index});
      start_offset = stop;
    }
    if (start_offset != text.size()) cuts.push_back({start_offset, text.size(), kNone});
    return cuts;
  }

  /// AddedVocabulary::extract_and_normalize: raw added tokens, then the normalizer on each
  /// remaining piece, then normalized added tokens. Empty pieces are dropped.
  std::vector<Piece> extract_and_normalize(const std::string& text) const {
    std::vector<Piece> pieces;
    for (const Cut& cut : find_added(text, raw_matcher_)) {
      if (cut.end <= cut.begin) continue;
      if (cut.token != static_cast<std::size_t>(-1)) {
        pieces.push_back({text.substr(cut.begin, cut.end - cut.begin), added_[cut.token].id, false});
        continue;
      }
      const std::string normalized = normalize(text.substr(cut.begin, cut.end - cut.begin));
      for (const Cut& inner : find_added(normalized, normalized_matcher_)) {
        if (inner.end <= inner.begin) continue;
        Piece piece{normalized.substr(inner.begin, inner.end - inner.begin), -1, cut.begin == 0 && inner.begin == 0};
        if (inner.token != static_cast<std::size_t>(-1)) piece.id = added_[inner.token].id;
        pieces.push_back(std::move(piece));
      }
    }
    return pieces;
  }

  static void split_piece(const Piece& piece, const std::vector<tokenizer_json_detail::Span>& spans,
                          tokenizer_json_detail::SplitBehavior behavior, std::vector<Piece>& out) {
    for (const auto& [begin, end] : tokenizer_json_detail::apply_behavior(spans, behavior)) {
      if (end <= begin) continue;
      out.push_back({piece.text.substr(begin, end - begin), -1, piece.at_start && begin == 0});
    }
  }

  void pre_tokenize(const PreTokenizerStep& step, std::vector<Piece>& pieces) const {
    using namespace tokenizer_json_detail;
    using Kind = PreTokenizerStep::Kind;
    std::vector<Piece> out;
    out.reserve(pieces.size() * 2);
    for (Piece& piece : pieces) {
      if (piece.id >= 0) {
        out.push_back(std::move(piece));
        continue;
      }
      switch (step.kind) {
        case Kind::Split: {
          std::vector<Span> spans = step.pattern.find_matches(piece.text);
          if (step.invert)
            for (Span& s : spans) s.is_match = !s.is_match;
          split_piece(piece, spans, step.behavior, out);
          break;
        }
        case Kind::ByteLevel: {
          if (step.add_prefix_space && !piece.text.starts_with(' ')) piece.text.insert(0, 1, ' ');
          const std::size_t first = out.size();
          if (step.use_regex) {
            split_piece(piece, step.pattern.find_matches(piece.text), SplitBehavior::Isolated, out);
          } else if (!piece.text.empty()) {
            out.push_back(std::move(piece));
          }
          for (std::size_t i = first; i < out.size(); ++i) out[i].text = to_byte_level(out[i].text);
          break;
        }
        case Kind::Metaspace: {
          piece.text = replace_all(Pattern{false, " ", {}}, piece.text, step.replacement);
          const bool prepend = step.prepend_scheme == PrependScheme::Always ||
                               (step.prepend_scheme == PrependScheme::First && piece.at_start);
          if (prepend && !piece.text.starts_with(step.replacement)) piece.text = step.replacement + piece.text;
          if (step.split) {
            split_piece(piece, Pattern{false, step.replacement, {}}.find_matches(piece.text), SplitBehavior::MergedWithNext, out);
          } else if (!piece.text.empty()) {
            out.push_back(std::move(piece));
          }
          break;
        }
        case Kind::Digits:
          split_piece(piece, find_char_matches(piece.text, is_numeric_char),
                      step.individual_digits ? SplitBehavior::Isolated : SplitBehavior::Contiguous, out);
          break;
        case Kind::WhitespaceSplit:
          split_piece(piece, find_char_matches(piece.text, unicode::is_whitespace), SplitBehavior::Removed, out);
          break;
      }
    }
    pieces = std::move(out);
  }

  /// The BPE model on one pre-token (models/bpe/model.rs: tokenize_with_cache, merge_word).
  void tokenize(const std::string& piece, std::vector<std::int32_t>& out) const {
    if (piece.empty()) return;
    if (ignore_merges_) {
      if (const auto found = vocab_.find(piece); found != vocab_.end()) {
        out.push_back(found->second);
        return;
      }
    }
    const bool cacheable = piece.size() <= kMaxCachedPieceBytes;
    if (cacheable) {
      std::lock_guard lock(cache_->mutex);
      if (const auto found = cache_->pieces.find(piece); found != cache_->pieces.end()) {
        out.insert(out.end(), found->second.begin(), found->second.end());
        return;
      }
    }
    std::vector<std::int32_t> ids = merge_word(piece);
    out.insert(out.end(), ids.begin(), ids.end());
    if (cacheable) {
      std::lock_guard lock(cache_->mutex);
      if (cache_->pieces.size() >= kMaxCachedPieces) cache_->pieces.clear();
      cache_->pieces.emplace(piece, std::move(ids));
    }
  }

  struct Symbol {
    std::int32_t c;
    std::ptrdiff_t prev, next;
    std::size_t length;
  };

  std::vector<std::int32_t> merge_word(const std::string& word) const {
    using tokenizer_json_detail::char_length;
    std::vector<Symbol> symbols;
    symbols.reserve(word.size());
    const auto add = [&](std::int32_t id, std::size_t length) {
      const auto n = static_cast<std::ptrdiff_t>(symbols.size());
      if (!symbols.empty()) symbols.back().next = n;
      symbols.push_back({id, n - 1, -1, length});
    };
    std::int32_t unk_id = -1;  // an unknown run waiting to be added (fuse_unk), and its bytes
    std::size_t unk_length = 0;
    const auto lookup_unk = [&]() -> std::int32_t {
      const auto found = vocab_.find(*unk_token_);
      if (found == vocab_.end()) throw Error("TokenizerJson: model.unk_token '" + *unk_token_ + "' is not in model.vocab");
      return found->second;
    };
    std::string s;
    for (std::size_t i = 0; i < word.size();) {
      const std::size_t length = std::min(char_length(static_cast<unsigned char>(word[i])), word.size() - i);
      const bool is_first = i == 0, is_last = i + length >= word.size();
      s.assign(word, i, length);
      i += length;
      if (!is_first && !subword_prefix_.empty()) s.insert(0, subword_prefix_);
      if (is_last && !word_suffix_.empty()) s += word_suffix_;
      if (const auto found = vocab_.find(s); found != vocab_.end()) {
        if (unk_id >= 0) {
          add(unk_id, unk_length);
          unk_id = -1;
        }
        add(found->second, length);
        continue;
      }
      if (byte_fallback_) {
        const bool all = std::all_of(s.begin(), s.end(), [&](char c) { return byte_fallback_id_[static_cast<unsigned char>(c)] >= 0; });
        if (all) {
          // (tokenizers adds these without flushing a pending unk first; so do we)
          for (const char c : s) add(byte_fallback_id_[static_cast<unsigned char>(c)], 1);
          continue;
        }
      }
      if (unk_token_) {
        if (unk_id >= 0 && fuse_unk_) {
          unk_length += length;
        } else {
          if (unk_id >= 0) add(unk_id, unk_length);
          unk_id = lookup_unk();
          unk_length = length;
        }
      }
    }
    if (unk_id >= 0) add(unk_id, unk_length);
    merge_all(symbols);
    std::vector<std::int32_t> ids;
    ids.reserve(symbols.size());
    for (const Symbol& symbol : symbols)
      if (symbol.length != 0) ids.push_back(symbol.c);
    return ids;
  }

  /// Word::merge_all (models/bpe/word.rs) without dropout: a queue ordered by (rank, position),
  /// stale entries skipped when the pair at their position no longer merges into their id.
  void merge_all(std::vector<Symbol>& symbols) const {
    struct Candidate {
      std::size_t pos;
      std::int32_t rank, new_id;
    };
    const auto later = [](const Candidate& a, const Candidate& b) {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> queue(later);
    const auto lookup = [&](std::int32_t left, std::int32_t right) -> const Merge* {
      const auto found = merges_.find(pair_key(left, right));
      return found == merges_.end() ? nullptr : &found->second;
    };
    for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
      if (const Merge* m = lookup(symbols[i].c, symbols[i + 1].c)) queue.push({i, m->rank, m->merged_id});
    }
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& current = symbols[top.pos];
      if (current.length == 0 || current.next == -1) continue;
      const auto next_pos = static_cast<std::size_t>(current.next);
      const Symbol right = symbols[next_pos];
      const Merge* target = lookup(current.c, right.c);
      if (target == nullptr || target->merged_id != top.new_id) continue;
      current.c = top.new_id;
      current.length += right.length;
      current.next = right.next;
      symbols[next_pos].length = 0;
      if (right.next > -1 && static_cast<std::size_t>(right.next) < symbols.size()) {
        symbols[static_cast<std::size_t>(right.next)].prev = static_cast<std::ptrdiff_t>(top.pos);
      }
      if (current.prev >= 0) {
        const auto prev = static_cast<std::size_t>(current.prev);
        if (const Merge* m = lookup(symbols[prev].c, current.c)) queue.push({prev, m->rank, m->merged_id});
      }
      if (current.next >= 0 && static_cast<std::size_t>(current.next) < symbols.size()) {
        if (const Merge* m = lookup(current.c, symbols[static_cast<std::size_t>(current.next)].c)) {
          queue.push({top.pos, m->rank, m->merged_id});
        }
      }
    }
  }

  // ---- decoding ---------------------------------------------------------------------------------

  static std::vector<std::string> apply_decoder(const DecoderStep& step, std::vector<std::string> tokens) {
    using namespace tokenizer_json_detail;
    using Kind = DecoderStep::Kind;
    switch (step.kind) {
      case Kind::ByteLevel: {
        std::string bytes;
        for (const std::string& token : tokens) {
          std::string mapped;
          bool all = true;
          std::size_t length = 0;
          for (std::size_t i = 0; i < token.size() && all; i += length) {
            const int b = byte_of_byte_level_char(code_point_at(token, i, length));
            if (b < 0) all = false;
            else mapped.push_back(static_cast<char>(b));
          }
          bytes += all ? mapped : token;
        }
        return {to_valid_utf8(bytes)};
      }
      case Kind::Replace:
        for (std::string& token : tokens) token = replace_all(step.pattern, token, step.content);
        return tokens;
      case Kind::ByteFallback: {
        std::vector<std::string> out;
        std::string pending;  // bytes of consecutive <0xNN> tokens
        const auto flush = [&] {
          if (pending.empty()) return;
          if (is_valid_utf8(pending)) {
            out.push_back(pending);
          } else {
            for (std::size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
          }
          pending.clear();
        };
        for (std::string& token : tokens) {
          int byte = -1;
          if (token.size() == 6 && token.starts_with("<0x") && token.ends_with('>')) byte = hex_byte(token[3], token[4]);
          if (byte >= 0) {
            pending.push_back(static_cast<char>(byte));
          } else {
            flush();
            out.push_back(std::move(token));
          }
        }
        flush();
        return out;
      }
      case Kind::Fuse: {
        std::string joined;
        for (const std::string& token : tokens) joined += token;
        return {joined};
      }
      case Kind::Strip:
        for (std::string& token : tokens) {
          const std::vector<char32_t> cps = code_points(token);
          std::size_t start_cut = 0;
          for (std::size_t i = 0; i < std::min(step.strip_start, cps.size()) && cps[i] == step.strip_char; ++i) start_cut = i + 1;
          std::size_t stop_cut = cps.size();
          for (std::size_t i = 0; i < std::min(step.strip_stop, cps.size()); ++i) {
            const std::size_t index = cps.size() - i - 1;
            if (cps[index] != step.strip_char) break;
            stop_cut = index;
          }
          std::string stripped;
          for (std::size_t i = start_cut; i < std::max(start_cut, stop_cut); ++i) unicode::append_utf8(stripped, cps[i]);
          token = std::move(stripped);
        }
        return tokens;
      case Kind::Metaspace:
        for (std::size_t i = 0; i < tokens.size(); ++i) {
          std::string decoded;
          for (const char32_t cp : code_points(tokens[i])) {
            if (cp != step.replacement) {
              unicode::append_utf8(decoded, cp);
            } else if (i != 0 || step.prepend_scheme == PrependScheme::Never) {
              decoded += ' ';
            }
          }
          tokens[i] = std::move(decoded);
        }
        return tokens;
    }
    return tokens;
  }

  /// u8::from_str_radix(.., 16) on two characters: hex digits of either case (or '+' and one
  /// digit, which Rust accepts too), else -1.
  static int hex_byte(char high, char low) noexcept {
    const auto digit = [](char c) {
      return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    };
    const int h = high == '+' ? 0 : digit(high), l = digit(low);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
  }

  // model
  std::unordered_map<std::string, std::int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> id_present_;
  std::unordered_map<std::uint64_t, Merge> merges_;
  std::optional<std::string> unk_token_;
  std::string subword_prefix_, word_suffix_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  std::array<std::int32_t, 256> byte_fallback_id_{};
  // pipeline
  std::vector<NormalizerStep> normalizer_;
  bool has_normalizer_ = false;
  std::vector<PreTokenizerStep> pre_tokenizer_;
  std::vector<DecoderStep> decoder_;
  bool has_decoder_ = false;
  std::vector<TemplateItem> template_;
  bool has_template_ = false;
  // added tokens
  std::vector<AddedToken> added_;
  std::unordered_map<std::string, std::size_t> added_by_content_;
  std::unordered_map<std::int32_t, std::size_t> added_by_id_;
  std::unordered_set<std::string> special_contents_;
  tokenizer_json_detail::AddedTokenMatcher raw_matcher_, normalized_matcher_;
  std::size_t vocab_size_ = 0, token_count_ = 0;
  std::unique_ptr<Cache> cache_;  // behind a pointer: the mutex would make the class immovable
};

}  // namespace zo2::io
