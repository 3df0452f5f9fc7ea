// Tests for zo2/io/bpe_tokenizer.hpp and zo2/io/unicode.hpp.
//
// The reference ids come from the Hugging Face `tokenizers` library
// (tests/fixtures/tokenizer/make_fixture.py): a byte-level BPE trained on a few KB of
// multilingual text, the ids it gives a set of test strings, and its pre-tokenization pieces.
#include <doctest/doctest.h>

#include <zo2/io/bpe_tokenizer.hpp>
#include <zo2/io/unicode.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using zo2::io::BpeTokenizer;

namespace {

const fs::path kFixtures = fs::path(ZO2_TEST_DATA_DIR) / "tokenizer";

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  REQUIRE(out.good());
}

/// GPT-2's bytes_to_unicode, transcribed from the Python original, to show pieces in the
/// alphabet the fixture uses.
std::string to_byte_level_alphabet(std::string_view bytes) {
  std::vector<int> printable;
  for (int b = '!'; b <= '~'; ++b) printable.push_back(b);
  for (int b = 0xa1; b <= 0xac; ++b) printable.push_back(b);
  for (int b = 0xae; b <= 0xff; ++b) printable.push_back(b);
  std::vector<char32_t> map(256);
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool is_printable = std::find(printable.begin(), printable.end(), b) != printable.end();
    map[b] = is_printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++);
  }
  std::string out;
  for (char c : bytes) zo2::io::unicode::append_utf8(out, map[static_cast<unsigned char>(c)]);
  return out;
}

class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("zo2_test_bpe_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
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

std::string file_error_message(const std::function<void()>& action) {
  try {
    action();
  } catch (const zo2::FileError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected zo2::FileError, got: " << e.what());
  }
  FAIL("expected zo2::FileError, nothing was thrown");
  return {};
}

}  // namespace

TEST_CASE("encode matches the tokenizers library on multilingual text; decode inverts it") {
  const BpeTokenizer tokenizer = BpeTokenizer::from_directory(kFixtures);
  const auto expected = nlohmann::json::parse(read_file(kFixtures / "expected.json"));
  CHECK(tokenizer.bos_id() == expected.at("bos_id").get<std::int32_t>());
  CHECK(tokenizer.vocab_size() == 1000);

  for (const auto& item : expected.at("cases")) {
    const std::string text = item.at("text").get<std::string>();
    const auto ids = item.at("ids").get<std::vector<std::int32_t>>();
    CAPTURE(text);
    CHECK(tokenizer.encode(text) == ids);
    CHECK(tokenizer.encode(text) == ids);  // again, now from the cache

    std::vector<std::int32_t> with_bos{expected.at("bos_id").get<std::int32_t>()};
    with_bos.insert(with_bos.end(), ids.begin(), ids.end());
    CHECK(tokenizer.encode(text, /*add_bos=*/true) == with_bos);
    CHECK(tokenizer.decode(ids) == text);

    const auto pieces = item.at("pieces").get<std::vector<std::string>>();
    if (!pieces.empty()) {
      std::vector<std::string> ours;
      for (std::string_view piece : zo2::io::gpt2_pre_tokenize(text)) ours.push_back(to_byte_level_alphabet(piece));
      CHECK(ours == pieces);
    }
  }
}

TEST_CASE("decode(encode(x)) == x for arbitrary bytes, invalid UTF-8 included") {
  const BpeTokenizer tokenizer = BpeTokenizer::from_directory(kFixtures);
  const std::vector<std::string> samples = {
      "\xff\xfe broken \xc3 utf-8 \xe2\x82",    // stray and cut-off sequences
      "\xc0\xaf overlong \xed\xa0\x80 surrogate",  // forms a decoder must refuse
      std::string("nul\0inside", 10),
      "</s></s><s>",
  };
  for (const std::string& text : samples) {
    CHECK(tokenizer.decode(tokenizer.encode(text)) == text);
  }
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::string text(rng() % 40, '\0');
    for (char& c : text) c = static_cast<char>(rng());
    REQUIRE(tokenizer.decode(tokenizer.encode(text)) == text);
  }
}

TEST_CASE("merges apply lowest rank first, every occurrence, left to right") {
  TempDir dir;
  // Ranks: "b c" before "a b", so "abc" becomes a|bc and then abc via the third merge.
  write_file(dir / "vocab.json",
             R"({"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4, "abc": 5, "aa": 6, "Ġ": 7, "Ġa": 8, "</s>": 9})");
  write_file(dir / "merges.txt", "#version: 0.2\nb c\na b\na bc\na a\nĠ a\n");
  const BpeTokenizer tokenizer = BpeTokenizer::from_directory(dir.path(), {.bos_token = "</s>"});
  CHECK(tokenizer.encode("abc") == std::vector<std::int32_t>{5});
  CHECK(tokenizer.encode("ab") == std::vector<std::int32_t>{4});
  CHECK(tokenizer.encode("aaa") == std::vector<std::int32_t>{6, 0});     // non-overlapping, from the left
  CHECK(tokenizer.encode("aaaa") == std::vector<std::int32_t>{6, 6});
  CHECK(tokenizer.encode("cab") == std::vector<std::int32_t>{2, 4});
  // " abc" is Ġ a b c: "b c" (rank 0) beats "Ġ a" (rank 4), then "a bc" (rank 2) leaves Ġ alone.
  CHECK(tokenizer.encode("a abc") == std::vector<std::int32_t>{0, 7, 5});
  CHECK(tokenizer.encode(" a") == std::vector<std::int32_t>{8});
  CHECK(tokenizer.encode("ab", true) == std::vector<std::int32_t>{9, 4});
  CHECK(tokenizer.encode("a</s>ab") == std::vector<std::int32_t>{0, 9, 4});  // special token kept whole
  CHECK(tokenizer.decode(std::vector<std::int32_t>{5, 7, 9, 6}) == "abc </s>aa");
  // A byte with no token cannot be encoded: the error says which.
  CHECK_THROWS_WITH_AS(tokenizer.encode("z"), doctest::Contains("0x7a"), zo2::Error);
}

TEST_CASE("GPT-2 pre-tokenization follows the regex alternatives") {
  const auto split = [](std::string_view text) {
    std::vector<std::string> out;
    for (auto piece : zo2::io::gpt2_pre_tokenize(text)) out.emplace_back(piece);
    return out;
  };
  using V = std::vector<std::string>;
  CHECK(split("Hello world") == V{"Hello", " world"});
  CHECK(split("it's we'll I'M") == V{"it", "'s", " we", "'ll", " I", "'", "M"});
  CHECK(split("a   b") == V{"a", "  ", " b"});         // the last space goes with the word
  CHECK(split("a\n\nb") == V{"a", "\n", "\n", "b"});  // \s+(?!\S), then \s+ for the last one
  CHECK(split("end  ") == V{"end", "  "});
  CHECK(split("x 123 ?!") == V{"x", " 123", " ?!"});
  CHECK(split("Größe") == V{"Größe"});
  CHECK(split("1½²") == V{"1½²"});
  CHECK(split("👍🏽!") == V{"👍🏽!"});  // emoji are neither letters nor numbers
  CHECK(split("").empty());
}

TEST_CASE("Unicode classes: letters and numbers of many scripts, emoji and marks are neither") {
  using namespace zo2::io::unicode;
  for (char32_t letter : {U'a', U'Z', U'é', U'ß', U'Ж', U'ω', U'中', U'の', U'カ', U'한', U'ا', U'א', U'क', U'ก'}) {
    CAPTURE(static_cast<std::uint32_t>(letter));
    CHECK(is_letter(letter));
    CHECK(!is_number(letter));
  }
  for (char32_t number : {U'0', U'9', U'٣', U'१', U'½', U'²', U'Ⅻ', U'①', U'７'}) {
    CAPTURE(static_cast<std::uint32_t>(number));
    CHECK(is_number(number));
    CHECK(!is_letter(number));
  }
  for (char32_t neither : {U'!', U' ', U'😀', U'🇩', U'\u200d', U'\ufe0f', U'\u0301', U'\u093f', U'€', U'\U000E0001'}) {
    CAPTURE(static_cast<std::uint32_t>(neither));
    CHECK(!is_letter(neither));
    CHECK(!is_number(neither));
  }
  for (char32_t space : {U' ', U'\t', U'\n', U'\r', U'\u00a0', U'\u2003', U'\u3000', U'\u2028'}) {
    CHECK(is_whitespace(space));
  }
  CHECK(!is_whitespace(U'\u200b'));  // zero-width space is not White_Space

  const auto units = decode_utf8("a\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80\xff");
  REQUIRE(units.size() == 5);
  CHECK(units[1].code_point == U'é');
  CHECK(units[2].code_point == U'中');
  CHECK(units[3].code_point == U'😀');
  CHECK(units[3].length == 4);
  CHECK(units[4].code_point == 0xfffd);
  CHECK(units[4].length == 1);
}

TEST_CASE("loading errors are FileErrors naming the file and line") {
  TempDir dir;
  write_file(dir / "vocab.json", R"({"a": 0, "b": 1, "ab": 2})");

  SUBCASE("missing files") {
    const std::string message = file_error_message([&] { BpeTokenizer::from_directory(dir / "nowhere"); });
    CHECK(message.find("vocab.json") != std::string::npos);
    write_file(dir / "only_vocab.json", "{}");
    const std::string merges = file_error_message(
        [&] { BpeTokenizer::from_files(dir / "only_vocab.json", dir / "absent_merges.txt"); });
    CHECK(merges.find("absent_merges.txt") != std::string::npos);
  }
  SUBCASE("vocab.json not JSON") {
    write_file(dir / "bad_vocab.json", "{\"a\": 0,\n \"b\": }");
    write_file(dir / "merges.txt", "#version: 0.2\n");
    const std::string message =
        file_error_message([&] { BpeTokenizer::from_files(dir / "bad_vocab.json", dir / "merges.txt"); });
    CHECK(message.find("bad_vocab.json") != std::string::npos);
    CHECK(message.find("line 2") != std::string::npos);
  }
  SUBCASE("vocab.json with a non-integer id") {
    write_file(dir / "bad_vocab.json", R"({"a": "zero"})");
    write_file(dir / "merges.txt", "");
    const std::string message =
        file_error_message([&] { BpeTokenizer::from_files(dir / "bad_vocab.json", dir / "merges.txt"); });
    CHECK(message.find("bad_vocab.json") != std::string::npos);
    CHECK(message.find("'a'") != std::string::npos);
  }
  SUBCASE("merges line with one token") {
    write_file(dir / "merges.txt", "#version: 0.2\na b\nab\n");
    const std::string message = file_error_message([&] { BpeTokenizer::from_directory(dir.path()); });
    CHECK(message.find("merges.txt") != std::string::npos);
    CHECK(message.find("line 3") != std::string::npos);
  }
  SUBCASE("merges line with three tokens") {
    write_file(dir / "merges.txt", "a b c\n");
    const std::string message = file_error_message([&] { BpeTokenizer::from_directory(dir.path()); });
    CHECK(message.find("line 1") != std::string::npos);
  }
  SUBCASE("merge of tokens the vocabulary lacks") {
    write_file(dir / "merges.txt", "#version: 0.2\na b\nb a\n");
    const std::string message = file_error_message([&] { BpeTokenizer::from_directory(dir.path()); });
    CHECK(message.find("merges.txt") != std::string::npos);
    CHECK(message.find("line 3") != std::string::npos);
    CHECK(message.find("'ba'") != std::string::npos);
  }
}

TEST_CASE("decode refuses unknown ids; encode with bos needs the bos token") {
  const BpeTokenizer tokenizer = BpeTokenizer::from_directory(kFixtures);
  CHECK_THROWS_AS(tokenizer.decode(std::vector<std::int32_t>{5, 1000}), zo2::Error);
  CHECK_THROWS_AS(tokenizer.decode(std::vector<std::int32_t>{-1}), zo2::Error);
  const BpeTokenizer no_bos = BpeTokenizer::from_directory(kFixtures, {.bos_token = "<|endoftext|>"});
  CHECK_THROWS_AS(no_bos.encode("hi", true), zo2::Error);
  CHECK(no_bos.encode("hi") == tokenizer.encode("hi"));
}

TEST_CASE("encode is safe to call from several threads") {
  const BpeTokenizer tokenizer = BpeTokenizer::from_directory(kFixtures);
  const std::string text = "Über den Wolken 你好 мир 123 😀 it's fine";
  // References from a separate tokenizer, so its cache is not the one under test.
  const BpeTokenizer separate = BpeTokenizer::from_directory(kFixtures);
  std::vector<std::vector<std::int32_t>> reference;
  for (int k = 0; k < 17; ++k) reference.push_back(separate.encode(text + std::to_string(k)));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 200; ++k) {
        if (tokenizer.encode(text + std::to_string(k % 17)) != reference[k % 17]) ++mismatches[t];
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int m : mismatches) CHECK(m == 0);
}
