#!/usr/bin/env bash
# Installs what the fuzz harnesses need from Debian's packages (root or sudo): clang and its
# runtime libraries (libFuzzer, ASan, UBSan). tests/run_all.sh runs it when fuzzing is on.
set -euo pipefail
pkgs=(clang libclang-rt-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
