// zo2/offload/master_region.hpp: the layout of a host master several processes map, without a
// device or shared memory (a page-aligned heap buffer stands in for the mapping).
// - every part starts on a page boundary, in order, without overlap, and holds what it must;
// - the header written by the creator passes its own check; each field that differs is a
//   ConfigError naming it; an unready region times out with an Error; garbage is refused;
// - a seat is claimed once; claims and handles are visible through a second view;
// - layout fingerprints differ for every change of a tensor's name, shape, decay flag or the
//   block count.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/offload/master_region.hpp>

using namespace zo2;
using zo2::offload::layout_fingerprint;
using zo2::offload::MasterRegion;
using zo2::offload::MasterRegionLayout;
using zo2::offload::MasterShape;

namespace {

struct Aligned {
  explicit Aligned(std::size_t bytes) : p(static_cast<unsigned char*>(std::aligned_alloc(4096, bytes))), n(bytes) {
    std::memset(p, 0, n);
  }
  ~Aligned() { std::free(p); }
  unsigned char* p;
  std::size_t n;
};

ModelLayout layout(std::int64_t width = 40, std::size_t blocks = 8, const char* name = "w", bool decay = true) {
  ParamLayout pro, blk, epi;
  pro.add("embed", {100, width});
  blk.add(name, {width, width}, decay);
  blk.add("b", {width}, false);
  epi.add("head", {width, 3});
  return ModelLayout(pro, blk, blocks, epi);
}

MasterShape shape_of(const ModelLayout& ml) {
  MasterShape s;
  s.layout_fingerprint = layout_fingerprint(ml);
  s.num_blocks = ml.num_blocks();
  s.streamed_blocks = ml.num_blocks();
  s.block_bytes = 3328;
  s.block_state_bytes = 6656;
  s.writeback_every = 4;
  s.rule_state_slots = 1;
  s.state_value_bytes = 4;
  s.element_bytes = 4;
  s.set_codec("bf16");
  return s;
}

}  // namespace

TEST_CASE("the region's parts are page-aligned, ordered and large enough") {
  const auto l = MasterRegionLayout::of(3, 8, 5000, 3 * 4096 + 7, 1);
  for (std::size_t off : {l.claims, l.handles, l.board, l.masters, l.state, l.total}) CHECK(off % 4096 == 0);
  CHECK(l.claims >= sizeof(offload::MasterRegionHeader));
  CHECK(l.handles - l.claims >= 3 * sizeof(std::uint32_t));
  CHECK(l.board - l.handles >= 3 * 8 * MasterRegionLayout::kHandleBytes);
  CHECK(l.masters - l.board >= 5000);
  CHECK(l.state - l.masters >= 3 * 4096 + 7);
  CHECK(l.total - l.state >= 1);
  const auto none = MasterRegionLayout::of(1, 0, 0, 0, 0);
  CHECK(none.board == none.handles);  // empty parts take no pages
  CHECK(none.total == none.board);
}

TEST_CASE("the header: written once, checked field by field") {
  const ModelLayout ml = layout();
  const MasterShape shape = shape_of(ml);
  const auto l = MasterRegionLayout::of(2, 8, 4096, 8 * 4096, 8 * 8192);
  Aligned mem(l.total);
  MasterRegion creator(mem.p, mem.n, 2, 8, l);
  MasterRegion reader(mem.p, mem.n, 2, 8, l);
  creator.initialize(shape);
  // Not ready yet: a reader gives up after its wait.
  CHECK_THROWS_WITH_AS(reader.check(shape, std::chrono::milliseconds(50)), doctest::Contains("not made ready"), Error);
  creator.set_ready();
  reader.check(shape, std::chrono::milliseconds(50));

  // Each field changed alone is refused, naming it.
  const std::vector<std::pair<const char*, std::function<void(MasterShape&)>>> changes{
      {"block_bytes", [](MasterShape& s) { s.block_bytes += 256; }},
      {"writeback_every", [](MasterShape& s) { s.writeback_every = 1; }},
      {"rule_state_slots", [](MasterShape& s) { s.rule_state_slots = 2; }},
      {"rule_state_bf16", [](MasterShape& s) { s.state_value_bytes = 2; }},
      {"streamed_blocks", [](MasterShape& s) { s.streamed_blocks = 7; }},
      {"num_blocks", [](MasterShape& s) { s.num_blocks = 9; }},
      {"block_state_bytes", [](MasterShape& s) { s.block_state_bytes = 0; }},
      {"element_bytes", [](MasterShape& s) { s.element_bytes = 2; }},
      {"codec", [](MasterShape& s) { s.set_codec("int8"); }},
      {"layout", [](MasterShape& s) { s.layout_fingerprint = layout_fingerprint(layout(48)); }},
  };
  for (const auto& [field, change] : changes) {
    CAPTURE(field);
    MasterShape s = shape;
    change(s);
    CHECK_THROWS_WITH_AS(reader.check(s, std::chrono::milliseconds(10)), doctest::Contains(field), ConfigError);
  }
  MasterShape s = shape;
  MasterRegion three_seats(mem.p, mem.n, 3, 8, l);
  CHECK_THROWS_WITH_AS(three_seats.check(shape, std::chrono::milliseconds(10)), doctest::Contains("seats"),
                       ConfigError);
  CHECK_THROWS_AS(s.set_codec(std::string(40, 'x')), ConfigError);

  // A region too small for its header, and one that is not a master at all.
  MasterRegion tiny(mem.p, 16, 2, 8, l);
  CHECK_THROWS_WITH_AS(tiny.check(shape, std::chrono::milliseconds(10)), doctest::Contains("header"), Error);
  Aligned garbage(l.total);
  std::memset(garbage.p, 0x5a, 64);
  MasterRegion bad(garbage.p, garbage.n, 2, 8, l);
  CHECK_THROWS_WITH_AS(bad.check(shape, std::chrono::milliseconds(10)), doctest::Contains("not a zo2 host master"),
                       Error);
  CHECK_THROWS_AS(MasterRegion(mem.p + 8, mem.n - 8, 2, 8, l), Error);  // not page-aligned
  MasterRegion short_one(mem.p, l.total - 4096, 2, 8, l);
  CHECK_THROWS_WITH_AS(short_one.initialize(shape), doctest::Contains("layout needs"), Error);
}

TEST_CASE("seats are claimed once; handles are where every view finds them") {
  const ModelLayout ml = layout();
  const auto l = MasterRegionLayout::of(3, 8, 4096, 4096, 0);
  Aligned mem(l.total);
  MasterRegion a(mem.p, mem.n, 3, 8, l), b(mem.p, mem.n, 3, 8, l);
  a.initialize(shape_of(ml));
  a.set_ready();
  CHECK_FALSE(b.claimed(1));
  a.claim(1);
  CHECK_FALSE(b.claimed(1));  // taken, handles not yet written
  std::memset(a.handle(1, 7), 0xab, MasterRegionLayout::kHandleBytes);
  a.publish_claim(1);
  CHECK(b.claimed(1));
  CHECK(b.handle(1, 7)[MasterRegionLayout::kHandleBytes - 1] == 0xab);
  CHECK(b.handle(1, 6)[0] == 0);
  CHECK(b.handle(2, 0)[0] == 0);
  CHECK_THROWS_WITH_AS(b.claim(1), doctest::Contains("taken"), ConfigError);
  CHECK_THROWS_WITH_AS(b.claim(3), doctest::Contains("3 seats"), ConfigError);
  b.claim(0);
  b.claim(2);
  // The parts do not overlap the claims: writing every handle leaves them as they are.
  for (std::size_t s = 0; s < 3; ++s)
    for (std::size_t k = 0; k < 8; ++k) std::memset(a.handle(s, k), 0xff, MasterRegionLayout::kHandleBytes);
  std::memset(a.board(), 0xff, 4096);
  std::memset(a.masters(), 0xff, 4096);
  CHECK(b.claimed(1));
  b.check(shape_of(ml), std::chrono::milliseconds(10));
}

TEST_CASE("layout fingerprints tell models apart") {
  const std::uint64_t base = layout_fingerprint(layout());
  CHECK(base == layout_fingerprint(layout()));
  CHECK(base != layout_fingerprint(layout(41)));
  CHECK(base != layout_fingerprint(layout(40, 9)));
  CHECK(base != layout_fingerprint(layout(40, 8, "v")));
  CHECK(base != layout_fingerprint(layout(40, 8, "w", false)));
}
