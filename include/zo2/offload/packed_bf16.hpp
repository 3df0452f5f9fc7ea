// zo2/offload/packed_bf16.hpp -- bf16 values, losslessly, in ~12.3 bits: the format that lets a
// 16-bit offloaded step move fewer bytes than one 16-bit copy each way.
//
// Why: an offloaded step is PCIe-bound; at OPT-6.7B one bf16 copy of the blocks each way takes
// 0.25 s at 51 GB/s, above half the PyTorch reference's 0.45 s. The information in OPT-scale
// bf16 weights is smaller than 16 bits: within 32 neighbouring elements the exponents span a
// few binades, so an exponent relative to the neighbourhood's largest needs 4 bits, not 8.
//
// The format (per group, i.e. one ParamLayout; element j = the layout's flat index, so tensor r
// starts at layout.offset(r), a multiple of 32, and a chunk of 32 never straddles tensors):
//
//   [0, n)                 low byte of element j: sign << 7 | the 7 mantissa bits
//   [n, n + n/2)           4-bit code of element j (element 2i in the low nibble of byte i):
//                            0..13  exponent = E - code, E the chunk's largest exponent field
//                            14     escape: the exponent is in the tensor's escape list
//                            15     exponent field 0 (zero, or a bf16 subnormal)
//   [1.5n, 1.5n + n/32)    E of chunk j / 32 (0 for an all-zero chunk)
//   then, 16-aligned:      escape count of each tensor (uint32), then, 16-aligned, each
//                          tensor's escape list: uint64 entries (element index within the tensor)
//                          << 32 | exponent, sorted by index, at most escape_capacity(r) of them
//
// So it is exact for every bf16 value, inf and NaN included (they only push their chunk's
// neighbours into the escape list). n is the layout's total (padding encodes as zero). Escapes
// are elements more than 13 binades below their chunk's largest: ~1e-4 of normally distributed
// weights. Each tensor has room for max(64, 0.5% of numel) of them, a fixed size (so a group is
// always bytes() long and one copy moves it); a tensor that needs more is refused with its name
// and count (host encode) -- keep such a model on the plain bf16 codec.
//
// Per element 12 bits plus 1/4 bit of chunk exponents plus 0.32 bits of escape room: 12.57 bits,
// 0.79 of bf16's bytes.
//
// Status: host encode / decode and their tests. The GPU side (decode on upload, update and
// re-encode in the fused pass, escape lists kept sorted) and HostOffload's use of it come next.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/parallel.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/platform.hpp>
#include <zo2/offload/codecs.hpp>

namespace zo2::offload {

/// The element-level rules of the packed format, for host code and (later) kernels.
struct PackedBf16 {
  static constexpr std::size_t kChunk = 32;
  static constexpr unsigned kMaxDistance = 13;  // codes 0..13: exponent E - code
  static constexpr unsigned kEscape = 14;
  static constexpr unsigned kZeroExponent = 15;
  static constexpr std::size_t kMinEscapes = 64;
  static constexpr double kEscapeFraction = 0.005;

  ZO2_HD ZO2_FORCEINLINE static unsigned exponent(std::uint16_t bits) { return (bits >> 7) & 0xffu; }
  ZO2_HD ZO2_FORCEINLINE static std::uint8_t low_byte(std::uint16_t bits) {
    return static_cast<std::uint8_t>(((bits >> 8) & 0x80u) | (bits & 0x7fu));
  }
  /// The code of an element with exponent field e in a chunk whose largest is E (>= e).
  ZO2_HD ZO2_FORCEINLINE static unsigned code(unsigned e, unsigned E) {
    if (e == 0) return kZeroExponent;
    return E - e <= kMaxDistance ? E - e : kEscape;
  }
  /// The bf16 bits back from the low byte and the exponent field.
  ZO2_HD ZO2_FORCEINLINE static std::uint16_t bits(std::uint8_t low, unsigned e) {
    return static_cast<std::uint16_t>((static_cast<unsigned>(low & 0x80u) << 8) | (e << 7) | (low & 0x7fu));
  }
  /// The exponent field a non-escape code stands for.
  ZO2_HD ZO2_FORCEINLINE static unsigned exponent_of(unsigned code, unsigned E) {
    return code == kZeroExponent ? 0u : E - code;
  }
  /// An escape list entry: the element's index within its tensor in the high half (so sorting
  /// entries as integers sorts them by index), its exponent field in the low byte.
  ZO2_HD ZO2_FORCEINLINE static std::uint64_t escape_entry(std::uint64_t index, unsigned e) { return index << 32 | e; }
  ZO2_HD ZO2_FORCEINLINE static std::uint64_t entry_index(std::uint64_t entry) { return entry >> 32; }
  ZO2_HD ZO2_FORCEINLINE static unsigned entry_exponent(std::uint64_t entry) { return static_cast<unsigned>(entry & 0xffu); }
};

/// Where tensor r of a group lives in the packed buffer.
struct PackedTensor {
  std::size_t offset;           // first element (the ParamLayout offset, a multiple of 32)
  std::size_t numel;
  std::size_t escape_offset;    // first entry of its escape list, in entries
  std::size_t escape_capacity;  // entries
};

/// One group's packed form: size, geometry, host encode / decode (the GroupCodec interface).
class PackedBf16Group {
 public:
  static constexpr const char* name = "bf16-packed";

  PackedBf16Group() = default;
  explicit PackedBf16Group(const ParamLayout& layout) {
    total_ = layout.total_elements();
    n_ = round_up(total_, PackedBf16::kChunk);
    std::size_t escapes = 0;
    for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
      if (layout.offset(r) % PackedBf16::kChunk != 0)
        throw Error(std::string(name) + ": tensor " + layout.spec(r).name + " starts at element " +
                    std::to_string(layout.offset(r)) + ", not a multiple of 32");
      const std::size_t numel = layout.spec(r).numel();
      if (numel > 0xffffffffull)
        throw Error(std::string(name) + ": tensor " + layout.spec(r).name + " has more than 2^32 elements");
      const auto room = static_cast<std::size_t>(static_cast<double>(numel) * PackedBf16::kEscapeFraction + 0.999);
      const std::size_t capacity = std::max(PackedBf16::kMinEscapes, room);
      tensors_.push_back(PackedTensor{layout.offset(r), numel, escapes, capacity});
      names_.push_back(layout.spec(r).name);
      escapes += capacity;
    }
    counts_offset_ = round_up(n_ + n_ / 2 + n_ / PackedBf16::kChunk, 16);
    entries_offset_ = round_up(counts_offset_ + tensors_.size() * sizeof(std::uint32_t), 16);
    bytes_ = entries_offset_ + escapes * sizeof(std::uint64_t);
  }

  /// Bytes of one packed group: what rests in host memory and crosses PCIe.
  std::size_t bytes() const { return bytes_; }
  std::size_t total_elements() const { return total_; }
  std::size_t num_tensors() const { return tensors_.size(); }
  const PackedTensor& tensor(std::size_t r) const {
    if (r >= tensors_.size())
      throw Error(std::string(name) + ": tensor index " + std::to_string(r) + " out of range (" +
                  std::to_string(tensors_.size()) + " tensors)");
    return tensors_[r];
  }
  std::size_t codes_offset() const { return n_; }
  std::size_t exponents_offset() const { return n_ + n_ / 2; }
  std::size_t counts_offset() const { return counts_offset_; }
  std::size_t entries_offset() const { return entries_offset_; }

  /// Escapes tensor r holds in `block`.
  std::uint32_t escape_count(std::size_t r, std::span<const unsigned char> block) const {
    check_block(block.size(), "escape_count");
    (void)tensor(r);
    std::uint32_t count;
    std::memcpy(&count, block.data() + counts_offset_ + r * sizeof(std::uint32_t), sizeof count);
    return count;
  }

  /// Encodes tensor r from bf16 values (numel of them), exactly. Throws, naming the tensor, when
  /// it needs more escapes than its room.
  void encode_bf16(std::size_t r, std::span<const bfloat16> values, std::span<unsigned char> block) const {
    check_count(r, values.size(), "encode", "values");
    encode_with(r, [&](std::size_t j) { return values[j].bits; }, block);
  }

  /// Encodes tensor r from floats, rounded to bf16 as Bf16Codec rounds them: to nearest, or
  /// stochastically with the low 16 bits of random_words[j] (numel words, or none).
  void encode(std::size_t r, std::span<const float> values, std::span<const std::uint32_t> random_words,
              std::span<unsigned char> block) const {
    const PackedTensor& t = tensor(r);
    if (values.size() != t.numel || (!random_words.empty() && random_words.size() != t.numel))
      throw Error(std::string(name) + ": encode of " + names_[r] + " got " + std::to_string(values.size()) +
                  " values and " + std::to_string(random_words.size()) + " random words, expected " +
                  std::to_string(t.numel) + " and 0 or " + std::to_string(t.numel));
    if (random_words.empty())
      encode_with(r, [&](std::size_t j) { return to_bfloat16(values[j]).bits; }, block);
    else
      encode_with(r, [&](std::size_t j) { return to_bfloat16_stochastic(values[j], random_words[j]).bits; }, block);
  }

  /// Decodes tensor r into bf16 values (numel of them).
  void decode_bf16(std::size_t r, std::span<const unsigned char> block, std::span<bfloat16> out) const {
    check_count(r, out.size(), "decode", "values");
    decode_with(r, block, [&](std::size_t j, std::uint16_t bits) { out[j] = bfloat16{bits}; });
  }

  void decode(std::size_t r, std::span<const unsigned char> block, std::span<float> out) const {
    check_count(r, out.size(), "decode", "floats");
    decode_with(r, block, [&](std::size_t j, std::uint16_t bits) { out[j] = to_float(bfloat16{bits}); });
  }

  /// Whole group from / to a float flat buffer laid out by the same ParamLayout (round to
  /// nearest). Padding encodes as zero. A large group is spread over all cores in pieces of
  /// whole 32-element chunks; each piece lists its escapes, and a tensor's lists are joined in
  /// piece order: the same bytes as one core's.
  void encode_group(std::span<const float> flat, std::span<unsigned char> block) const {
    check_block(block.size(), "encode_group");
    check_flat(flat.size(), "encode_group");
    // Padding reads as zeros: zero bytes everywhere but the exponent codes, whose zero is
    // kZeroExponent in each nibble; each byte is written once.
    parallel_fill(block.first(codes_offset()), 0);
    parallel_fill(block.subspan(codes_offset(), exponents_offset() - codes_offset()),
                  static_cast<unsigned char>(PackedBf16::kZeroExponent * 0x11u));
    parallel_fill(block.subspan(exponents_offset()), 0);
    const std::vector<Piece> pieces = cut_into_pieces(
        tensors_.size(), [&](std::size_t r) { return tensors_[r].numel; },
        [](std::size_t) { return PackedBf16::kChunk; }, std::size_t{1} << 20);
    std::vector<std::vector<std::uint64_t>> escapes(pieces.size());
    parallel_for(
        pieces.size(),
        [&](std::size_t i) {
          const Piece& p = pieces[i];
          const float* values = flat.data() + tensors_[p.item].offset;
          encode_chunks(p.item, p.begin, p.end, [&](std::size_t j) { return to_bfloat16(values[j]).bits; }, block,
                        escapes[i]);
        },
        threads_for(total_));
    for (std::size_t i = 0; i < pieces.size();) {  // each tensor's pieces, joined in order
      std::vector<std::uint64_t> joined = std::move(escapes[i]);
      const std::size_t r = pieces[i].item;
      for (++i; i < pieces.size() && pieces[i].item == r; ++i)
        joined.insert(joined.end(), escapes[i].begin(), escapes[i].end());
      store_escapes(r, joined, block);
    }
  }
  void decode_group(std::span<const unsigned char> block, std::span<float> flat) const {
    check_flat(flat.size(), "decode_group");
    std::fill(flat.begin(), flat.end(), 0.0f);
    for (std::size_t r = 0; r < tensors_.size(); ++r)
      decode(r, block, flat.subspan(tensors_[r].offset, tensors_[r].numel));
  }

 private:
  static std::size_t round_up(std::size_t v, std::size_t m) { return (v + m - 1) / m * m; }
  void check_flat(std::size_t size, const char* what) const {
    if (size != total_)
      throw Error(std::string(name) + ": " + what + " got " + std::to_string(size) + " floats, the layout has " +
                  std::to_string(total_) + " elements");
  }
  void check_count(std::size_t r, std::size_t size, const char* what, const char* of) const {
    const PackedTensor& t = tensor(r);
    if (size != t.numel)
      throw Error(std::string(name) + ": " + what + " of " + names_[r] + " got " + std::to_string(size) + " " + of +
                  ", expected " + std::to_string(t.numel));
  }

  /// The encoder: bits_of(j) gives element j's bf16 bits.
  template <class BitsOf>
  void encode_with(std::size_t r, BitsOf&& bits_of, std::span<unsigned char> block) const {
    check_block(block.size(), "encode");
    std::vector<std::uint64_t> escapes;
    encode_chunks(r, 0, tensor(r).numel, bits_of, block, escapes);
    store_escapes(r, escapes, block);
  }
  /// Elements [begin, end) of tensor r (begin a multiple of 32), chunk by chunk (padding past
  /// numel encodes as zero): each chunk's low bytes and codes built here and stored with two
  /// copies; its escapes appended to `escapes` in index order.
  template <class BitsOf>
  void encode_chunks(std::size_t r, std::size_t begin, std::size_t end, BitsOf&& bits_of,
                     std::span<unsigned char> block, std::vector<std::uint64_t>& escapes) const {
    const PackedTensor& t = tensors_[r];
    for (std::size_t c0 = begin; c0 < end; c0 += PackedBf16::kChunk) {
      std::uint16_t b[PackedBf16::kChunk] = {};
      const std::size_t len = std::min(PackedBf16::kChunk, end - c0);
      unsigned E = 0;
      for (std::size_t k = 0; k < len; ++k) {
        b[k] = bits_of(c0 + k);
        E = std::max(E, PackedBf16::exponent(b[k]));
      }
      const std::size_t j0 = t.offset + c0;
      block[exponents_offset() + j0 / PackedBf16::kChunk] = static_cast<unsigned char>(E);
      unsigned char low[PackedBf16::kChunk], codes[PackedBf16::kChunk / 2];
      for (std::size_t k = 0; k < PackedBf16::kChunk; k += 2) {
        const unsigned e0 = PackedBf16::exponent(b[k]), e1 = PackedBf16::exponent(b[k + 1]);
        const unsigned code0 = PackedBf16::code(e0, E), code1 = PackedBf16::code(e1, E);
        if (code0 == PackedBf16::kEscape) escapes.push_back(PackedBf16::escape_entry(c0 + k, e0));
        if (code1 == PackedBf16::kEscape) escapes.push_back(PackedBf16::escape_entry(c0 + k + 1, e1));
        low[k] = PackedBf16::low_byte(b[k]);
        low[k + 1] = PackedBf16::low_byte(b[k + 1]);
        codes[k / 2] = static_cast<unsigned char>(code0 | code1 << 4);  // element j in nibble j % 2
      }
      std::memcpy(block.data() + j0, low, sizeof low);
      std::memcpy(block.data() + codes_offset() + j0 / 2, codes, sizeof codes);
    }
  }
  /// Tensor r's escape count and list (in index order), or an error naming the tensor when the
  /// list exceeds its room.
  void store_escapes(std::size_t r, const std::vector<std::uint64_t>& escapes, std::span<unsigned char> block) const {
    const PackedTensor& t = tensors_[r];
    if (escapes.size() > t.escape_capacity)
      throw Error(std::string(name) + ": " + names_[r] + " needs " + std::to_string(escapes.size()) +
                  " escapes (elements more than 13 binades below their 32-element chunk's largest), room for " +
                  std::to_string(t.escape_capacity) + ": use the bf16 codec for this model");
    const auto count = static_cast<std::uint32_t>(escapes.size());
    std::memcpy(block.data() + counts_offset_ + r * sizeof(std::uint32_t), &count, sizeof count);
    if (!escapes.empty())  // (an empty vector's data() may be null, which memcpy must not get)
      std::memcpy(block.data() + entries_offset_ + t.escape_offset * sizeof(std::uint64_t), escapes.data(),
                  escapes.size() * sizeof(std::uint64_t));
  }

  /// The decoder: put(j, bits) receives element j's bf16 bits. Checks the codes against their
  /// chunk's E (a code 0..13 must name an exponent field in 1..E), the escape list against the
  /// codes (each escape code has the list's next entry, whose exponent is one the encoder would
  /// have escaped, and no entry is left over): a corrupt block throws, naming the tensor and
  /// element.
  template <class Put>
  void decode_with(std::size_t r, std::span<const unsigned char> block, Put&& put) const {
    const PackedTensor& t = tensor(r);
    check_block(block.size(), "decode");
    const std::uint32_t count = escape_count(r, block);
    if (count > t.escape_capacity)
      throw Error(std::string(name) + ": " + names_[r] + " records " + std::to_string(count) +
                  " escapes, more than its room of " + std::to_string(t.escape_capacity) + " (a corrupt block)");
    std::vector<std::uint64_t> escapes(count);
    if (count != 0)  // (an empty vector's data() may be null, which memcpy must not get)
      std::memcpy(escapes.data(), block.data() + entries_offset_ + t.escape_offset * sizeof(std::uint64_t),
                  count * sizeof(std::uint64_t));
    auto corrupt = [&](std::size_t j, const std::string& why) {
      return Error(std::string(name) + ": " + names_[r] + " element " + std::to_string(j) + " " + why +
                   " (a corrupt block)");
    };
    std::size_t next = 0;  // escapes are in index order
    for (std::size_t c0 = 0; c0 < t.numel; c0 += PackedBf16::kChunk) {
      const std::size_t g0 = t.offset + c0;
      const unsigned E = block[exponents_offset() + g0 / PackedBf16::kChunk];
      const unsigned char* low = block.data() + g0;
      const unsigned char* codes = block.data() + codes_offset() + g0 / 2;
      const std::size_t len = std::min(PackedBf16::kChunk, t.numel - c0);
      // A code 0..13 must name a field in 1..E: only a chunk with E <= 13 can hold one that
      // does not (codes up to 13 are always below a larger E).
      if (E <= PackedBf16::kMaxDistance) {
        for (std::size_t k = 0; k < len; ++k) {
          const unsigned code = k % 2 ? codes[k / 2] >> 4 : codes[k / 2] & 0x0fu;
          if (code <= PackedBf16::kMaxDistance && code >= E)
            throw corrupt(c0 + k, "has exponent code " + std::to_string(code) + ", impossible below its chunk's " +
                                      "largest exponent field " + std::to_string(E));
        }
      }
      for (std::size_t k = 0; k < len; ++k) {
        const unsigned code = k % 2 ? codes[k / 2] >> 4 : codes[k / 2] & 0x0fu;
        unsigned e;
        if (code == PackedBf16::kEscape) {
          const std::size_t j = c0 + k;
          if (next >= escapes.size() || PackedBf16::entry_index(escapes[next]) != j)
            throw corrupt(j, "is an escape the list does not hold");
          const std::uint64_t entry = escapes[next++];
          e = PackedBf16::entry_exponent(entry);
          if ((entry & 0xffffff00u) != 0 || e == 0 || e + PackedBf16::kMaxDistance >= E)
            throw corrupt(j, "has an escape entry with exponent field " + std::to_string(entry & 0xffffffffu) +
                                 ", not one more than 13 binades below its chunk's " + std::to_string(E));
        } else {
          e = PackedBf16::exponent_of(code, E);
        }
        put(c0 + k, PackedBf16::bits(low[k], e));
      }
    }
    if (next != escapes.size())
      throw Error(std::string(name) + ": " + names_[r] + " records " + std::to_string(escapes.size()) +
                  " escapes, its codes use " + std::to_string(next) + " (a corrupt block)");
  }
  void check_block(std::size_t size, const char* what) const {
    if (size != bytes_)
      throw Error(std::string(name) + ": " + what + " got a block buffer of " + std::to_string(size) +
                  " bytes, the layout needs " + std::to_string(bytes_));
  }

  std::vector<PackedTensor> tensors_;
  std::vector<std::string> names_;
  std::size_t total_ = 0, n_ = 0, counts_offset_ = 0, entries_offset_ = 0, bytes_ = 0;
};

/// The codec HostOffload takes (HostOffload<Bf16PackedCodec, T>): bf16 values, packed.
struct Bf16PackedCodec {
  static constexpr const char* name = "bf16p";
  static constexpr std::size_t element_bytes = 2;  // of the values it carries; its size is PackedBf16Group::bytes()
  static constexpr bool row_scaled = false;
};

template <class C>
inline constexpr bool is_packed_codec_v = std::is_same_v<C, Bf16PackedCodec>;

/// The group-level codec of a codec: GroupCodec<C>, or PackedBf16Group for the packed one.
template <class C>
struct GroupCodecOf {
  using type = GroupCodec<C>;
};
template <>
struct GroupCodecOf<Bf16PackedCodec> {
  using type = PackedBf16Group;
};

}  // namespace zo2::offload
