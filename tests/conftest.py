"""Shared fixtures: seeded float32 tiny models of each family, offline processors, test images."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Every invariant runs on each family listed here (a new family = one entry).
FAMILIES = ["llava", "llava_next", "video_llava", "llava_onevision", "qwen2_5_vl"]
ATTENTION = ["eager", "sdpa"]


@functools.lru_cache(maxsize=None)
def _build(family: str, attn: str):
    from transprune import tiny
    builder = {"llava": tiny.tiny_llava, "llava_next": tiny.tiny_llava_next, "video_llava": tiny.tiny_video_llava,
               "llava_onevision": tiny.tiny_llava_onevision, "qwen2_5_vl": tiny.tiny_qwen2_5_vl}[family]
    return builder(attn_implementation=attn)


def tiny_model(family: str, attn: str = "sdpa"):
    """(model, processor); built once per (family, attention) and shared, never mutated by tests."""
    return _build(family, attn)


def sample_image(width=200, height=120, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def make_inputs(processor, images, questions):
    """Processor inputs for a batch of (image or None, question) pairs, left-padded."""
    conversations = []
    for image, question in zip(images, questions):
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        conversations.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                           add_generation_prompt=True))
    present = [i for i in images if i is not None]
    kwargs = dict(text=conversations, return_tensors="pt", padding=True)
    if present:
        kwargs["images"] = present
    return dict(processor(**kwargs))


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def write_clip(path, draw_frame, frames: int, width: int, height: int, fps: int = 8, codec: str = "mpeg4"):
    """Encode a small video with PyAV; `draw_frame(i)` returns frame i as (height, width, 3) uint8."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(draw_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
