#!/usr/bin/env bash
# The lmms-eval integration's tests in their own environment .venvs/lmms-eval: the pinned set
# (requirements.txt + pytest), then requirements-lmms-eval.txt WITHOUT dependencies (lmms-eval's own
# would pull torchvision and another torch), then tests/test_lmms_eval.py, which runs an lmms-eval task
# defined in the test, offline, on the shipped shapes-llava. Not part of scripts/test.sh (CI's time);
# run it after touching transprune/lmms_eval.py or eval_questions.py. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh .venvs/lmms-eval -r requirements.txt pytest==9.0.3
.venvs/lmms-eval/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-lmms-eval.txt
.venvs/lmms-eval/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "== lmms-eval integration: $(.venvs/lmms-eval/bin/python -m pip list 2>/dev/null | grep -E '^(lmms_eval|torch) ' | tr -s ' ' | paste -sd,)"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venvs/lmms-eval/bin/python -m pytest -q tests/test_lmms_eval.py "$@"
