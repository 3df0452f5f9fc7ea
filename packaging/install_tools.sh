#!/usr/bin/env bash
# Installs the packaging tools CI needs: Conan 2 from PyPI (packaging/conan/ci_offline.sh).
# vcpkg is not installed: CI has no network for it; packaging/vcpkg/ci_emulate.sh stands in.
set -euo pipefail
if command -v conan >/dev/null 2>&1 || python3 -c 'import conans.conan' >/dev/null 2>&1; then
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check "conan>=2,<3"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
