// BpeTokenizer on hostile input: a vocab.json id far beyond its entries is a FileError naming
// vocab.json (not a 2^31-entry table), and special-token search stays linear in the text.
#include <doctest/doctest.h>

#include <zo2/io/bpe_tokenizer.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using zo2::io::BpeTokenizer;

namespace {

const fs::path kFixtures = fs::path(ZO2_TEST_DATA_DIR) / "tokenizer";

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_bpe_limits_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  REQUIRE(out.good());
}

}  // namespace

TEST_CASE("a vocab.json id far beyond its entries is a FileError naming vocab.json and the token") {
  TempDir tmp;
  write_file(tmp.path / "vocab.json", R"({"a": 0, "b": 1, "far": 2147483646})");
  write_file(tmp.path / "merges.txt", "#version: 0.2\n");
  CHECK_THROWS_WITH_AS(BpeTokenizer::from_directory(tmp.path), doctest::Contains("vocab.json"), zo2::FileError);
  CHECK_THROWS_WITH_AS(BpeTokenizer::from_directory(tmp.path), doctest::Contains("'far'"), zo2::FileError);

  // Small gaps (ids missing from vocab.json) are still accepted.
  write_file(tmp.path / "vocab.json", R"({"a": 0, "b": 1, "c": 40})");
  const BpeTokenizer gaps = BpeTokenizer::from_directory(tmp.path);
  CHECK(gaps.vocab_size() == 41);
}

TEST_CASE("SpecialScanner finds the leftmost, then longest, special token") {
  const std::vector<std::pair<std::string, std::int32_t>> specials = {{"<s>", 0}, {"</s>", 2}, {"</s>x", 7}};
  const std::string text = "ab</s>cd<s></s>xy";
  zo2::io::bpe_detail::SpecialScanner scanner(text, specials);
  auto m = scanner.next(0);
  CHECK(m.offset == 2);
  CHECK(m.id == 2);
  CHECK(m.length == 4);
  m = scanner.next(6);
  CHECK(m.offset == 8);
  CHECK(m.id == 0);
  m = scanner.next(11);
  CHECK(m.offset == 11);
  CHECK(m.id == 7);  // "</s>x" beats "</s>" at the same offset
  CHECK(m.length == 5);
  m = scanner.next(16);
  CHECK(m.offset == text.size());
  CHECK(m.length == 0);
}

TEST_CASE("special-token search over a ~400 KB text full of </s> scans the text about once per token") {
  const std::vector<std::pair<std::string, std::int32_t>> specials = {{"<s>", 0}, {"<pad>", 1}, {"</s>", 2}, {"<unk>", 3}};
  std::string text;
  while (text.size() < 400'000) text += "a few words </s>";
  zo2::io::bpe_detail::SpecialScanner scanner(text, specials);
  std::size_t matches = 0, position = 0;
  for (;;) {
    const auto m = scanner.next(position);
    if (m.length == 0) break;
    ++matches;
    position = m.offset + m.length;
  }
  CHECK(matches == text.size() / 16);
  // Rescanning the rest of the text for the three absent tokens at every match would step over
  // ~3 * 25'000 * 200'000 bytes; remembering each token's next occurrence steps over each byte
  // about once per token.
  CHECK(scanner.bytes_scanned() <= specials.size() * text.size());
}

TEST_CASE("encode over a ~400 KB text full of </s> gives the ids of its pieces") {
  const BpeTokenizer tok = BpeTokenizer::from_directory(kFixtures);
  const std::string unit = "a few words </s>";
  const std::vector<std::int32_t> unit_ids = tok.encode(unit);
  REQUIRE(unit_ids.back() == 2);
  std::string text;
  std::vector<std::int32_t> expected;
  while (text.size() < 400'000) {
    text += unit;
    expected.insert(expected.end(), unit_ids.begin(), unit_ids.end());
  }
  CHECK(tok.encode(text) == expected);
}
