"""Loading models for the app: the offline fallback, the download checks and a small LRU of loaded models.

`ModelLoader` is one part of `components.engine.Engine`; it reads the policy (`components.policy`)
through `self`, asks `components.hub` whether a download can come and fit, and turns every load
failure into a UserError that says what to pick instead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from transprune.adapters import UnsupportedModelError, for_model
from transprune.models import REGISTRY, LoadedModel, ModelLoadError, ModelSpec, load

from . import hub
from .errors import UserError, logged, out_of_memory
from .policy import CPU_SPACE_DEFAULT, OFFLINE_DEFAULTS
from .speed import release_memory

ATTENTION_CHOICES = ("sdpa", "eager")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


class ModelLoader:
    """The loaded models of one app (an LRU of `settings.cache_size`), shared by all its users."""
    _models: OrderedDict
    _lock: threading.Lock

    def default_model(self, preferred: str | None = None, log=print) -> str:
        """`preferred` if it loads, else the first offline default that loads (the offline fallback).

        "auto" on a CPU-only Hugging Face Space that reaches the Hub (the free tier) first tries a small
        real checkpoint that answers in seconds on a CPU (CPU_SPACE_DEFAULT); offline, shapes-llava.
        """
        candidates = [preferred] if preferred and preferred != "auto" else []
        if not candidates and self.on_cpu_space and self.allowed(CPU_SPACE_DEFAULT) and hub.hub_reachable():
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
        if not hub.cached_on_disk(spec.checkpoint) and not hub.hub_reachable():
            raise UserError(f"{spec.label} cannot be downloaded: the Hugging Face Hub is not reachable from "
                            "this machine and the model is not in the local cache. Pick a built-in model (Shapes LLaVA, "
                            "the trained one, or a Tiny one), or run the app where the Hub is reachable.")
        params = hub.parameter_count(spec.size)
        free = hub.free_memory_bytes(self.device)
        bytes_per = hub.BYTES_PER_PARAM.get(dtype, 2 if self.device.startswith("cuda") else 4)
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
            if out_of_memory(error):
                release_memory()
                raise UserError(f"{spec.label} does not fit in memory on {self.device}. Pick float16/bfloat16, "
                                "a smaller model, or a built-in offline model.") from error
            reference = logged(error, f"loading {name} failed")
            raise UserError(f"{spec.label} could not be loaded (error {reference} in the server log). "
                            "Pick another model.") from error
