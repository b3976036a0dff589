"""Clocks, peak memory and dtype names shared by `transprune.models` (the app's timings) and
`transprune.bench`: one implementation of each, so both report the same quantities."""

from __future__ import annotations

import re
import resource
import time

import torch

# Names accepted for a dtype on the command line and in the app.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype):
    """A torch dtype from a name in DTYPES (None and dtypes pass through)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def sync(device: torch.device):
    """Wait for the device's queued work (a no-op on CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TokenClock:
    """A generate() streamer noting when each new token is ready (the first one: end of prefill)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps, self._prompt_seen = device, [], False

    def put(self, value):
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux: VmHWM, VmRSS) in MB; None where there is none."""
    try:
        with open("/proc/self/status") as handle:
            return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1)) / 1024.0
    except (OSError, AttributeError):
        return None


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_memory_mb(device: torch.device) -> float:
    """CUDA: memory allocated now; CPU: the process's resident set now (VmRSS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mb("VmRSS") or 0.0


class ModuleTimer:
    """Wall time spent inside some modules' forward calls (summed), e.g. a model's vision encoders.

    A forward pre-hook and a forward hook on each read the clock (after syncing the device); `with`
    attaches them and removes them on exit. `ms` is the total over every call made inside the block.
    The modules must not call one another (their times would count twice).
    """

    def __init__(self, modules, device: torch.device):
        self.modules, self.device, self.ms, self._start, self._handles = list(modules), device, 0.0, None, []

    def __enter__(self):
        for module in self.modules:
            self._handles += [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]
        return self

    def _enter(self, module, args):
        sync(self.device)
        self._start = time.perf_counter()

    def _exit(self, module, args, output):
        sync(self.device)
        self.ms += (time.perf_counter() - self._start) * 1000.0

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False


def torch_cpu_peak_bytes(run) -> int:
    """Peak of the bytes torch's CPU allocator holds while `run()` runs, above what it held before.

    Replays, in order, the allocation and free events that torch.profiler records with
    profile_memory=True. Unlike the peak RSS (VmHWM) it sees only tensors, and it does not depend on
    what the C allocator keeps after a free, which makes runs of the same code give the same number.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        run()
    events = sorted((event.start_ns(), event.nbytes()) for event in profile.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def cache_megabytes(cache) -> float | None:
    """MB held by a KV cache's tensors (the keys and values of every layer, what each layer kept);
    None for no cache or one this does not know how to read."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    held = 0
    for layer in layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                held += tensor.numel() * tensor.element_size()
    return held / 2**20
