// The int8 row codec at the top of float's range: a finite row whose largest magnitude is near
// FLT_MAX encodes, decodes and re-encodes to finite values (no scale so large that a code times
// it overflows to inf); ordinary rows keep exactly the scale absmax / 124.
#include <doctest/doctest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include <zo2/offload/codecs.hpp>

using namespace zo2;
using namespace zo2::offload;

TEST_CASE("int8: every code decodes to a finite value under the largest scale") {
  for (int q = -127; q <= 127; ++q) CHECK(std::isfinite(Int8RowCodec::value(static_cast<std::int8_t>(q), Int8RowCodec::kMaxScale)));
  CHECK(std::isinf(127.0f * std::nextafter(Int8RowCodec::kMaxScale, INFINITY)));
}

TEST_CASE("int8: rows near FLT_MAX encode, decode and re-encode finite, within a step") {
  ParamLayout layout;
  layout.add("w", {1, 64});
  const GroupCodec<Int8RowCodec> codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  for (const float top : {FLT_MAX, std::nextafter(FLT_MAX, 0.0f), 3.35e38f, 3.3e38f, -FLT_MAX}) {
    CAPTURE(top);
    std::vector<float> v(64);
    for (std::size_t k = 0; k < v.size(); ++k) v[k] = top * ((static_cast<float>(k % 17) - 8.0f) / 8.0f);
    v[5] = top;
    for (const bool stochastic : {false, true}) {
      CAPTURE(stochastic);
      std::vector<std::uint32_t> words;
      if (stochastic)
        for (std::size_t k = 0; k < v.size(); ++k) words.push_back(0x9e3779b9u * static_cast<std::uint32_t>(k + 1));
      codec.encode(0, v, words, block);
      std::vector<float> out(v.size());
      codec.decode(0, block, out);
      const float scale = Int8RowCodec::scale_for(std::fabs(top));
      for (std::size_t k = 0; k < v.size(); ++k) {
        REQUIRE(std::isfinite(out[k]));
        CHECK(std::fabs(static_cast<double>(out[k]) - v[k]) <= static_cast<double>(scale) * 1.0001);
      }
      // Re-encoding the decoded row (a checkpoint reloaded, a group rewritten) stays finite.
      codec.encode(0, out, {}, block);
      std::vector<float> again(v.size());
      codec.decode(0, block, again);
      for (std::size_t k = 0; k < v.size(); ++k) REQUIRE(std::isfinite(again[k]));
    }
  }
}

TEST_CASE("int8: the sticky rescale of a row near FLT_MAX keeps a finite scale") {
  const float s = Int8RowCodec::scale_for(FLT_MAX);
  CHECK(s == Int8RowCodec::kMaxScale);
  CHECK(std::isfinite(Int8RowCodec::kMaxCode * s));
  CHECK(Int8RowCodec::rescale(s, FLT_MAX) == s);
  CHECK(Int8RowCodec::code(FLT_MAX, s, 0, false) == 127);
}

TEST_CASE("int8: ordinary rows keep exactly absmax / 124") {
  for (const float absmax : {1e-30f, 0.02f, 1.0f, 3.0e3f, 1e30f, 3.2e38f}) {
    CAPTURE(absmax);
    CHECK(Int8RowCodec::scale_for(absmax) == absmax / 124.0f);
  }
}
