"""What the machine offers a download: whether the Hub answers, what is cached, how much memory is free.

The app asks these before it loads a Hub checkpoint (components/loading.py), so a model that cannot
come or cannot fit is refused with a sentence instead of failing half-way.
"""

from __future__ import annotations

import os
import re
import socket
import time
from urllib.parse import urlparse

import torch

from transprune.measure import available_memory_bytes

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}


def parameter_count(size: str) -> float | None:
    """"7B" -> 7e9, "0.9M" -> 9e5; None when the registry gives no size ("?")."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMB])\s*", size or "")
    if not match:
        return None
    return float(match.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9}[match.group(2)]


def free_memory_bytes(device: str) -> int | None:
    """Memory a new model could use on `device`: free GPU memory, or MemAvailable on Linux."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return available_memory_bytes()


_hub_checked: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect (cached for a minute). Offline mode: False."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", constants.ENDPOINT))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    now = time.monotonic()
    if host in _hub_checked and now - _hub_checked[host][0] < 60:
        return _hub_checked[host][1]
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    _hub_checked[host] = (now, reachable)
    return reachable


def cached_on_disk(checkpoint: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(checkpoint, "config.json"), str)
    except Exception:  # a malformed id or an unreadable cache: treat as not cached
        return False
