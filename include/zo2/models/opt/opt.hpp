// zo2/models/opt/opt.hpp -- everything of the bundled OPT model: config, layouts, the CPU
// layer stack and the Hugging Face checkpoint loader / writer.
#pragma once

#include <zo2/models/opt/config.hpp>
#include <zo2/backend/cpu/transformer_kernels.hpp>
#include <zo2/models/opt/layout.hpp>
#include <zo2/models/opt/loader.hpp>
#include <zo2/models/opt/model.hpp>
