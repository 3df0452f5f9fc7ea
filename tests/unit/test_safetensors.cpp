// Tests for zo2/io/dtype.hpp and zo2/io/safetensors.hpp.
//
// Conversions are checked against references that share no code with the library: halves are
// decoded with std::ldexp and rounded by searching the sorted list of every finite half in
// double precision. Files from the Python `safetensors` package are read back against values
// numpy computed (tests/fixtures/safetensors/make_fixture.py).
#include <doctest/doctest.h>

#include <zo2/io/dtype.hpp>
#include <zo2/io/safetensors.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using namespace zo2::io;

namespace {

// ---- independent references for the conversions --------------------------------------------

double reference_half_value(std::uint16_t bits) {
  const int sign = (bits & 0x8000) ? -1 : 1;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  if (exponent == 0x1f) {
    return mantissa ? std::numeric_limits<double>::quiet_NaN()
                    : sign * std::numeric_limits<double>::infinity();
  }
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

/// Nearest half to `x` (ties to the even bit pattern) by search over all finite positive halves.
std::uint16_t reference_float_to_half(float x) {
  static const std::vector<double> positive = [] {
    std::vector<double> values;
    for (std::uint32_t bits = 0; bits < 0x7c00; ++bits) values.push_back(reference_half_value(bits));
    return values;
  }();
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double magnitude = std::fabs(static_cast<double>(x));
  if (std::isinf(x)) return sign | 0x7c00;
  // Beyond the largest half (65504) by half an ulp (16) or more: overflow to infinity.
  if (magnitude >= 65520.0) return sign | 0x7c00;
  const auto upper = std::lower_bound(positive.begin(), positive.end(), magnitude);
  if (upper == positive.end()) return sign | 0x7bff;
  const auto hi = static_cast<std::uint16_t>(upper - positive.begin());
  if (*upper == magnitude || hi == 0) return sign | hi;
  const auto lo = static_cast<std::uint16_t>(hi - 1);
  const double below = magnitude - positive[lo];
  const double above = positive[hi] - magnitude;
  if (below < above) return sign | lo;
  if (above < below) return sign | hi;
  return sign | ((lo & 1) ? hi : lo);
}

/// Nearest bf16 to `x` (ties to even), comparing the two neighbours' distances in double.
std::uint16_t reference_float_to_bf16(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const auto lo = static_cast<std::uint16_t>(bits >> 16);
  if ((bits & 0xffff) == 0) return lo;
  const auto hi = static_cast<std::uint16_t>(lo + 1);  // next magnitude up, same sign
  const double lo_value = std::bit_cast<float>(static_cast<std::uint32_t>(lo) << 16);
  const double hi_value = (hi & 0x7fff) == 0x7f80 ? std::copysign(std::ldexp(1.0, 128), x)
                                                   : std::bit_cast<float>(static_cast<std::uint32_t>(hi) << 16);
  const double below = std::fabs(static_cast<double>(x) - lo_value);
  const double above = std::fabs(hi_value - static_cast<double>(x));
  if (below < above) return lo;
  if (above < below) return hi;
  return (lo & 1) ? hi : lo;
}

bool is_half_nan(std::uint16_t bits) { return (bits & 0x7c00) == 0x7c00 && (bits & 0x3ff) != 0; }
bool is_bf16_nan(std::uint16_t bits) { return (bits & 0x7f80) == 0x7f80 && (bits & 0x7f) != 0; }

// ---- temporary directories and raw files ---------------------------------------------------

/// A fresh directory under the system temp dir, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("zo2_test_safetensors_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string le_u64(std::uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

/// A safetensors file made by hand: length prefix, header text as given, `data_size` data bytes.
void write_raw_safetensors(const fs::path& path, const std::string& header, std::size_t data_size) {
  write_bytes(path, le_u64(header.size()) + header + std::string(data_size, '\x11'));
}

/// Runs `open` and returns the FileError message; fails the test if nothing (or else) is thrown.
std::string file_error_message(const std::function<void()>& open) {
  try {
    open();
  } catch (const zo2::FileError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected zo2::FileError, got another exception: " << e.what());
    return {};
  }
  FAIL("expected zo2::FileError, nothing was thrown");
  return {};
}

template <class T>
std::vector<T> random_values(std::size_t n, std::mt19937_64& rng) {
  std::vector<T> values(n);
  if constexpr (std::is_floating_point_v<T>) {
    std::normal_distribution<T> normal(0, 3);
    for (T& v : values) v = normal(rng);
  } else {
    std::uniform_int_distribution<std::int64_t> uniform(std::numeric_limits<T>::min() / 2,
                                                        std::numeric_limits<T>::max() / 2);
    for (T& v : values) v = static_cast<T>(uniform(rng));
  }
  return values;
}

std::vector<std::uint16_t> random_bits16(std::size_t n, std::mt19937_64& rng) {
  std::vector<std::uint16_t> values(n);
  for (auto& v : values) v = static_cast<std::uint16_t>(rng());
  return values;
}

}  // namespace

// ---- dtype.hpp ------------------------------------------------------------------------------

TEST_CASE("fp16_to_float decodes every half exactly") {
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto half = static_cast<std::uint16_t>(bits);
    const float decoded = fp16_to_float(half);
    const double expected = reference_half_value(half);
    if (std::isnan(expected)) {
      CHECK(std::isnan(decoded));
    } else {
      CHECK(static_cast<double>(decoded) == expected);
      CHECK(std::signbit(decoded) == bool(half & 0x8000));
    }
  }
}

TEST_CASE("float_to_fp16 rounds to nearest even, including subnormals, overflow and NaN") {
  // Every half and every midpoint between neighbouring halves, and one float either side of it.
  for (std::uint32_t bits = 0; bits < 0x7c00; ++bits) {
    const float exact = static_cast<float>(reference_half_value(static_cast<std::uint16_t>(bits)));
    CHECK(float_to_fp16(exact) == bits);
    CHECK(float_to_fp16(-exact) == (bits | 0x8000));
    const double next = bits + 1 < 0x7c00 ? reference_half_value(static_cast<std::uint16_t>(bits + 1)) : 65536.0;
    const auto midpoint = static_cast<float>((reference_half_value(static_cast<std::uint16_t>(bits)) + next) / 2);
    for (float probe : {midpoint, std::nextafter(midpoint, 0.0f), std::nextafter(midpoint, 1e9f)}) {
      CHECK(float_to_fp16(probe) == reference_float_to_half(probe));
      CHECK(float_to_fp16(-probe) == reference_float_to_half(-probe));
    }
  }
  // A sweep over float bit patterns of all magnitudes.
  for (std::uint64_t bits = 0; bits < 0x7f800000u; bits += 9973) {
    const float value = std::bit_cast<float>(static_cast<std::uint32_t>(bits));
    REQUIRE(float_to_fp16(value) == reference_float_to_half(value));
  }
  CHECK(float_to_fp16(65519.99f) == 0x7bff);
  CHECK(float_to_fp16(65520.0f) == 0x7c00);
  CHECK(float_to_fp16(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(float_to_fp16(-std::numeric_limits<float>::infinity()) == 0xfc00);
  CHECK(float_to_fp16(std::ldexp(1.0f, -25)) == 0x0000);                         // tie -> even 0
  CHECK(float_to_fp16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);  // just above
  CHECK(float_to_fp16(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(is_half_nan(float_to_fp16(std::numeric_limits<float>::quiet_NaN())));
  CHECK(is_half_nan(float_to_fp16(std::bit_cast<float>(0x7f800001u))));  // payload in low bits only
}

TEST_CASE("float_to_bf16 rounds to nearest even; bf16_to_float is exact") {
  for (std::uint64_t bits = 0; bits <= 0xffffffffu; bits += 7919) {
    const float value = std::bit_cast<float>(static_cast<std::uint32_t>(bits));
    if (std::isnan(value)) {
      REQUIRE(is_bf16_nan(float_to_bf16(value)));
      continue;
    }
    REQUIRE(float_to_bf16(value) == reference_float_to_bf16(value));
  }
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const float decoded = bf16_to_float(static_cast<std::uint16_t>(bits));
    if (is_bf16_nan(static_cast<std::uint16_t>(bits))) {
      CHECK(std::isnan(decoded));
    } else {
      CHECK(float_to_bf16(decoded) == bits);
    }
  }
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);               // tie, even below
  CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);           // tie, even above
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);         // rounds to Inf
  CHECK(float_to_bf16(std::numeric_limits<float>::denorm_min()) == 0x0000);  // far below half a bf16 ulp
  CHECK(is_bf16_nan(float_to_bf16(std::bit_cast<float>(0x7f800001u))));
}

TEST_CASE("dtype names parse back and unknown names are refused") {
  for (Dtype dtype : {Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64, Dtype::I64, Dtype::I32,
                      Dtype::U8, Dtype::BOOL, Dtype::F8_E4M3}) {
    CHECK(parse_dtype(dtype_name(dtype)) == dtype);
  }
  CHECK(!parse_dtype("F17").has_value());
  CHECK(!parse_dtype("f32").has_value());
}

// ---- writer and reader ----------------------------------------------------------------------

TEST_CASE("write_safetensors / SafetensorsFile round trip in every dtype") {
  TempDir dir;
  std::mt19937_64 rng(1234);
  const auto f32 = random_values<float>(3 * 5, rng);
  const auto f64 = random_values<double>(7, rng);
  const auto i64 = random_values<std::int64_t>(2 * 3, rng);
  const auto i32 = random_values<std::int32_t>(9, rng);
  const auto f16_bits = random_bits16(4 * 4, rng);
  const auto bf16_bits = random_bits16(33, rng);
  std::vector<std::uint8_t> u8(5);
  for (auto& v : u8) v = static_cast<std::uint8_t>(rng());

  const std::vector<TensorToWrite> tensors = {
      {"model.w_f32", Dtype::F32, {3, 5}, f32.data()},
      {"model.w_f16", Dtype::F16, {4, 4}, f16_bits.data()},
      {"model.w_bf16", Dtype::BF16, {33}, bf16_bits.data()},  // odd byte count: next tensor unaligned
      {"model.w_f64", Dtype::F64, {7}, f64.data()},
      {"ids", Dtype::I64, {2, 3}, i64.data()},
      {"ids32", Dtype::I32, {3, 1, 3}, i32.data()},
      {"mask", Dtype::U8, {5}, u8.data()},
      {"scalar_empty", Dtype::F32, {0}, nullptr},
  };
  const fs::path path = dir / "round.safetensors";
  write_safetensors(path, tensors, {{"format", "pt"}, {"step", "17"}});

  // The file layout transformers expects: 8-aligned header padded with spaces, contiguous data.
  const std::string raw = read_bytes(path);
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<unsigned char>(raw[i]);
  CHECK(header_size % 8 == 0);
  const std::string header_text = raw.substr(8, header_size);
  CHECK(header_text.front() == '{');
  CHECK(header_text.find_last_not_of(' ') == header_text.rfind('}'));
  const auto header = nlohmann::json::parse(header_text);
  std::uint64_t expected_offset = 0;
  std::uint64_t total_bytes = 0;
  for (const TensorToWrite& t : tensors) {
    const auto& offsets = header.at(t.name).at("data_offsets");
    CHECK(offsets[0].get<std::uint64_t>() == expected_offset);
    expected_offset = offsets[1].get<std::uint64_t>();
    std::uint64_t numel = 1;
    for (auto d : t.shape) numel *= static_cast<std::uint64_t>(d);
    total_bytes += numel * dtype_size(t.dtype);
  }
  CHECK(expected_offset == total_bytes);
  CHECK(raw.size() == 8 + header_size + total_bytes);

  // No temporary file is left behind.
  for (const auto& item : fs::directory_iterator(dir.path())) {
    CHECK(item.path().filename().string().find(".tmp.") == std::string::npos);
  }

  const SafetensorsFile file = SafetensorsFile::open(path);
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.metadata().at("step") == "17");
  std::vector<std::string> expected_names;
  for (const auto& t : tensors) expected_names.push_back(t.name);
  CHECK(file.names() == expected_names);
  for (const TensorToWrite& t : tensors) {
    CAPTURE(t.name);
    const TensorEntry& e = file.entry(t.name);
    CHECK(e.dtype == t.dtype);
    CHECK(e.shape == t.shape);
    REQUIRE(e.bytes.size() == e.numel() * dtype_size(t.dtype));
    if (!e.bytes.empty()) CHECK(std::memcmp(e.bytes.data(), t.data, e.bytes.size()) == 0);
  }

  const std::vector<float> f32_back = file.read_as_float("model.w_f32");
  CHECK(f32_back == f32);
  const std::vector<float> f16_back = file.read_as_float("model.w_f16");
  for (std::size_t i = 0; i < f16_bits.size(); ++i) {
    const double expected = reference_half_value(f16_bits[i]);
    if (std::isnan(expected)) {
      CHECK(std::isnan(f16_back[i]));
    } else {
      CHECK(static_cast<double>(f16_back[i]) == expected);
    }
  }
  const std::vector<float> bf16_back = file.read_as_float("model.w_bf16");
  for (std::size_t i = 0; i < bf16_bits.size(); ++i) {
    const std::uint32_t expected_bits = static_cast<std::uint32_t>(bf16_bits[i]) << 16;
    if (is_bf16_nan(bf16_bits[i])) {
      CHECK(std::isnan(bf16_back[i]));
    } else {
      CHECK(std::bit_cast<std::uint32_t>(bf16_back[i]) == expected_bits);
    }
  }
  const std::vector<float> f64_back = file.read_as_float("model.w_f64");
  for (std::size_t i = 0; i < f64.size(); ++i) CHECK(f64_back[i] == static_cast<float>(f64[i]));
  CHECK(file.read_as_float("scalar_empty").empty());

  // Callers get told about their mistakes, with the file and tensor named.
  std::vector<float> wrong_size(14);
  CHECK_THROWS_AS(file.read_as_float("model.w_f32", wrong_size.data(), wrong_size.size()), zo2::ShapeError);
  const std::string not_float = file_error_message([&] { file.read_as_float("ids"); });
  CHECK(not_float.find("round.safetensors") != std::string::npos);
  CHECK(not_float.find("'ids'") != std::string::npos);
  const std::string missing = file_error_message([&] { file.entry("no.such.tensor"); });
  CHECK(missing.find("round.safetensors") != std::string::npos);
  CHECK(missing.find("no.such.tensor") != std::string::npos);
  CHECK(!file.contains("no.such.tensor"));
  CHECK(file.contains("ids"));
}

TEST_CASE("write_safetensors replaces an existing file and handles an empty tensor list") {
  TempDir dir;
  const fs::path path = dir / "model.safetensors";
  const std::vector<float> first = {1, 2, 3};
  write_safetensors(path, {{"a", Dtype::F32, {3}, first.data()}});
  const std::vector<float> second = {4, 5};
  write_safetensors(path, {{"b", Dtype::F32, {2}, second.data()}});
  const SafetensorsFile file = SafetensorsFile::open(path);
  CHECK(!file.contains("a"));
  CHECK(file.read_as_float("b") == second);

  write_safetensors(dir / "none.safetensors", {});
  CHECK(SafetensorsFile::open(dir / "none.safetensors").names().empty());

  // Refused before anything is written: duplicate names and missing data.
  CHECK_THROWS_AS(write_safetensors(dir / "dup.safetensors",
                                    {{"a", Dtype::F32, {3}, first.data()}, {"a", Dtype::F32, {3}, first.data()}}),
                  zo2::FileError);
  CHECK_THROWS_AS(write_safetensors(dir / "null.safetensors", {{"a", Dtype::F32, {3}, nullptr}}), zo2::FileError);
  CHECK(!fs::exists(dir / "dup.safetensors"));
  CHECK(!fs::exists(dir / "null.safetensors"));
  // An unwritable destination is a FileError that names it.
  const std::string unwritable = file_error_message(
      [&] { write_safetensors(dir / "no_such_dir" / "x.safetensors", {{"a", Dtype::F32, {3}, first.data()}}); });
  CHECK(unwritable.find("x.safetensors") != std::string::npos);
}

TEST_CASE("malformed safetensors files are refused with the file and tensor named") {
  TempDir dir;
  struct BadCase {
    const char* label;
    std::string header;
    std::size_t data_size;
    const char* tensor;  // must appear in the message; nullptr where no tensor is at fault
    const char* reason;  // a word the message must contain
  };
  const std::vector<BadCase> cases = {
      {"not json", "{\"w\": {\"dtype\": \"F32\",", 0, nullptr, "JSON"},
      {"not an object", "[1, 2, 3]", 0, nullptr, "object"},
      {"unknown dtype", R"({"w.bad": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}})", 4, "w.bad", "F17"},
      {"missing dtype", R"({"w.bad": {"shape": [1], "data_offsets": [0, 4]}})", 4, "w.bad", "dtype"},
      {"shape not array", R"({"w.bad": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}})", 16, "w.bad", "shape"},
      {"negative dim", R"({"w.bad": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4, "w.bad", "shape"},
      {"offsets past end", R"({"w.bad": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})", 16, "w.bad", "beyond"},
      {"offsets reversed", R"({"w.bad": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", 16, "w.bad", "before"},
      {"offsets one number", R"({"w.bad": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 4, "w.bad", "data_offsets"},
      {"offsets vs shape", R"({"w.bad": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})", 24, "w.bad", "needs 24"},
      {"bf16 size", R"({"w.bad": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]}})", 16, "w.bad", "needs 8"},
      {"hostile shape", R"({"w.bad": {"dtype": "F64", "shape": [4611686018427387904, 4611686018427387904], "data_offsets": [0, 8]}})", 8, "w.bad", "needs"},
      {"shape wrapping to 0 bytes", R"({"w.wrap": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 0]}})", 0, "w.wrap", "more than the file holds"},
      {"overlap", R"({"w.first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "w.second": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})", 20, "w.second", "overlap"},
      {"overlap behind an empty tensor", R"({"a.big": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, "b.empty": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}, "c.late": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})", 32, "c.late", "overlap"},
      {"metadata not strings", R"({"__metadata__": {"step": 3}})", 0, nullptr, "__metadata__"},
      {"metadata not object", R"({"__metadata__": "x"})", 0, nullptr, "__metadata__"},
  };
  for (const BadCase& c : cases) {
    CAPTURE(c.label);
    const fs::path path = dir / "bad_file.safetensors";
    write_raw_safetensors(path, c.header, c.data_size);
    const std::string message = file_error_message([&] { SafetensorsFile::open(path); });
    CHECK(message.find("bad_file.safetensors") != std::string::npos);
    if (c.tensor != nullptr) CHECK(message.find(c.tensor) != std::string::npos);
    CHECK(message.find(c.reason) != std::string::npos);
  }
}

TEST_CASE("a huge shape with a zero extent is an empty tensor, not an overflow") {
  TempDir dir;
  const fs::path path = dir / "zero.safetensors";
  write_raw_safetensors(
      path, R"({"w.zero": {"dtype": "F32", "shape": [4611686018427387904, 4611686018427387904, 0], "data_offsets": [0, 0]}})", 0);
  const SafetensorsFile file = SafetensorsFile::open(path);
  CHECK(file.entry("w.zero").bytes.empty());
  CHECK(file.entry("w.zero").numel() == 0);
}

TEST_CASE("truncated and mislabelled files are refused with the file named") {
  TempDir dir;
  const std::vector<float> values(64, 1.5f);
  const fs::path good = dir / "good.safetensors";
  write_safetensors(good, {{"layers.0.weight", Dtype::F32, {64}, values.data()}});
  const std::string bytes = read_bytes(good);

  SUBCASE("data cut short names the tensor that no longer fits") {
    const fs::path path = dir / "cut.safetensors";
    write_bytes(path, bytes.substr(0, bytes.size() - 10));
    const std::string message = file_error_message([&] { SafetensorsFile::open(path); });
    CHECK(message.find("cut.safetensors") != std::string::npos);
    CHECK(message.find("layers.0.weight") != std::string::npos);
    CHECK(message.find("truncated") != std::string::npos);
  }
  SUBCASE("cut inside the header") {
    const fs::path path = dir / "cut_header.safetensors";
    write_bytes(path, bytes.substr(0, 20));
    const std::string message = file_error_message([&] { SafetensorsFile::open(path); });
    CHECK(message.find("cut_header.safetensors") != std::string::npos);
    CHECK(message.find("exceeds the file size") != std::string::npos);
  }
  SUBCASE("shorter than the length prefix") {
    const fs::path path = dir / "tiny.safetensors";
    write_bytes(path, bytes.substr(0, 5));
    const std::string message = file_error_message([&] { SafetensorsFile::open(path); });
    CHECK(message.find("tiny.safetensors") != std::string::npos);
    CHECK(message.find("truncated") != std::string::npos);
  }
  SUBCASE("empty file") {
    const fs::path path = dir / "empty.safetensors";
    write_bytes(path, "");
    CHECK(file_error_message([&] { SafetensorsFile::open(path); }).find("empty.safetensors") != std::string::npos);
  }
  SUBCASE("a header length beyond the file (e.g. a text file)") {
    const fs::path path = dir / "text.safetensors";
    write_bytes(path, "this is not a safetensors file at all");
    const std::string message = file_error_message([&] { SafetensorsFile::open(path); });
    CHECK(message.find("text.safetensors") != std::string::npos);
    CHECK(message.find("header length") != std::string::npos);
  }
  SUBCASE("missing file") {
    const std::string message = file_error_message([&] { SafetensorsFile::open(dir / "absent.safetensors"); });
    CHECK(message.find("absent.safetensors") != std::string::npos);
  }
}

TEST_CASE("a file written by the Python safetensors package reads back as numpy saw it") {
  const fs::path fixtures = fs::path(ZO2_TEST_DATA_DIR) / "safetensors";
  const auto expected = nlohmann::json::parse(read_bytes(fixtures / "tiny_expected.json"));
  const SafetensorsFile file = SafetensorsFile::open(fixtures / "tiny.safetensors");

  for (const auto& [key, value] : expected.at("metadata").items()) {
    CHECK(file.metadata().at(key) == value.get<std::string>());
  }
  CHECK(file.names().size() == expected.at("tensors").size());
  for (const auto& [name, want] : expected.at("tensors").items()) {
    CAPTURE(name);
    const TensorEntry& e = file.entry(name);
    CHECK(dtype_name(e.dtype) == want.at("dtype").get<std::string>());
    CHECK(e.shape == want.at("shape").get<std::vector<std::int64_t>>());
    const auto& values = want.at("values");
    REQUIRE(values.size() == e.numel());
    if (e.dtype == Dtype::I64) {
      for (std::size_t i = 0; i < values.size(); ++i) {
        std::int64_t stored;
        std::memcpy(&stored, e.bytes.data() + 8 * i, 8);
        CHECK(stored == values[i].get<std::int64_t>());
      }
      continue;
    }
    const std::vector<float> got = file.read_as_float(name);
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (values[i].is_string()) {  // "inf" / "-inf"
        CHECK(std::isinf(got[i]));
        CHECK(std::signbit(got[i]) == (values[i].get<std::string>() == "-inf"));
      } else {
        CHECK(static_cast<double>(got[i]) == values[i].get<double>());
      }
    }
  }
}

// ---- sharded checkpoints --------------------------------------------------------------------

TEST_CASE("SafetensorsCheckpoint presents two shards as one name space") {
  TempDir dir;
  const std::vector<float> a = {1, 2, 3, 4}, b = {5, 6}, c = {7, 8, 9};
  write_safetensors(dir / "model-00001-of-00002.safetensors",
                    {{"embed.weight", Dtype::F32, {2, 2}, a.data()}, {"layers.0.w", Dtype::F32, {2}, b.data()}});
  std::vector<std::uint16_t> c_bf16;
  for (float v : c) c_bf16.push_back(float_to_bf16(v));  // small integers: exact in bf16
  write_safetensors(dir / "model-00002-of-00002.safetensors", {{"layers.1.w", Dtype::BF16, {3}, c_bf16.data()}});
  const std::string index = R"({
    "metadata": {"total_size": 18},
    "weight_map": {
      "layers.1.w": "model-00002-of-00002.safetensors",
      "embed.weight": "model-00001-of-00002.safetensors",
      "layers.0.w": "model-00001-of-00002.safetensors"
    }})";
  write_bytes(dir / "model.safetensors.index.json", index);

  for (const fs::path& opened_as : {dir.path(), dir / "model.safetensors.index.json"}) {
    const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(opened_as);
    CHECK(checkpoint.shards().size() == 2);
    CHECK(checkpoint.names().size() == 3);
    CHECK(checkpoint.contains("embed.weight"));
    CHECK(checkpoint.contains("layers.1.w"));
    CHECK(!checkpoint.contains("layers.2.w"));
    CHECK(checkpoint.read_as_float("embed.weight") == a);
    CHECK(checkpoint.read_as_float("layers.0.w") == b);
    CHECK(checkpoint.read_as_float("layers.1.w") == c);
    CHECK(checkpoint.entry("layers.1.w").dtype == Dtype::BF16);
    CHECK(checkpoint.metadata().at("total_size") == "18");
    const std::string missing = file_error_message([&] { checkpoint.entry("layers.2.w"); });
    CHECK(missing.find("model.safetensors.index.json") != std::string::npos);
    CHECK(missing.find("layers.2.w") != std::string::npos);
  }
}

TEST_CASE("SafetensorsCheckpoint errors name the index file and the shard") {
  TempDir dir;
  const std::vector<float> a = {1, 2};
  write_safetensors(dir / "shard-a.safetensors", {{"x", Dtype::F32, {2}, a.data()}});
  const fs::path index = dir / "model.safetensors.index.json";

  SUBCASE("missing shard") {
    write_bytes(index, R"({"weight_map": {"x": "shard-a.safetensors", "y": "shard-b.safetensors"}})");
    const std::string message = file_error_message([&] { SafetensorsCheckpoint::open(dir.path()); });
    CHECK(message.find("model.safetensors.index.json") != std::string::npos);
    CHECK(message.find("shard-b.safetensors") != std::string::npos);
    CHECK(message.find("missing") != std::string::npos);
  }
  SUBCASE("tensor not in the shard the index names") {
    write_bytes(index, R"({"weight_map": {"x": "shard-a.safetensors", "z": "shard-a.safetensors"}})");
    const std::string message = file_error_message([&] { SafetensorsCheckpoint::open(dir.path()); });
    CHECK(message.find("model.safetensors.index.json") != std::string::npos);
    CHECK(message.find("'z'") != std::string::npos);
    CHECK(message.find("shard-a.safetensors") != std::string::npos);
  }
  SUBCASE("index is not JSON") {
    write_bytes(index, "{\"weight_map\": ");
    const std::string message = file_error_message([&] { SafetensorsCheckpoint::open(dir.path()); });
    CHECK(message.find("model.safetensors.index.json") != std::string::npos);
  }
  SUBCASE("index without weight_map") {
    write_bytes(index, R"({"metadata": {}})");
    const std::string message = file_error_message([&] { SafetensorsCheckpoint::open(index); });
    CHECK(message.find("weight_map") != std::string::npos);
  }
  SUBCASE("shard path escaping the directory") {
    write_bytes(index, R"({"weight_map": {"x": "../shard-a.safetensors"}})");
    const std::string message = file_error_message([&] { SafetensorsCheckpoint::open(index); });
    CHECK(message.find("model.safetensors.index.json") != std::string::npos);
    CHECK(message.find("../shard-a.safetensors") != std::string::npos);
  }
  SUBCASE("a corrupt shard is reported by its own name") {
    write_bytes(dir / "shard-c.safetensors", "garbage!garbage");
    write_bytes(index, R"({"weight_map": {"x": "shard-c.safetensors"}})");
    const std::string message = file_error_message([&] { SafetensorsCheckpoint::open(index); });
    CHECK(message.find("shard-c.safetensors") != std::string::npos);
  }
  SUBCASE("a directory with neither file") {
    const std::string message = file_error_message([&] { SafetensorsCheckpoint::open(dir.path()); });
    CHECK(message.find(dir.path().string()) != std::string::npos);
  }
}

TEST_CASE("SafetensorsCheckpoint opens a directory holding a single model.safetensors") {
  TempDir dir;
  const std::vector<float> a = {1, 2, 3};
  write_safetensors(dir / "model.safetensors", {{"only", Dtype::F32, {3}, a.data()}}, {{"format", "pt"}});
  const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(dir.path());
  CHECK(checkpoint.names() == std::vector<std::string>{"only"});
  CHECK(checkpoint.read_as_float("only") == a);
  CHECK(checkpoint.metadata().at("format") == "pt");
  CHECK(checkpoint.source() == (dir / "model.safetensors").string());
}
