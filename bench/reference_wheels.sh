#!/usr/bin/env bash
# bench/reference_wheels.sh -- downloads (from PyPI, here) the wheels the reference's Hugging Face
# path needs on the GPU machine, whose transformers is 5.x: transformers 4.51.3 with the
# tokenizers, huggingface_hub and requests it imports, into .whl/ (git-ignored, ~14 MB). Carry it:
#   run(command="python3 bench/run_reference.py .reference --runs qwen3_8b:zo2", carry=[".reference", ".whl"])
# bench/reference_hf.py installs them with --no-deps into a private folder; torch stays the machine's.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$root/.whl"
python3 -m pip download --no-deps --dest "$root/.whl" "transformers==4.51.3" "tokenizers==0.21.1" \
  "huggingface_hub==0.30.2" requests urllib3 idna charset_normalizer certifi
ls -la "$root/.whl"
