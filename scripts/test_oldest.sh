#!/usr/bin/env bash
# The core correctness tests (keep-all bit identity, pruned prefill and decoding vs the slow reference for
# every family, peer methods, the dependency contract) on the OLDEST transformers the library declares
# (pyproject.toml), in its own environment .venvs/oldest. The version is read from transprune/compat.py.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/^OLDEST_TESTED_TRANSFORMERS = "\(.*\)"$/\1/p' transprune/compat.py)
bash scripts/venv.sh .venvs/oldest "transformers==$oldest" accelerate==1.15.0 safetensors==0.8.0 packaging==26.2 \
    pillow==12.3.0 numpy==2.4.6 av==18.1.0 pytest==9.0.3
echo "== core tests, oldest supported transformers: $(.venvs/oldest/bin/python -c 'import transformers; print(transformers.__version__)')"
.venvs/oldest/bin/python -m pytest -q tests/test_pruning.py tests/test_peers.py tests/test_compat.py \
    tests/test_scoring.py tests/test_config.py tests/test_sequence.py tests/test_smolvlm.py tests/test_sparsevlm.py \
    tests/test_gemma3.py tests/test_qwen3_vl.py tests/test_internvl.py "$@"
