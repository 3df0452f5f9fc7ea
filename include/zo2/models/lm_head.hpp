// zo2/models/lm_head.hpp -- whether a bundled model family's configuration ties the LM head to
// the token embedding, known before any model is built (an offload plan needs it: an untied
// head lets the blocks reuse the prologue's perturbed copy, OffloadOptions::prologue_scratch_shared).
#pragma once

namespace zo2::models {

/// OPT always ties (its config has no switch); the LLaMA family says so in tie_word_embeddings.
/// The models answer the same at run time (epilogue_reads_prologue).
template <class Config>
bool ties_lm_head(const Config& config) {
  if constexpr (requires { config.tie_word_embeddings; })
    return static_cast<bool>(config.tie_word_embeddings);
  else
    return true;
}

}  // namespace zo2::models
