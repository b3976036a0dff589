#!/usr/bin/env bash
# Usage: scripts/venv.sh DIR PIP-ARGS...   Creates (or, with TRANSPRUNE_FRESH_VENV=1, re-creates) the virtual
# environment DIR from this machine's python3, installs torch==2.13.0 first (a CPU wheel where the machine
# offers one; any other torch request could pull a multi-GB CUDA build), then PIP-ARGS.
set -euo pipefail
dir=$1; shift
if [ "${TRANSPRUNE_FRESH_VENV:-0}" = 1 ] || [ ! -x "$dir/bin/python" ]; then
    rm -rf "$dir"
    python3 -m venv "$dir"
fi
"$dir/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
