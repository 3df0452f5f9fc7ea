// zo2/core/param_layout.hpp -- how one parameter group (prologue, a block, epilogue) is laid out.
//
// A group's tensors live in one flat buffer, each at an offset rounded up to kTensorAlignment
// elements. One flat buffer per block is what lets the offload engine move a block with a single
// copy and lets one kernel launch perturb or update a whole block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <string>
#include <string_view>
#include <vector>

#include <zo2/core/error.hpp>

namespace zo2 {

/// Offsets are multiples of this many elements: 16-byte vector access for every dtype, and
/// Philox quads (4 elements) never straddle two tensors.
inline constexpr std::size_t kTensorAlignment = 32;

struct TensorSpec {
  std::string name;
  std::vector<std::int64_t> shape;
  /// Whether weight decay applies (weights: yes; biases and LayerNorm parameters: no).
  bool weight_decay = true;

  /// Product of the dimensions; throws ShapeError naming the tensor when a dimension is
  /// negative or the product does not fit in std::size_t.
  std::size_t numel() const {
    std::size_t n = 1;
    for (const std::int64_t d : shape) {
      if (d < 0)
        throw ShapeError("tensor '" + name + "' has a negative dimension " + std::to_string(d));
      const auto u = static_cast<std::size_t>(d);
      if (u != 0 && n > std::numeric_limits<std::size_t>::max() / u)
        throw ShapeError("tensor '" + name + "': the element count of its shape overflows std::size_t");
      n *= u;
    }
    return n;
  }
};

class ParamLayout {
 public:
  /// Appends a tensor and returns its index within the group.
  std::size_t add(std::string name, std::vector<std::int64_t> shape, bool weight_decay = true) {
    for (auto d : shape)
      if (d <= 0) throw ShapeError("tensor '" + name + "' has a non-positive dimension");
    if (find(name) != npos) throw ShapeError("tensor '" + name + "' added twice to a layout");
    TensorSpec spec{std::move(name), std::move(shape), weight_decay};
    const std::size_t n = spec.numel();
    constexpr std::size_t kMax = std::numeric_limits<std::size_t>::max();
    if (n > kMax - kTensorAlignment || round_up(n) > kMax - total_)
      throw ShapeError("tensor '" + spec.name + "': the group's element count overflows std::size_t");
    offsets_.push_back(total_);
    total_ += round_up(n);
    specs_.push_back(std::move(spec));
    return specs_.size() - 1;
  }

  std::size_t num_tensors() const { return specs_.size(); }
  /// Elements of the flat buffer, padding included.
  std::size_t total_elements() const { return total_; }
  const TensorSpec& spec(std::size_t i) const { return specs_.at(i); }
  std::size_t offset(std::size_t i) const { return offsets_.at(i); }
  const std::vector<TensorSpec>& specs() const { return specs_; }

  static constexpr std::size_t npos = static_cast<std::size_t>(-1);
  std::size_t find(std::string_view name) const {
    for (std::size_t i = 0; i < specs_.size(); ++i)
      if (specs_[i].name == name) return i;
    return npos;
  }
  std::size_t index_of(std::string_view name) const {
    const std::size_t i = find(name);
    if (i == npos) throw ShapeError("no tensor named '" + std::string(name) + "' in this layout");
    return i;
  }

  friend bool operator==(const ParamLayout& a, const ParamLayout& b) {
    if (a.specs_.size() != b.specs_.size()) return false;
    for (std::size_t i = 0; i < a.specs_.size(); ++i)
      if (a.specs_[i].name != b.specs_[i].name || a.specs_[i].shape != b.specs_[i].shape ||
          a.specs_[i].weight_decay != b.specs_[i].weight_decay)
        return false;
    return true;
  }

 private:
  static std::size_t round_up(std::size_t n) {
    return (n + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
  }
  std::vector<TensorSpec> specs_;
  std::vector<std::size_t> offsets_;
  std::size_t total_ = 0;
};

/// A group's flat buffer seen through its layout. T may be const.
template <class T>
class ParamView {
 public:
  ParamView() = default;
  ParamView(T* data, const ParamLayout* layout) : data_(data), layout_(layout) {}
  /// A view of const T from a view of T.
  template <class U>
    requires std::is_same_v<const U, T> && (!std::is_same_v<U, T>)
  ParamView(const ParamView<U>& other) : data_(other.data()), layout_(&other.layout()) {}

  T* data() const { return data_; }
  const ParamLayout& layout() const { return *layout_; }
  T* tensor(std::size_t i) const { return data_ + layout_->offset(i); }
  T* tensor(std::string_view name) const { return tensor(layout_->index_of(name)); }
  std::size_t numel(std::size_t i) const { return layout_->spec(i).numel(); }

 private:
  T* data_ = nullptr;
  const ParamLayout* layout_ = nullptr;
};

}  // namespace zo2
