# The fuzz harnesses and the example sources each links (shared by tests/fuzz/CMakeLists.txt,
# which builds them for libFuzzer, and tests/CMakeLists.txt, which replays their corpus).
set(ZO2_FUZZ_HARNESSES safetensors safetensors_index opt_config opt_loader llama_config bpe tokenizer_json data state
    encoded_state packed_bf16)
# Harnesses that test zo2-opt's own parsers (examples/zo2_opt) link these of its sources.
set(ZO2_FUZZ_OPT_HARNESSES data state encoded_state)
# Harnesses of the tokenizer.json reader need zo2::tokenizers (PCRE2, utf8proc): skipped without it.
set(ZO2_FUZZ_TOKENIZER_HARNESSES tokenizer_json)
set(ZO2_FUZZ_OPT_SOURCES cli.cpp checkpoint.cpp model_setup.cpp tokenizer.cpp fs_util.cpp data.cpp)
