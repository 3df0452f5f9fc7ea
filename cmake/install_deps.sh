#!/usr/bin/env bash
# Installs zo2's build dependencies from Debian's packages (needs root or sudo).
# The CUDA toolkit is optional and not installed here: with nvcc on PATH the CUDA parts build.
set -euo pipefail
pkgs=(cmake g++ make libeigen3-dev nlohmann-json3-dev doctest-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
