"""Peak torch CPU memory of one prefill with a long question: unpruned against each method.

    PYTHONPATH=. python scripts/scoring_memory.py [--words 8000] [--model shapes-llava] [--attn sdpa]

Runs the raw model (no `LoadedModel.generate`, whose context check refuses a prompt longer than
shapes-llava's 512 positions) on one image and a question of `--words` words, once unpruned and
once per preset, and reports the peak of the bytes torch's CPU allocator held during each prefill
(`transprune.measure.torch_cpu_peak_bytes`). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
from PIL import Image

import transprune
from transprune import models
from transprune.measure import torch_cpu_peak_bytes

METHODS = ["high", "fastv", "pdrop", "sparsevlm"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", type=int, default=8000, help="words in the question (after the image)")
    parser.add_argument("--model", default="shapes-llava", help="an offline registry name")
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    args = parser.parse_args(argv)
    lm = models.load(args.model, attn_implementation=args.attn)
    words = ["what", "color", "is", "the", "circle", "?"]
    question = " ".join(words[i % len(words)] for i in range(args.words))
    inputs = lm.prepare(Image.new("RGB", (64, 64), "red"), question)

    def prefill(preset):
        def run():
            with torch.no_grad():
                if preset is None:
                    lm.model(**inputs)
                    return
                with transprune.apply(lm.model, lm.config_for(preset)):
                    lm.model(**inputs)
        return run

    peaks = {"baseline": torch_cpu_peak_bytes(prefill(None)) / 2 ** 20}
    for preset in METHODS:
        peaks[preset] = torch_cpu_peak_bytes(prefill(preset)) / 2 ** 20
    tokens = inputs["input_ids"].shape[1]
    print(f"{args.model}, {args.attn}, {tokens} prompt tokens: peak torch CPU memory of one prefill")
    for name, peak in peaks.items():
        print(f"  {name:10s} {peak:8.1f} MB  {peak / peaks['baseline']:5.2f} x baseline")
    print(json.dumps(dict(model=args.model, attn=args.attn, tokens=tokens, peak_mb=peaks)))


if __name__ == "__main__":
    main()
