#!/usr/bin/env bash
# Installs zo2's build dependencies from Debian's packages (needs root or sudo).
# The CUDA toolkit is optional and not installed here: with nvcc on PATH the CUDA parts build.
set -euo pipefail
# pkg-config, libpcre2-dev and libutf8proc-dev: the tokenizer.json reader (zo2::tokenizers); zo2
# builds without them, minus that reader.
pkgs=(cmake g++ make libeigen3-dev nlohmann-json3-dev doctest-dev pkg-config libpcre2-dev libutf8proc-dev)
# libopenmpi-dev and openmpi-bin: data-parallel training (zo2::mpi, mpirun -np N zo2-opt train) and its
# tests; zo2 builds without them and trains in one process.
pkgs+=(libopenmpi-dev openmpi-bin)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
