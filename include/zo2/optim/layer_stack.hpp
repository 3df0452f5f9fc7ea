// zo2/optim/layer_stack.hpp -- what a model must provide to be fine-tuned by ZOOptimizer.
//
// A layer stack is: a resident prologue (e.g. embeddings), num_blocks() blocks that share one
// parameter layout (the part that streams through the GPU), and a resident epilogue that ends in
// a scalar loss. The model owns no parameters: every forward function receives a view of its
// group's flat buffer, so the optimizer and the offload policy decide where parameters live and
// hand the model a perturbed copy. The epilogue also receives the prologue's parameters, so an
// output layer may share weights with an input layer (OPT's LM head is its token embedding);
// both views carry the same perturbation. The functions are const: a model is a description plus
// hyper-parameters, and all scratch state lives in the Workspace the caller passes in.
#pragma once

#include <concepts>
#include <cstddef>

#include <zo2/core/param_layout.hpp>

namespace zo2 {

template <class M>
concept LayerStack =
    requires(const M& model, std::size_t block, ParamView<const typename M::value_type> params,
             const typename M::Batch& batch, const typename M::Activation& in,
             typename M::Activation& out, typename M::Workspace& workspace) {
      typename M::value_type;  // precision the forward reads parameters in (float or double)
      typename M::Batch;
      requires std::default_initializable<typename M::Activation>;
      requires std::default_initializable<typename M::Workspace>;
      { model.num_blocks() } -> std::convertible_to<std::size_t>;
      { model.prologue_layout() } -> std::convertible_to<ParamLayout>;
      { model.block_layout() } -> std::convertible_to<ParamLayout>;
      { model.epilogue_layout() } -> std::convertible_to<ParamLayout>;
      { model.prologue(params, batch, out, workspace) };
      { model.forward_block(block, params, in, out, workspace) };
      { model.epilogue(params, params, in, batch, workspace) } -> std::convertible_to<double>;
    };

/// Whether `model`'s epilogue reads the prologue's parameters (a tied LM head reads the token
/// embedding): a model says so with `bool epilogue_reads_prologue() const`; one without that
/// member is taken to read them. Where it does not, the optimizer hands the epilogue an empty
/// prologue view, and an offload policy may reuse the prologue's perturbed copy for the blocks.
template <class M>
bool epilogue_reads_prologue(const M& model) {
  if constexpr (requires {
                  { model.epilogue_reads_prologue() } -> std::convertible_to<bool>;
                })
    return model.epilogue_reads_prologue();
  else
    return true;
}

/// Which parameter group: the prologue, block i, or the epilogue. Groups are numbered
/// 0 (prologue), 1..N (blocks), N+1 (epilogue).
struct GroupIndex {
  std::size_t value;
};

}  // namespace zo2
