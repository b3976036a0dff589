#!/usr/bin/env bash
# Fills .whl/ (in .gitignore) with the pinned packages the GPU machine's image lacks or has at other versions,
# as Python 3.12 x86-64 wheels: the GPU machine reaches no network, so scripts/gpu_check.sh installs them
# from there (--no-index --no-deps), keeping the image's own CUDA torch. Run it here, then carry .whl along.
# The image had transformers 5.17 and huggingface_hub 1.33 (transformers 5.24 needs hub >= 1.31, and hub 2.x
# needs httpx2); versions below are requirements.txt's and the ones this project's machines resolve to.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 \
    truststore==0.10.5 click==8.5.1 hf-xet==1.8.0 typer==0.29.2 pytest==9.0.3
# FlashAttention-2 has no PyPI wheel for every CUDA/torch pair; take one if there is, else the bench skips it.
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl flash-attn \
    || echo "no flash-attn wheel; gpu_check.sh will time sdpa only"
du -sh .whl
