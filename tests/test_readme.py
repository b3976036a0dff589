"""The README's Python examples run as written, offline, with the rehearsal hub cache standing in for the Hub.

Each ```python block of README.md runs in a fresh namespace, in one new interpreter started in an empty
folder outside the checkout (so `import transprune` must come from the installed package, as for a
reader who followed the set-up; a development environment without `pip install -e .` gets the
checkout on PYTHONPATH instead). Blocks written for a GPU run on the CPU when there is no CUDA device:
"cuda" becomes "cpu" and float16 becomes float32; and every block generates 3 tokens instead of 32
(random weights never stop early); nothing else changes. The checkpoints they name
must be rehearsed ones (tests/hub_rehearsal.py): their real files, random weights.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from hub_rehearsal import REHEARSED

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import json, sys
for number, block in enumerate(json.load(sys.stdin)):
    exec(compile(block, f"README python block {number + 1}", "exec"), {"__name__": "__main__"})
    print(f"README python block {number + 1}: ran", flush=True)
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def on_this_machine(block: str) -> str:
    # Random weights never say eos: 3 new tokens instead of 32 (the block's names and calls are unchanged).
    block = block.replace("max_new_tokens=32", "max_new_tokens=3")
    if torch.cuda.is_available():
        return block
    return block.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32").replace('"float16"', '"float32"')


def test_readme_python_blocks_run_offline(rehearsal_hub, tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3
    rehearsed_ids = {item.repo_id for item in REHEARSED} | {item.name for item in REHEARSED}
    for block in blocks:
        for checkpoint in re.findall(r'(?:models\.load|from_pretrained)\("([^"]+)"', block):
            assert checkpoint in rehearsed_ids, f"the README names {checkpoint}, which is not rehearsed offline"
    env = dict(os.environ, HF_HUB_CACHE=str(rehearsal_hub), HF_HUB_OFFLINE="1")
    installed = subprocess.run([sys.executable, "-c", "import transprune"], cwd=tmp_path, env=env,
                               capture_output=True).returncode == 0
    if not installed:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps([on_this_machine(b) for b in blocks]),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(": ran") == len(blocks)
    assert "832 visual tokens" in done.stdout   # SmolVLM-256M: 13 tiles x 64 for the 640x480 picture
