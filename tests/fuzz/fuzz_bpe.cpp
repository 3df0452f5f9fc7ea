// libFuzzer harness: a GPT-2 byte-level BPE tokenizer, vocab.json and merges.txt, and a text
// to encode (input: vocab, separator, merges, separator, text). An accepted tokenizer must
// encode the text in bounded time (libFuzzer's -timeout catches the quadratic cases) and, when
// the encoding succeeds, decode it back to the same bytes.
#include <zo2/io/bpe_tokenizer.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2_fuzz::clear_scratch();
  const auto parts = zo2_fuzz::split_parts(data, size, 3);
  const auto vocab = zo2_fuzz::write_scratch("vocab.json", parts[0]);
  const auto merges = zo2_fuzz::write_scratch("merges.txt", parts.size() > 1 ? parts[1] : std::string_view());
  const std::string_view text = parts.size() > 2 ? parts[2] : std::string_view();
  std::optional<zo2::io::BpeTokenizer> tokenizer;
  try {
    tokenizer.emplace(zo2::io::BpeTokenizer::from_files(vocab, merges));
  } catch (const zo2::Error&) {
    return 0;
  }
  std::vector<std::int32_t> ids;
  try {
    ids = tokenizer->encode(text, /*add_bos=*/false);
  } catch (const zo2::Error&) {
    return 0;  // a vocabulary without all 256 byte tokens cannot encode every text
  }
  for (const std::int32_t id : ids) ZO2_FUZZ_CHECK(id >= 0 && static_cast<std::size_t>(id) < tokenizer->vocab_size());
  ZO2_FUZZ_CHECK(tokenizer->decode(ids) == text);
  try {
    const auto with_bos = tokenizer->encode(text, /*add_bos=*/true);
    ZO2_FUZZ_CHECK(with_bos.size() == ids.size() + 1 && with_bos[0] == tokenizer->bos_id());
  } catch (const zo2::Error&) {  // no bos token in the vocabulary
  }
  return 0;
}
