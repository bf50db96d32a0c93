#!/usr/bin/env bash
# The project's test command (README.md): every crate's tests, including the interop test that drives the
# server from a Python QUIC peer. Makes that peer's Python environment (aioquic from PyPI) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/interop-venv
if ! "$venv/bin/python" -c "import aioquic" 2>/dev/null; then
  echo "setting up $venv (aioquic for tools/interop/peer.py)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "aioquic>=1.2,<2"
fi
export FEDSLM_INTEROP_PYTHON="$PWD/$venv/bin/python"

cargo test --workspace "$@"
