// zo2/optim/parameter_store.hpp -- the master copy of a layer stack's parameters, in storage
// precision S, one flat buffer per group, and the global tensor ids the noise is keyed on.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/optim/layer_stack.hpp>

namespace zo2 {

/// Layouts of all groups of a model and the first global tensor id of each group.
///
/// Tensor ids (the Philox stream word) are global and stable: prologue tensors come first, then
/// block 0's, block 1's, ..., then the epilogue's. They depend only on the model's layouts, so a
/// checkpoint resumes with the same noise.
class ModelLayout {
 public:
  ModelLayout(ParamLayout prologue, ParamLayout block, std::size_t num_blocks, ParamLayout epilogue)
      : prologue_(std::move(prologue)), block_(std::move(block)), epilogue_(std::move(epilogue)),
        num_blocks_(num_blocks) {
    if (num_blocks_ == 0) throw ConfigError("num_blocks", "a layer stack needs at least one block");
    if (block_.num_tensors() == 0) throw ConfigError("block_layout", "a block has no tensors");
    const std::uint64_t total = prologue_.num_tensors() + num_blocks_ * block_.num_tensors() +
                                epilogue_.num_tensors();
    if (total >= kRoundingStream)
      throw ConfigError("num_blocks", "more than 2^31 tensors cannot be given distinct noise streams");
  }

  template <LayerStack M>
  static ModelLayout of(const M& model) {
    return ModelLayout(model.prologue_layout(), model.block_layout(), model.num_blocks(),
                       model.epilogue_layout());
  }

  std::size_t num_blocks() const { return num_blocks_; }
  std::size_t num_groups() const { return num_blocks_ + 2; }
  GroupIndex prologue() const { return {0}; }
  GroupIndex block(std::size_t i) const { return {1 + i}; }
  GroupIndex epilogue() const { return {num_blocks_ + 1}; }

  const ParamLayout& layout(GroupIndex g) const {
    if (g.value == 0) return prologue_;
    if (g.value <= num_blocks_) return block_;
    if (g.value == num_blocks_ + 1) return epilogue_;
    throw Error("group index out of range");
  }
  std::uint32_t first_tensor_id(GroupIndex g) const {
    if (g.value == 0) return 0;
    const std::size_t p = prologue_.num_tensors();
    if (g.value <= num_blocks_) return static_cast<std::uint32_t>(p + (g.value - 1) * block_.num_tensors());
    return static_cast<std::uint32_t>(p + num_blocks_ * block_.num_tensors());
  }
  std::size_t total_elements() const {
    return prologue_.total_elements() + num_blocks_ * block_.total_elements() + epilogue_.total_elements();
  }

 private:
  ParamLayout prologue_, block_, epilogue_;
  std::size_t num_blocks_;
};

/// Host-resident master parameters in storage type S.
template <class S>
class ParameterStore {
 public:
  explicit ParameterStore(ModelLayout layout) : layout_(std::move(layout)) {
    buffers_.resize(layout_.num_groups());
    for (std::size_t g = 0; g < buffers_.size(); ++g)
      buffers_[g].assign(layout_.layout(GroupIndex{g}).total_elements(), S{});
  }

  const ModelLayout& model_layout() const { return layout_; }
  ParamView<S> group(GroupIndex g) { return {buffers_.at(g.value).data(), &layout_.layout(g)}; }
  ParamView<const S> group(GroupIndex g) const { return {buffers_.at(g.value).data(), &layout_.layout(g)}; }
  std::size_t num_groups() const { return buffers_.size(); }

  friend bool operator==(const ParameterStore& a, const ParameterStore& b) {
    if (a.buffers_.size() != b.buffers_.size()) return false;
    for (std::size_t g = 0; g < a.buffers_.size(); ++g) {
      if (a.buffers_[g].size() != b.buffers_[g].size()) return false;
      if (a.buffers_[g].empty()) continue;  // an empty group: no pointer to compare (memcmp wants one)
      if (std::memcmp(a.buffers_[g].data(), b.buffers_[g].data(), a.buffers_[g].size() * sizeof(S)) != 0)
        return false;
    }
    return true;
  }

 private:
  ModelLayout layout_;
  std::vector<std::vector<S>> buffers_;
};

}  // namespace zo2
