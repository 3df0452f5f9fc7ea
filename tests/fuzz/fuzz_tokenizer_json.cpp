// libFuzzer harness: a Hugging Face tokenizer.json (io::TokenizerJson::from_file: the BPE model,
// normalizers, pre-tokenizers with their PCRE2 patterns, added tokens, post-processor, decoder)
// and a text to encode with it. An accepted tokenizer must encode any text (invalid UTF-8
// included) and decode what it encoded.
//   input: tokenizer.json  <separator>  text
#include <zo2/io/tokenizer_json.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2_fuzz::clear_scratch();
  const auto parts = zo2_fuzz::split_parts(data, size, 2);
  const auto path = zo2_fuzz::write_scratch("tokenizer.json", parts[0]);
  try {
    const zo2::io::TokenizerJson tokenizer = zo2::io::TokenizerJson::from_file(path);
    const std::string_view text = parts.size() > 1 ? parts[1] : std::string_view("Hello, world! 123 café 🙂");
    for (const bool special : {false, true}) {
      const std::vector<std::int32_t> ids = tokenizer.encode(text, special);
      (void)tokenizer.decode(ids, special);
    }
  } catch (const zo2::Error&) {
  }
  return 0;
}
