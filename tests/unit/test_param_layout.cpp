// TensorSpec and ParamLayout: element counts and group offsets are checked, so a shape whose
// product does not fit in std::size_t is a ShapeError naming the tensor, never a wrapped size.
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>

#include <zo2/core/param_layout.hpp>

TEST_CASE("TensorSpec::numel is the product of the dimensions") {
  CHECK(zo2::TensorSpec{"w", {3, 4, 5}}.numel() == 60u);
  CHECK(zo2::TensorSpec{"scalar", {}}.numel() == 1u);
  CHECK(zo2::TensorSpec{"empty", {7, 0}}.numel() == 0u);
}

TEST_CASE("TensorSpec::numel throws ShapeError naming the tensor when the product overflows") {
  const std::int64_t big = std::int64_t{1} << 33;
  CHECK_THROWS_WITH_AS(zo2::TensorSpec({"huge.weight", {big, big}}).numel(), doctest::Contains("'huge.weight'"),
                       zo2::ShapeError);
  CHECK_THROWS_WITH_AS(zo2::TensorSpec({"neg", {4, -2}}).numel(), doctest::Contains("'neg'"), zo2::ShapeError);
  // 2^32 * 2^32 wraps to exactly 0 in 64 bits.
  const std::int64_t b32 = std::int64_t{1} << 32;
  CHECK_THROWS_AS(zo2::TensorSpec({"wraps_to_zero", {b32, b32}}).numel(), zo2::ShapeError);
}

TEST_CASE("ParamLayout::add rejects a tensor whose size or offset overflows, naming it") {
  zo2::ParamLayout l;
  const std::int64_t big = std::int64_t{1} << 40;
  CHECK_THROWS_WITH_AS(l.add("a", {big, big}), doctest::Contains("'a'"), zo2::ShapeError);
  // Each fits alone; together they overflow the group's element count.
  const std::int64_t quarter = std::numeric_limits<std::int64_t>::max() / 2;  // 2^62 - 1: 2^62 once rounded
  l.add("first", {quarter});
  l.add("second", {quarter});
  l.add("third", {quarter});
  CHECK_THROWS_WITH_AS(l.add("fourth", {quarter}), doctest::Contains("'fourth'"), zo2::ShapeError);
  CHECK(l.num_tensors() == 3);
}
