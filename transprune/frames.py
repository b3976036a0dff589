"""Frames to tensors without torchvision: the shared pieces of the families' video preprocessing.

transformers' video processors need torchvision; where a processor has none, `transprune.video`
uses a stand-in that calls the family adapter's `video_pixel_values`, which builds on these.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def setting(obj, name, default=None):
    value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return default if value is None else value


def normalise_frames(frames: list[Image.Image], image_processor) -> torch.Tensor:
    """(T, 3, H, W) float32: rescaled to [0, 1] and normalised with the image processor's mean/std."""
    array = np.stack([np.asarray(f, dtype=np.float32) for f in frames]) * float(
        setting(image_processor, "rescale_factor", 1 / 255))
    if setting(image_processor, "do_normalize", True):
        mean = np.asarray(setting(image_processor, "image_mean", OPENAI_CLIP_MEAN), np.float32)
        std = np.asarray(setting(image_processor, "image_std", OPENAI_CLIP_STD), np.float32)
        array = (array - mean) / std
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
