#!/usr/bin/env bash
# The README's test command and what CI runs (.ci/run). On a fresh Debian/Ubuntu machine it:
#  1. installs Debian's Chromium for the browser test (when run as root; never `playwright install`);
#  2. creates .venvs/pinned with exactly requirements.txt + requirements-dev.txt, installs the package as the
#     README's set-up does (`pip install -e .`), checks `import transprune` works outside the checkout, and
#     runs the whole suite (the real-checkpoint rehearsal reads ../shared/fixtures/hf-hub, the sibling
#     `shared` folder of the checkout; tests/test_rehearsal.py);
#  3. runs scripts/test_oldest.sh: the core correctness tests on the oldest supported transformers.
# The environments are the scripts' own, so packages installed by hand elsewhere never leak in.
# Set TRANSPRUNE_FRESH_VENV=1 to rebuild them from nothing (CI does). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the browser test will be skipped"
fi
bash scripts/venv.sh .venvs/pinned -r requirements.txt -r requirements-dev.txt
.venvs/pinned/bin/python -m pip install -q --disable-pip-version-check -e .
(cd "$(mktemp -d)" && "$OLDPWD/.venvs/pinned/bin/python" -c "import transprune") \
    || { echo "scripts/test.sh: import transprune fails outside the checkout after pip install -e ." >&2; exit 1; }
echo "== whole suite, pinned set: $(.venvs/pinned/bin/python -c 'import transformers, torch, gradio; print(f"transformers {transformers.__version__}, torch {torch.__version__}, gradio {gradio.__version__}")')"
.venvs/pinned/bin/python -m pytest -q tests "$@"
.venvs/pinned/bin/python -m transprune.doctor
bash scripts/test_oldest.sh
echo "scripts/test.sh: everything passed in $(( $(date +%s) - start )) s"
