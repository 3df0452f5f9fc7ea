// zo2/io/safetensors.hpp -- read (memory-mapped) and write safetensors files, and open sharded
// Hugging Face checkpoints (model.safetensors.index.json) as one name space.
//
// Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
// N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}},
// then the data section; offsets are relative to its start. A file is untrusted input: every
// field is checked before a byte of tensor data is touched, and each failure names the file and
// the tensor.
//
// The parts (in safetensors/): posix_file.hpp (descriptors, mappings, atomic writes),
// reader.hpp (SafetensorsFile), checkpoint.hpp (SafetensorsCheckpoint: one file or an index),
// writer.hpp (write_safetensors), sharded_writer.hpp (ShardedSafetensorsWriter).
#pragma once

#include <zo2/io/safetensors/checkpoint.hpp>
#include <zo2/io/safetensors/posix_file.hpp>
#include <zo2/io/safetensors/reader.hpp>
#include <zo2/io/safetensors/sharded_writer.hpp>
#include <zo2/io/safetensors/writer.hpp>
