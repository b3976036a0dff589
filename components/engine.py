"""Model loading and the timed baseline-vs-pruned run, with every failure turned into a UserError.

Nothing here imports Gradio: the UI pieces call it and show `UserError` messages as they are.
One `Engine` per app holds the policy (which models may load) and a small LRU of loaded models.
The loaded model is shared by all users; pruning settings travel with each call
(`LoadedModel.generate(config=...)` attaches and removes hooks per call under the model's lock),
so two users never see each other's settings.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import statistics
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch

from transprune import ConfigError, IncompatibleTransformersError, PruneConfig, PruningInputError
from transprune import methods
from transprune.adapters import UnsupportedModelError, for_model
from transprune.flops import model_shape
from transprune.measure import available_memory_bytes
from transprune.eval import heldout_record

from .speed import RealSizeSpeed, release_memory
from transprune.models import (REGISTRY, ContextError, LoadedModel, ModelLoadError, ModelSpec, check_fits_context,
                               context_length, default_device, load)

# The offline models tried, in order, when no model is named (the first that loads wins).
OFFLINE_DEFAULTS = ("shapes-llava", "tiny-llava")
# The default of a CPU-only Space that reaches the Hub, chosen by measurement (scripts/cpu_candidates.py;
# table and sources in docs/cpu_space.md; full-size architectures, random weights, a 640x480 photo, one
# thread of a shared Xeon, process CPU seconds). SmolVLM-256M with one 512-px view (CPU_PROCESSOR_KWARGS):
# a click (Engine.compare, 32 new tokens, 1 timing repeat) took 12.5-12.8 s (7.5-7.6 s wall with 2
# threads in a quiet spell), and High still shows on the language model's prefill (64 -> 8 visual
# tokens, 251 -> 177 ms). The others miss the free tier's 20 s:
# with the checkpoint's 13 tiles the vision tower alone takes 26 s per prefill (~114 s a click);
# SmolVLM-500M with one view decodes at half the speed (18.3 s a click, 29 s with 3 repeats);
# LLaVA-OneVision-0.5B's 400M-parameter SigLIP-so400m tower over AnyRes crops makes a prefill 50 s
# (19 s with a single crop), ~177 s a click (76 s). Peak RSS 1.5 GB (float32) of the Space's 16 GB.
CPU_SPACE_DEFAULT = "smolvlm-256m"
# Processor settings of registry models on a CPU (passed to AutoProcessor.from_pretrained). SmolVLM's
# vision tower, run once per 512-px tile, is most of a CPU prefill: a 640x480 photo makes 13 tiles
# (832 visual tokens) with the checkpoint's splitting, one without it (64 tokens).
CPU_PROCESSOR_KWARGS = {
    "smolvlm-256m": {"do_image_splitting": False},
    "smolvlm-500m": {"do_image_splitting": False},
}
# "Timing repeats" preset on a CPU-only Space (3 elsewhere): each repeat adds a baseline + pruned prefill
# pair (~4.3 s on one core for the default above: 21 s a click with 3 repeats, 12.5 s with 1).
CPU_SPACE_REPEATS = 1
DEFAULT_REPEATS = 3
ATTENTION_CHOICES = ("sdpa", "eager")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}


# An upload the cache clean-up (components/files.py) or Gradio's age limit already removed.
GONE = ("The uploaded {what} is no longer on the server (uploads are kept for a limited time): upload it again, "
        "then press Run.")


log = logging.getLogger("transprune.app")


class UserError(Exception):
    """Something the person at the UI can fix; the message says what to do and is shown as is."""


def logged(error: BaseException, what: str) -> str:
    """Log `error` with its traceback under a short reference, and return the reference, so a
    visitor's message can point to the log without showing server internals."""
    reference = uuid.uuid4().hex[:8]
    log.error("%s [%s]", what, reference, exc_info=error)
    return reference


# An absolute path that is not part of a URL (no ':' '/' '.' or word character just before it).
_SERVER_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.@+~-]+/)+[\w.@+~-]*")


def public_message(text: str, limit: int = 500) -> str:
    """`text` fit to show a visitor: server paths replaced, at most `limit` characters."""
    text = _SERVER_PATH.sub("(a file on the server)", str(text))
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _oom(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


# ---------------------------------------------------------------------------- model policy
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


@dataclass
class Settings:
    """App policy. allowed_models None = every registered model plus any Hub id of a supported
    family; a tuple = only those registered names (Space mode uses the whole registry)."""
    allowed_models: tuple[str, ...] | None = None
    device: str | None = None
    cache_size: int = 2


@dataclass
class Comparison:
    """What one click produced: both runs on the same inputs, and how they were timed."""
    model: str
    spec: ModelSpec
    device: str
    dtype: str
    question: str
    image_size: tuple[int, int]            # the image's, or one video frame's (W, H)
    config: PruneConfig                    # as requested (may be written for 32 layers)
    resolved: PruneConfig                  # the schedule on this model's depth
    baseline: object                       # transprune.models.Result
    pruned: object
    prefill_samples: dict = field(default_factory=dict)   # {"baseline": [ms...], "pruned": [ms...]}
    shape: tuple[int, int, int] = (0, 0, 0)               # hidden, intermediate, layers
    first: str = "baseline"                # which ran first in the answer pass
    frames: list | None = None             # the sampled video frames (PIL), None for an image

    def prefill_ms(self, which: str) -> float:
        return statistics.median(self.prefill_samples[which])

    @property
    def heldout(self) -> tuple[dict, dict] | None:
        """(this setting's record, the unpruned record) on the model's held-out questions, or None
        when the model has no such set or this setting was not measured on it."""
        path = self.spec.heldout_path
        return heldout_record(path, self.resolved) if path else None


class Engine:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.device = self.settings.device or default_device()
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._runs = itertools.count()
        self.unavailable: dict[str, str] = {}   # registry name -> why it failed to load, for labels
        self.real_size = RealSizeSpeed(self.device)   # "Speed at real size", cached per schedule

    # ------------------------------------------------------------------ which models
    def allowed(self, name: str) -> bool:
        if self.settings.allowed_models is not None:
            return name in self.settings.allowed_models
        return name in REGISTRY or bool(HUB_ID.match(name))

    def model_names(self) -> list[str]:
        return list(self.settings.allowed_models or REGISTRY)

    def label(self, name: str) -> str:
        spec = REGISTRY.get(name)
        text = spec.display_name if spec else f"{name} (Hugging Face id, downloads from the Hub)"
        return text + (" — not available here" if name in self.unavailable else "")

    def choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for the model dropdown."""
        return [(self.label(n), n) for n in self.model_names()]

    def video_enabled(self) -> bool:
        """Whether to show the video input: a video-capable model is offered and the library can
        prepare video inputs."""
        return any(REGISTRY[n].video for n in self.model_names() if n in REGISTRY)

    def video_example_model(self) -> str | None:
        """The model the video example switches to: the first offered video model that needs no
        download (a built-in one), else the first offered video model; None when none is offered."""
        video = [name for name in self.model_names() if REGISTRY.get(name) and REGISTRY[name].video]
        return next((name for name in video if REGISTRY[name].offline), video[0] if video else None)

    @property
    def on_cpu_space(self) -> bool:
        """A CPU-only Hugging Face Space (SPACE_ID set, no CUDA device): the free tier's 2 vCPUs."""
        return bool(os.environ.get("SPACE_ID")) and not self.device.startswith("cuda")

    def default_repeats(self) -> int:
        """The "Timing repeats" preset: fewer on a CPU-only Space, where each repeat is a full prefill pair."""
        return CPU_SPACE_REPEATS if self.on_cpu_space else DEFAULT_REPEATS

    def processor_kwargs(self, name: str) -> dict:
        """Processor settings this engine loads `name` with: CPU_PROCESSOR_KWARGS on a CPU, else none."""
        return {} if self.device.startswith("cuda") else CPU_PROCESSOR_KWARGS.get(name, {})

    def default_model(self, preferred: str | None = None, log=print) -> str:
        """`preferred` if it loads, else the first offline default that loads (the offline fallback).

        "auto" on a CPU-only Hugging Face Space that reaches the Hub (the free tier) first tries a small
        real checkpoint that answers in seconds on a CPU (CPU_SPACE_DEFAULT); offline, shapes-llava.
        """
        candidates = [preferred] if preferred and preferred != "auto" else []
        if not candidates and self.on_cpu_space and self.allowed(CPU_SPACE_DEFAULT) and hub_reachable():
            candidates.append(CPU_SPACE_DEFAULT)
        candidates += [n for n in OFFLINE_DEFAULTS if n not in candidates and self.allowed(n)]
        candidates += [n for n in self.model_names() if REGISTRY.get(n) and REGISTRY[n].offline
                       and n not in candidates]
        for name in candidates:
            try:
                self.get(name)
                return name
            except UserError as error:
                log(f"[transprune] {name} is not available: {error}")
        raise UserError("No model could be loaded; check the installation (the built-in offline models "
                        "need no download).")

    def warm(self, name: str, image=None, question: str = "What color is the circle?"):
        """Run `name` once unpruned and once pruned (one new token each), so that the first visitor's
        click does not pay for first-call allocation and kernel selection. Errors are only logged."""
        from PIL import Image

        try:
            lm = self.get(name)
            image = image if image is not None else Image.new("RGB", (336, 336), (236, 236, 238))
            inputs = lm.prepare(image, question)
            for config in (None, "high"):
                lm.generate(image, question, config, max_new_tokens=1, inputs=inputs)
        except Exception as error:  # a warm-up must never stop the app
            print(f"[transprune] warm-up of {name} skipped: {type(error).__name__}: {error}")

    # ------------------------------------------------------------------ loading
    def get(self, name: str, dtype: str = "auto", attn: str = "sdpa", progress=None) -> LoadedModel:
        """The loaded model (from the cache when possible); raises UserError with what to do."""
        if not name or not self.allowed(name):
            offered = ", ".join(self.model_names())
            raise UserError(f"Model {name!r} is not offered by this app. Pick one of: {offered}.")
        if dtype not in DTYPE_CHOICES:
            raise UserError(f"Unknown dtype {dtype!r}. Choose one of: {', '.join(DTYPE_CHOICES)}.")
        if attn not in ATTENTION_CHOICES:
            raise UserError(f"Unknown attention implementation {attn!r}. Choose one of: "
                            f"{', '.join(ATTENTION_CHOICES)}.")
        key = (name, dtype, attn)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            spec = REGISTRY.get(name) or ModelSpec(name, name, family="", size="?", checkpoint=name)
            if progress:
                where = "building it offline" if spec.offline else f"from the Hub ({spec.checkpoint})"
                progress(0.05, desc=f"Loading {spec.label}: {where}…")
            if not spec.offline:
                self._check_can_download(spec, dtype)
                # A big model needs the room: drop other downloaded models first.
                for other in [k for k in self._models if not REGISTRY.get(k[0], spec).offline]:
                    del self._models[other]
                release_memory()
            lm = self._load(spec, name, dtype, attn)
            self.unavailable.pop(name, None)
            self._models[key] = lm
            while len(self._models) > max(1, self.settings.cache_size):
                self._models.popitem(last=False)
            return lm

    def _check_can_download(self, spec: ModelSpec, dtype: str):
        if not cached_on_disk(spec.checkpoint) and not hub_reachable():
            raise UserError(f"{spec.label} cannot be downloaded: the Hugging Face Hub is not reachable from "
                            "this machine and the model is not in the local cache. Pick a built-in offline "
                            "model (tiny-llava), or run the app where the Hub is reachable.")
        params = parameter_count(spec.size)
        free = free_memory_bytes(self.device)
        bytes_per = BYTES_PER_PARAM.get(dtype, 2 if self.device.startswith("cuda") else 4)
        if params and free and params * bytes_per * 1.1 > free:
            raise UserError(f"{spec.label} does not fit in memory here: it needs about "
                            f"{params * bytes_per / 2**30:.0f} GiB as {dtype if dtype != 'auto' else 'loaded'}"
                            f" but {self.device} has {free / 2**30:.0f} GiB free. Pick float16/bfloat16, "
                            "a smaller model, or a built-in offline model.")

    def _load(self, spec: ModelSpec, name: str, dtype: str, attn: str) -> LoadedModel:
        try:
            lm = load(name, device=self.device, dtype=None if dtype == "auto" else dtype,
                      attn_implementation=attn, processor_kwargs=self.processor_kwargs(name))
            for_model(lm.model)  # refuse unsupported architectures now, not at the first run
            return lm
        except (ModelLoadError, UnsupportedModelError) as error:
            self.unavailable[name] = str(error)
            raise UserError(str(error)) from error
        except Exception as error:
            self.unavailable[name] = str(error)
            if _oom(error):
                release_memory()
                raise UserError(f"{spec.label} does not fit in memory on {self.device}. Pick float16/bfloat16, "
                                "a smaller model, or a built-in offline model.") from error
            reference = logged(error, f"loading {name} failed")
            raise UserError(f"{spec.label} could not be loaded (error {reference} in the server log). "
                            "Pick another model.") from error

    # ------------------------------------------------------------------ the comparison
    def compare(self, name: str, image, question: str, config: PruneConfig, max_new_tokens: int = 32,
                repeats: int = 3, dtype: str = "auto", attn: str = "sdpa", progress=None,
                video=None) -> Comparison:
        """Unpruned baseline and pruned run on the same inputs, greedy, timed fairly.

        `image` is a PIL image, or None when `video` (a file path) is given instead.

        Both paths are warmed once (one new token each). The answer pass runs both in an order
        that alternates from one call to the next; `repeats - 1` more prefill-only pairs, again
        alternating, give the median prefill time.
        """
        lm = self.get(name, dtype, attn, progress)
        adapter = for_model(lm.model)
        config = lm.config_for(config)   # the model's recommended position mode where the config leaves it unset
        try:
            resolved = adapter.resolve(config, lm.model)
        except ConfigError as error:
            raise UserError(f"Impossible pruning schedule for {lm.spec.label}: {error}") from error
        pre_stage = methods.pre_llm_stage(resolved)
        if pre_stage is not None:
            try:
                pre_stage.check_model(lm.model)
            except UnsupportedModelError:
                raise UserError(f"{pre_stage.label} runs on {pre_stage.supported_models} only; {lm.spec.label} is a "
                                f"{adapter.family} model. Pick another method or a model it supports.") from None
        steps = 2 + 2 + 2 * max(0, repeats - 1) + (video is not None)
        done = itertools.count(1)

        def step(what):
            if progress:
                progress(next(done) / (steps + 1), desc=what)

        try:
            torch.manual_seed(config.seed)
            clip = None
            if video is not None:
                step("Decoding and sampling the video…")
                clip = _as_video(lm, video)
            inputs = _prepare(lm, image, clip, question)
            _check_context(lm, inputs, max_new_tokens)

            def generate(run_config, new_tokens):
                media = dict(video=clip) if clip is not None else {}
                return lm.generate(image, question, run_config, max_new_tokens=new_tokens, inputs=inputs, **media)
            samples = {"baseline": [], "pruned": []}
            runs = {"baseline": None, "pruned": config}
            for which in runs:  # warm-up: first calls pay for allocation and kernel selection
                step(f"Warming up the {which} path…")
                generate(runs[which], 1)
            first = "baseline" if next(self._runs) % 2 == 0 else "pruned"
            order = [first, "pruned" if first == "baseline" else "baseline"]
            results = {}
            for which in order:
                step(f"Generating the {which} answer…")
                results[which] = generate(runs[which], max_new_tokens)
                samples[which].append(results[which].timings["prefill_ms"])
            for repeat in range(max(0, repeats - 1)):
                for which in (order if repeat % 2 else order[::-1]):
                    step(f"Timing prefill ({which}, repeat {repeat + 2} of {repeats})…")
                    samples[which].append(generate(runs[which], 1).timings["prefill_ms"])
        except UserError:
            raise
        except IncompatibleTransformersError as error:   # its message names the versions and the fix
            raise UserError(str(error)) from error
        except PruningInputError as error:
            raise UserError(f"This input cannot be pruned: {error}") from error
        except ConfigError as error:
            raise UserError(f"Impossible pruning schedule: {error}") from error
        except Exception as error:
            if _oom(error):
                release_memory()
                raise UserError(f"Ran out of memory during the run on {lm.device}. Try fewer new tokens, a "
                                "smaller image, float16/bfloat16, or a smaller model.") from error
            reference = logged(error, f"run on {name} failed")
            raise UserError(f"The run failed inside the model (error {reference} in the server log). Try float32, "
                            "sdpa attention or another model.") from error
        if results["pruned"].trace is None:
            raise UserError("The prompt had no visual tokens to prune; upload an image.")
        return Comparison(model=name, spec=lm.spec, device=str(lm.device), dtype=str(lm.dtype).replace("torch.", ""),
                          question=question, image_size=tuple(clip.size if clip else image.size), config=config,
                          resolved=resolved, baseline=results["baseline"], pruned=results["pruned"],
                          prefill_samples=samples, shape=model_shape(lm.model), first=first,
                          frames=clip.frames if clip else None)


def _prepare(lm: LoadedModel, image, clip, question: str) -> dict:
    """The processor's inputs; a failure here is the processor's (tokenizer, image or frame
    preprocessing), never reported as the model's."""
    try:
        return lm.prepare_video(clip, question) if clip is not None else lm.prepare(image, question)
    except (UserError, PruningInputError, ConfigError):
        raise
    except Exception as error:
        if _oom(error):
            raise        # the caller's memory advice applies
        reference = logged(error, "preparing the inputs failed")
        what = "video" if clip is not None else "image"
        raise UserError(f"The model's processor could not read this question or {what} (error {reference} in the "
                        f"server log). Rephrase the question in plain words or try another {what}.") from error


def _check_context(lm: LoadedModel, inputs: dict, max_new_tokens: int):
    """The prompt and the answer must fit the model's context: the library's check, in the page's words."""
    try:
        check_fits_context(int(inputs["input_ids"].shape[1]), max_new_tokens, context_length(lm.model))
    except ContextError as error:
        fix = (f"set Max new tokens (Advanced) to at most {error.room}" if error.room else
               "shorten the question or use a smaller image")
        raise UserError(f"This prompt is {error.prompt_tokens} tokens and {lm.spec.label}'s context is "
                        f"{error.context} positions: {fix}.") from None


def _as_video(lm: LoadedModel, path):
    """The sampled video (transprune.video.Video); its errors become UserErrors with their summary.

    The file goes in as a file object, so the library calls it "the uploaded video" instead of
    naming the server's upload path, and the decoder's own text (VideoError.detail) stays in the log.
    """
    from transprune.video import VideoError

    try:
        with open(path, "rb") as file:
            return lm.as_video(file)
    except FileNotFoundError:
        raise UserError(GONE.format(what="video")) from None
    except VideoError as error:
        if error.detail:
            log.info("video refused: %s", error)
        raise UserError(error.summary) from None


def gpu_task(fn, duration: int = 120):
    """`spaces.GPU(duration)(fn)` on Hugging Face ZeroGPU Spaces (the `spaces` package), else fn itself."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)
