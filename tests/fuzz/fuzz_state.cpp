// libFuzzer harness: a checkpoint's state.json (examples/zo2_opt/checkpoint.cpp read_state and
// saved_progress). Every field a resume reads is checked for type and range; an accepted state
// must give a progress within those ranges, and every checked field must read as its type.
#include "checkpoint.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2_fuzz::clear_scratch();
  zo2_fuzz::write_scratch("state.json", {reinterpret_cast<const char*>(data), size});
  try {
    const nlohmann::json state = zo2_opt::read_state(zo2_fuzz::scratch_dir());
    const zo2_opt::SavedProgress p = zo2_opt::saved_progress(state);
    ZO2_FUZZ_CHECK(p.step <= 0xffffffffull);
    ZO2_FUZZ_CHECK(p.skipped_steps <= p.step && p.updates <= p.step);
    // What a resume reads next: the sections as objects, their settings by type.
    for (const char* section : {"optimizer", "train"}) {
      if (!state.contains(section) || state[section].is_null()) continue;
      ZO2_FUZZ_CHECK(state[section].is_object());
    }
    if (state.contains("train") && state["train"].is_object()) {
      const auto& train = state["train"];
      if (train.contains("batch") && !train["batch"].is_null()) {
        const auto batch = train["batch"].get<std::uint64_t>();
        ZO2_FUZZ_CHECK(batch >= 1 && batch <= (std::uint64_t{1} << 16));
      }
      if (train.contains("seq_len") && !train["seq_len"].is_null()) ZO2_FUZZ_CHECK(train["seq_len"].get<std::uint64_t>() >= 2);
    }
    // find_checkpoint resolves the directory that holds state.json to itself.
    ZO2_FUZZ_CHECK(zo2_opt::find_checkpoint(zo2_fuzz::scratch_dir()) == zo2_fuzz::scratch_dir());
  } catch (const zo2::Error&) {
  }
  return 0;
}
