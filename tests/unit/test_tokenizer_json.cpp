// Tests for zo2/io/tokenizer_json.hpp and zo2/io/tokenizer.hpp (load_tokenizer).
//
// The reference ids and decodings come from the Hugging Face `tokenizers` library
// (tests/fixtures/tokenizer_json/make_fixtures.py): small tokenizer.json files it built and
// trained in the Qwen2, LLaMA-3, LLaMA-2 (legacy), Mistral and Metaspace (always, never)
// configurations, plus one with the steps these families do not use (misc), and
// what it makes of every probe. Built with zo2::tokenizers (PCRE2 + utf8proc) these check the
// reader; built without (tokenizer_json_without), they check what such a build still does.
#include <doctest/doctest.h>

#include <zo2/io/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const fs::path kFixtures = fs::path(ZO2_TEST_DATA_DIR) / "tokenizer_json";
const fs::path kBpeFixture = fs::path(ZO2_TEST_DATA_DIR) / "tokenizer";
const char* const kNames[] = {"qwen2", "llama3", "llama2", "mistral", "metaspace", "metaspace_never", "misc"};

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

[[maybe_unused]] void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  REQUIRE(out.good());
}

class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() / ("zo2_test_tokjson_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path operator/(const std::string& name) const { return path_ / name; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string show(const std::vector<std::int32_t>& ids) {
  std::string s = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  return s + "]";
}

std::vector<std::int32_t> ids_of(const json& value) { return value.get<std::vector<std::int32_t>>(); }

/// The FileError an action throws (fails the test if it throws nothing or something else).
zo2::FileError file_error(const std::function<void()>& action) {
  try {
    action();
  } catch (const zo2::FileError& e) {
    return e;
  } catch (const std::exception& e) {
    FAIL("expected a zo2::FileError, got: " << e.what());
  }
  FAIL("expected a zo2::FileError, nothing was thrown");
  return zo2::FileError("", "");
}

void copy_bpe_fixture(const TempDir& dir) {
  fs::copy_file(kBpeFixture / "vocab.json", dir / "vocab.json");
  fs::copy_file(kBpeFixture / "merges.txt", dir / "merges.txt");
}

}  // namespace

// ---- what every build does ------------------------------------------------------------------

TEST_CASE("load_tokenizer: vocab.json + merges.txt give BpeTokenizer's ids, as before") {
  const json expected = json::parse(read_file(kBpeFixture / "expected.json"));
  const zo2::io::Tokenizer tokenizer = zo2::io::load_tokenizer(kBpeFixture);
  CHECK(tokenizer.format() == zo2::io::TokenizerFormat::VocabMerges);
  REQUIRE(tokenizer.bpe() != nullptr);
  const zo2::io::BpeTokenizer direct = zo2::io::BpeTokenizer::from_directory(kBpeFixture);
  CHECK(tokenizer.vocab_size() == direct.vocab_size());
  CHECK(tokenizer.bos_id() == std::optional<std::int32_t>(2));
  for (const json& c : expected["cases"]) {
    const std::string text = c["text"].get<std::string>();
    CAPTURE(text);
    CHECK(show(tokenizer.encode(text)) == show(ids_of(c["ids"])));
    std::vector<std::int32_t> with_bos = ids_of(c["ids"]);
    with_bos.insert(with_bos.begin(), 2);
    CHECK(show(tokenizer.encode(text, true)) == show(with_bos));
    CHECK(tokenizer.decode(tokenizer.encode(text)) == text);
  }
  // skip_special_tokens leaves out OPT's special tokens
  const auto ids = tokenizer.encode("a</s>b<pad>", true);
  CHECK(tokenizer.decode(ids) == "</s>a</s>b<pad>");
  CHECK(tokenizer.decode(ids, true) == "ab");
}

TEST_CASE("load_tokenizer: a directory with neither format, or half of vocab.json + merges.txt") {
  TempDir dir;
  const zo2::FileError none = file_error([&] { (void)zo2::io::load_tokenizer(dir.path()); });
  CHECK(none.path() == dir.path().string());
  CHECK(std::string(none.what()).find("no tokenizer.json, nor vocab.json + merges.txt") != std::string::npos);
  fs::copy_file(kBpeFixture / "vocab.json", dir / "vocab.json");
  const zo2::FileError half = file_error([&] { (void)zo2::io::load_tokenizer(dir.path()); });
  CHECK(half.path() == (dir / "merges.txt").string());
}

#if !ZO2_TOKENIZER_JSON_ENABLED

TEST_CASE("without the tokenizer.json reader: a clear error, and vocab.json + merges.txt still work") {
  CHECK_FALSE(zo2::io::kTokenizerJsonAvailable);
  const zo2::FileError error = file_error([] { (void)zo2::io::load_tokenizer(kFixtures / "qwen2"); });
  CHECK(error.path() == (kFixtures / "qwen2" / "tokenizer.json").string());
  const std::string message = error.what();
  CHECK(message.find("no tokenizer.json reader") != std::string::npos);
  CHECK(message.find("libpcre2-dev libutf8proc-dev") != std::string::npos);
  CHECK(message.find("zo2::tokenizers") != std::string::npos);

  // A directory with both formats falls back to vocab.json + merges.txt.
  TempDir dir;
  copy_bpe_fixture(dir);
  fs::copy_file(kFixtures / "qwen2" / "tokenizer.json", dir / "tokenizer.json");
  const zo2::io::Tokenizer tokenizer = zo2::io::load_tokenizer(dir.path());
  CHECK(tokenizer.format() == zo2::io::TokenizerFormat::VocabMerges);
  CHECK(tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world");
}

#else  // the reader is built in

using zo2::io::TokenizerJson;

/// Compares every tokenizer, probe and decode of an expected file (make_fixtures.py's format)
/// with what zo2 makes of them; returns the tokenizers' names.
std::vector<std::string> check_expected(const fs::path& expected_file) {
  const json expected = json::parse(read_file(expected_file));
  const json& probes = expected["probes"];
  std::vector<std::string> names;
  for (const auto& [name, reference] : expected["tokenizers"].items()) {
    CAPTURE(name);
    names.push_back(name);
    const TokenizerJson tokenizer = TokenizerJson::from_directory(kFixtures / name);
    CHECK(tokenizer.token_count() == reference["vocab_size"].get<std::size_t>());
    for (std::size_t i = 0; i < reference["results"].size(); ++i) {
      const json& result = reference["results"][i];
      const std::string text = probes[i].get<std::string>();
      CAPTURE(i);
      CAPTURE(text);
      const std::vector<std::int32_t> ids = ids_of(result["ids"]);
      const std::vector<std::int32_t> with_special = result.contains("ids_with_special") ? ids_of(result["ids_with_special"]) : ids;
      const std::string decoded = result.value("decoded", text);
      const std::string decoded_skip = result.value("decoded_skip_special", decoded);
      CHECK(show(tokenizer.encode(text)) == show(ids));
      CHECK(show(tokenizer.encode(text, true)) == show(with_special));
      CHECK(tokenizer.decode(ids) == decoded);
      CHECK(tokenizer.decode(with_special, true) == decoded_skip);
    }
    for (const json& d : reference["decodes"]) {
      const std::vector<std::int32_t> ids = ids_of(d["ids"]);
      CAPTURE(show(ids));
      const std::string text = d["text"].get<std::string>();
      CHECK(tokenizer.decode(ids) == text);
      CHECK(tokenizer.decode(ids, true) == d.value("text_skip_special", text));
    }
  }
  return names;
}

TEST_CASE("tokenizer.json: ids and decodings equal the tokenizers library's on every probe") {
  const std::vector<std::string> names = check_expected(kFixtures / "expected.json");
  CHECK(names.size() == std::size(kNames));
  for (const char* name : kNames) CHECK(std::find(names.begin(), names.end(), name) != names.end());
}

// `make_fixtures.py --every-code-point OUT.json` records tokenizers' ids for every code point;
// ZO2_TOKENIZER_JSON_EXPECTED=OUT.json compares them here (a check by hand: ~1 GB of memory).
TEST_CASE("tokenizer.json: the file ZO2_TOKENIZER_JSON_EXPECTED names, when set") {
  const char* extra = std::getenv("ZO2_TOKENIZER_JSON_EXPECTED");
  if (extra == nullptr || *extra == '\0') return;
  MESSAGE("checking " << std::string(extra));
  (void)check_expected(extra);
}

TEST_CASE("tokenizer.json: bos, special tokens, vocabulary") {
  const TokenizerJson qwen2 = TokenizerJson::from_directory(kFixtures / "qwen2");
  const TokenizerJson llama3 = TokenizerJson::from_directory(kFixtures / "llama3");
  const TokenizerJson llama2 = TokenizerJson::from_directory(kFixtures / "llama2");
  CHECK_FALSE(qwen2.bos_id().has_value());  // Qwen adds no bos
  REQUIRE(llama3.bos_id().has_value());
  CHECK(llama3.bos_id() == llama3.token_to_id("<|begin_of_text|>"));
  CHECK(llama2.bos_id() == std::optional<std::int32_t>(1));
  CHECK(llama2.token_to_id("<0x41>").has_value());
  CHECK(llama2.id_to_token(1) == std::optional<std::string>("<s>"));
  const std::int32_t im_end = *qwen2.token_to_id("<|im_end|>");
  CHECK(qwen2.is_special(im_end));
  CHECK_FALSE(qwen2.is_special(*qwen2.token_to_id("<think>")));  // an added token, not special
  CHECK(qwen2.vocab_size() == static_cast<std::size_t>(*qwen2.token_to_id("naïve")) + 1);
  CHECK_THROWS_AS(qwen2.decode(std::vector<std::int32_t>{static_cast<std::int32_t>(qwen2.vocab_size())}), zo2::Error);
  CHECK_THROWS_AS(qwen2.decode(std::vector<std::int32_t>{-1}), zo2::Error);
}

TEST_CASE("tokenizer.json: text that is not UTF-8 is read as Rust's from_utf8_lossy reads it") {
  const TokenizerJson qwen2 = TokenizerJson::from_directory(kFixtures / "qwen2");
  const TokenizerJson llama2 = TokenizerJson::from_directory(kFixtures / "llama2");
  const std::string fffd = "\xEF\xBF\xBD";
  for (const TokenizerJson* t : {&qwen2, &llama2}) {
    // a lone continuation byte, a cut 3-byte sequence (one U+FFFD for its maximal subpart), a
    // surrogate's encoding (three), an overlong '/' (two), a byte that never starts a character
    CHECK(show(t->encode("a\x80z")) == show(t->encode("a" + fffd + "z")));
    CHECK(show(t->encode("a\xE4\xB8z")) == show(t->encode("a" + fffd + "z")));
    CHECK(show(t->encode("a\xED\xA0\x80z")) == show(t->encode("a" + fffd + fffd + fffd + "z")));
    CHECK(show(t->encode("a\xC0\xAFz")) == show(t->encode("a" + fffd + fffd + "z")));
    CHECK(show(t->encode("\xFF")) == show(t->encode(fffd)));
  }
}

TEST_CASE("tokenizer.json: Oniguruma escapes are translated for PCRE2") {
  using zo2::io::tokenizer_json_detail::oniguruma_to_pcre2;
  CHECK(oniguruma_to_pcre2(R"(\s+(?!\S))") == R"(\p{White_Space}+(?!\P{White_Space}))");
  CHECK(oniguruma_to_pcre2(R"([^\s\p{L}\p{N}]+)") == R"([^\p{White_Space}\p{L}\p{N}]+)");
  CHECK(oniguruma_to_pcre2(R"(\w+|[\w-])") == R"([\p{Alphabetic}\p{M}\p{N}\p{Pc}]+|[\p{Alphabetic}\p{M}\p{N}\p{Pc}-])");
  CHECK(oniguruma_to_pcre2(R"(\h\\s\p{N}{1,3})") == R"([0-9a-fA-F]\\s\p{N}{1,3})");
  CHECK(oniguruma_to_pcre2(R"([\u4e00-\u9FA5]+\u12)") == R"([\x{4e00}-\x{9FA5}]+\u12)");
  // U+0085 is White_Space (Oniguruma's \s), U+180E is not (PCRE2's \s has it)
  const zo2::io::tokenizer_json_detail::Regex space(R"(\s)");
  const auto matches = space.find_all("a\xC2\x85" "b\xE1\xA0\x8E" "c");
  REQUIRE(matches.size() == 1);
  CHECK(matches[0] == std::pair<std::size_t, std::size_t>(1, 3));
}

// The expected strings are what tokenizers 0.23.3's normalizers return (normalize_str); utf8proc
// alone would reorder U+08D0 (class 220) before U+0300, map U+32FF to 令和, compose U+11938 and
// move U+1ABF (class 220) and U+07FD (220) by their classes.
TEST_CASE("tokenizer.json: normalization leaves alone what tokenizers' older tables do not know") {
  using zo2::io::tokenizer_json_detail::is_normalization_barrier;
  using zo2::io::tokenizer_json_detail::kNormalizationBarriers;
  using zo2::io::tokenizer_json_detail::NormalForm;
  using zo2::io::tokenizer_json_detail::unicode_normalize;
  for (std::size_t r = 0; r < kNormalizationBarriers.size(); ++r) {  // sorted, apart, not empty
    CHECK(kNormalizationBarriers[r].first <= kNormalizationBarriers[r].last);
    if (r > 0) CHECK(kNormalizationBarriers[r - 1].last + 1 < kNormalizationBarriers[r].first);
  }
  CHECK(is_normalization_barrier(U'\u08D0'));
  CHECK(is_normalization_barrier(U'\u0898'));
  CHECK(is_normalization_barrier(U'\u089F'));
  CHECK_FALSE(is_normalization_barrier(U'\u0897'));
  CHECK_FALSE(is_normalization_barrier(U'\u0301'));
  CHECK_FALSE(is_normalization_barrier(U'a'));
  CHECK(is_normalization_barrier(U'\U0001FBF9'));
  CHECK_FALSE(is_normalization_barrier(U'\U0001FBFA'));
  CHECK_FALSE(is_normalization_barrier(U'\U0010FFFF'));

  CHECK(unicode_normalize("\u30ca\u0300\u0301\u08d0", NormalForm::NFC) == "\u30ca\u0300\u0301\u08d0");
  CHECK(unicode_normalize("\u00e9\u1abf\u0316", NormalForm::NFD) == "e\u0301\u1abf\u0316");
  CHECK(unicode_normalize("\u32ff\u00bd", NormalForm::NFKC) == "\u32ff" "1\u2044" "2");
  CHECK(unicode_normalize("\U00011935\U00011930", NormalForm::NFC) == "\U00011935\U00011930");
  CHECK(unicode_normalize("x\U0001fbf5\ufb01", NormalForm::NFKD) == "x\U0001fbf5" "fi");
  CHECK(unicode_normalize("e\u0301\u07fd\u0316\u0301", NormalForm::NFC) == "\u00e9\u07fd\u0316\u0301");
  // with nothing of the table in it, the text is utf8proc's normal form as a whole
  CHECK(unicode_normalize("e\u0316\u0301 A\u030a", NormalForm::NFC) == "\u00e9\u0316 \u00c5");
}

TEST_CASE("tokenizer.json: encoding from several threads at once gives the same ids") {
  const TokenizerJson llama3 = TokenizerJson::from_directory(kFixtures / "llama3");
  const std::string text = "The quick brown fox, 12345 times: 机器学习 😀 It's DON'T <|eot_id|>\r\n";
  const std::vector<std::int32_t> reference = llama3.encode(text);
  std::vector<std::vector<std::int32_t>> results(4);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < results.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 50; ++k) results[t] = llama3.encode(text + std::to_string(k % 3));
      results[t] = llama3.encode(text);
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const auto& r : results) CHECK(show(r) == show(reference));
}

TEST_CASE("load_tokenizer: tokenizer.json when the directory has one") {
  CHECK(zo2::io::kTokenizerJsonAvailable);
  for (const char* name : kNames) {
    CAPTURE(name);
    const zo2::io::Tokenizer tokenizer = zo2::io::load_tokenizer(kFixtures / name);
    CHECK(tokenizer.format() == zo2::io::TokenizerFormat::TokenizerJson);
    REQUIRE(tokenizer.tokenizer_json() != nullptr);
    const TokenizerJson direct = TokenizerJson::from_directory(kFixtures / name);
    const std::string text = "Hello <s> world, 12345! Über 𝐀𝐁 <|im_end|>";
    CHECK(show(tokenizer.encode(text, true)) == show(direct.encode(text, true)));
    CHECK(tokenizer.bos_id() == direct.bos_id());
    CHECK(tokenizer.vocab_size() == direct.vocab_size());
    CHECK(tokenizer.decode(tokenizer.encode(text), true) == direct.decode(direct.encode(text), true));
    CHECK(tokenizer.description().find("tokenizer.json") == 0);
  }
  // Beside vocab.json + merges.txt, tokenizer.json wins unless told otherwise.
  TempDir dir;
  copy_bpe_fixture(dir);
  fs::copy_file(kFixtures / "qwen2" / "tokenizer.json", dir / "tokenizer.json");
  CHECK(zo2::io::load_tokenizer(dir.path()).format() == zo2::io::TokenizerFormat::TokenizerJson);
  zo2::io::LoadTokenizerOptions options;
  options.prefer_tokenizer_json = false;
  CHECK(zo2::io::load_tokenizer(dir.path(), options).format() == zo2::io::TokenizerFormat::VocabMerges);
}

TEST_CASE("tokenizer.json: a malformed or unsupported file is a FileError naming the file and field") {
  TempDir dir;
  const fs::path file = dir / "tokenizer.json";
  const json qwen2 = json::parse(read_file(kFixtures / "qwen2" / "tokenizer.json"));
  const json llama2 = json::parse(read_file(kFixtures / "llama2" / "tokenizer.json"));
  const json mistral = json::parse(read_file(kFixtures / "mistral" / "tokenizer.json"));
  const auto expect = [&](const std::string& content, const std::string& needle) {
    CAPTURE(needle);
    write_file(file, content);
    const zo2::FileError error = file_error([&] { (void)TokenizerJson::from_file(file); });
    CHECK(error.path() == file.string());
    CHECK(std::string(error.what()).find(needle) != std::string::npos);
    CHECK(std::string(error.what()).find(file.string()) == 0);
  };
  const auto mutated = [](json j, const std::function<void(json&)>& edit) {
    edit(j);
    return j.dump();
  };

  expect("{\"model\": ", "not valid JSON");
  expect("{\"model\": " + std::string(100000, '[') + std::string(100000, ']') + "}", "nested more than");
  expect("[1, 2]", "expected a JSON object");
  expect(mutated(qwen2, [](json& j) { j.erase("model"); }), "field 'model': missing");
  expect(mutated(qwen2, [](json& j) { j["version"] = "2.0"; }), "field 'version'");
  expect(mutated(qwen2, [](json& j) { j["model"]["type"] = "WordPiece"; }), "field 'model.type': 'WordPiece' is not supported");
  expect(mutated(qwen2, [](json& j) { j["model"]["dropout"] = 0.1; }), "field 'model.dropout'");
  expect(mutated(qwen2, [](json& j) { j["model"].erase("vocab"); }), "field 'model.vocab': missing");
  expect(mutated(qwen2, [](json& j) { j["model"]["vocab"]["!"] = -1; }), "field 'model.vocab['!']'");
  expect(mutated(qwen2, [](json& j) { j["model"]["vocab"]["!"] = 1 << 30; }), "field 'model.vocab['!']'");
  expect(mutated(qwen2, [](json& j) { j["model"]["vocab"]["!"] = j["model"]["vocab"]["\""]; }), "is also given to");
  expect(mutated(qwen2, [](json& j) { j["model"]["merges"][3] = json::array({"no-such", "token"}); }),
         "field 'model.merges[3]': token 'no-such' is not in model.vocab");
  expect(mutated(llama2, [](json& j) { j["model"]["merges"][0] = "a b c"; }), "field 'model.merges[0]'");
  expect(mutated(qwen2, [](json& j) { j["model"]["merges"][1] = 42; }), "field 'model.merges[1]'");
  expect(mutated(qwen2, [](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(\\p{L}"; }),
         "field 'pre_tokenizer.pretokenizers[0].pattern.Regex': regex /(\\p{L}/ does not compile");
  expect(mutated(qwen2, [](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = "x"; }),
         "field 'pre_tokenizer.pretokenizers[0].pattern'");
  expect(mutated(qwen2, [](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways"; }),
         "field 'pre_tokenizer.pretokenizers[0].behavior': 'Sideways'");
  expect(mutated(qwen2, [](json& j) { j["pre_tokenizer"]["pretokenizers"][1]["type"] = "BertPreTokenizer"; }),
         "field 'pre_tokenizer.pretokenizers[1].type': 'BertPreTokenizer' is not supported");
  expect(mutated(qwen2, [](json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }), "field 'normalizer.type': 'Lowercase'");
  expect(mutated(qwen2, [](json& j) { j["normalizer"] = {{"kind", "NFC"}}; }), "field 'normalizer.type': missing");
  expect(mutated(llama2, [](json& j) { j["decoder"]["decoders"][2]["type"] = "CTC"; }), "field 'decoder.decoders[2].type': 'CTC'");
  expect(mutated(llama2, [](json& j) { j["decoder"]["decoders"][3]["start"] = "one"; }), "field 'decoder.decoders[3].start'");
  expect(mutated(mistral, [](json& j) { j["pre_tokenizer"]["replacement"] = "ab"; }), "field 'pre_tokenizer.replacement': expected one character");
  expect(mutated(mistral, [](json& j) { j["pre_tokenizer"]["prepend_scheme"] = "sometimes"; }), "field 'pre_tokenizer.prepend_scheme'");
  expect(mutated(llama2, [](json& j) { j["post_processor"]["single"][0]["SpecialToken"]["id"] = "<nope>"; }),
         "field 'post_processor.special_tokens': has no entry '<nope>'");
  expect(mutated(llama2, [](json& j) { j["post_processor"]["type"] = "Magic"; }), "field 'post_processor.type': 'Magic'");
  expect(mutated(qwen2, [](json& j) { j["added_tokens"][0]["content"] = 5; }), "field 'added_tokens[0].content'");
  expect(mutated(qwen2, [](json& j) { j["added_tokens"][1]["special"] = "yes"; }), "field 'added_tokens[1].special'");

  const zo2::FileError missing = file_error([&] { (void)TokenizerJson::from_file(dir / "nothing.json"); });
  CHECK(missing.path() == (dir / "nothing.json").string());
}

#endif
