#!/usr/bin/env bash
# The project's test command (README.md): every crate's tests, including the interop test that drives the
# server from a Python QUIC peer and the cross-check of DICOM reading against pydicom. Makes their Python
# environment (aioquic, pydicom with its JPEG plugins, from PyPI) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

# The TCP transport's tests go through a real HTTP proxy (Debian's tinyproxy).
if ! command -v tinyproxy >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq tinyproxy
  else
    echo "the proxy tests need tinyproxy: sudo apt-get install tinyproxy" >&2
    exit 1
  fi
fi

venv=target/interop-venv
if ! "$venv/bin/python" -c "import aioquic, pydicom, numpy, pylibjpeg, safetensors" 2>/dev/null; then
  echo "setting up $venv (aioquic, pydicom and safetensors for the interop tests)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "aioquic>=1.2,<2" "pydicom>=3,<4" numpy pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg safetensors
fi
export FEDSLM_INTEROP_PYTHON="$PWD/$venv/bin/python"

cargo test --workspace "$@"
