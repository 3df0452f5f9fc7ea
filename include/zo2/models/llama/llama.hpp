// zo2/models/llama/llama.hpp -- everything of the bundled LLaMA-family model (LLaMA 2/3,
// Qwen2/2.5/3, Mistral): config, layouts, the CPU layer stack and the Hugging Face checkpoint
// loader / writer.
#pragma once

#include <zo2/models/llama/config.hpp>
#include <zo2/backend/cpu/transformer_kernels.hpp>
#include <zo2/models/llama/layout.hpp>
#include <zo2/models/llama/loader.hpp>
#include <zo2/models/llama/model.hpp>
