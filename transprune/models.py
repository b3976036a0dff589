"""Model registry and the one generation entry point the app, the benchmark and the eval share.

    lm = transprune.models.load("tiny-llava")                  # offline, random weights, seconds
    lm = transprune.models.load("llava-1.5-7b", device="cuda", dtype="float16")
    result = lm.generate(image, "What is in the picture?", config=transprune.PruneConfig.preset("high"))
    result.text, result.trace, result.timings

Real checkpoints load with `from_pretrained` (never trust_remote_code); offline entries build
from code in seconds and need no network.
"""

from __future__ import annotations

import numbers
import threading
import time
from dataclasses import dataclass, field

import torch

from . import adapters
from .config import PruneConfig
from .errors import ModelLoadError, UnsupportedModelError
from .images import as_image
from .measure import (ModuleTimer, TokenClock, cache_megabytes, current_memory_mb, parse_dtype, peak_memory_mb,
                      reset_peak_memory, sync)
from .resolve import for_model as resolve_for_model, recommended
from .runner import apply
from .spec import ModelSpec
from .trace import PruneTrace


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"Model {spec.name!r} is already registered.")
    REGISTRY[spec.name] = spec
    return spec


# Every family's models, as its adapter declares them (`Adapter.models`): the offline ones first (the
# app's offline fallback takes the first that loads), then the Hub checkpoints, each in family order.
for _spec in sorted(adapters.MODELS.values(), key=lambda spec: not spec.offline):
    register(_spec)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(name: str, device: str | None = None, dtype=None, attn_implementation: str | None = None,
         device_map: str | None = None, processor_kwargs: dict | None = None) -> "LoadedModel":
    """Load a registered model (or any Hugging Face id of a supported family) with its processor.

    `processor_kwargs` (Hub checkpoints) override the checkpoint's processor settings, e.g.
    `{"do_image_splitting": False}`: SmolVLM's single 512-px view (the app's CPU setting).

    `device_map="auto"` (Hub checkpoints) lets accelerate spread a model too large for one GPU over
    all visible GPUs; `device` is then ignored. Offline models are tiny and always go to `device`.
    """
    device = device or default_device()
    dtype = parse_dtype(dtype)
    if name in REGISTRY:
        spec = REGISTRY[name]
    elif "/" in name:
        spec = ModelSpec(name, name, family="", size="?", checkpoint=name)
    else:
        raise ModelLoadError(f"Unknown model {name!r}. Registered models: {', '.join(REGISTRY)}; "
                             "or pass a Hugging Face id such as llava-hf/llava-1.5-7b-hf.")
    if spec.offline:
        model, processor = spec.builder()
        if attn_implementation:
            model.config._attn_implementation = attn_implementation
            model.config.text_config._attn_implementation = attn_implementation
        model = model.to(device=device, dtype=dtype or torch.float32)
    else:
        model, processor = _from_pretrained(spec, device, dtype, attn_implementation, device_map, processor_kwargs)
    return LoadedModel(spec=spec, model=model.eval(), processor=processor)


def _from_pretrained(spec: ModelSpec, device: str, dtype, attn_implementation, device_map: str | None = None,
                     processor_kwargs: dict | None = None):
    import transformers
    from transformers import AutoConfig

    from .processors import load_processor

    on_gpu = device.startswith("cuda") or (device_map is not None and torch.cuda.is_available())
    dtype = dtype or (torch.float16 if on_gpu else torch.float32)
    try:
        config = AutoConfig.from_pretrained(spec.checkpoint)
        # The class config.json names (a family can have several: SmolVLM's checkpoints are Idefics3 or
        # SmolVLM classes); a registered entry's family must handle it.
        model_class = (getattr(transformers, config.architectures[0]) if not spec.family
                       else adapters.by_family(spec.family).model_class(config))
        kwargs = dict(dtype=dtype)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if device_map is not None or device.startswith("cuda"):
            kwargs["device_map"] = device_map or device
        model = model_class.from_pretrained(spec.checkpoint, **kwargs)
        if "device_map" not in kwargs:
            model = model.to(device)
        # AutoProcessor, or without torchvision the same processor minus its video part (transprune.processors).
        processor = load_processor(spec.checkpoint, config.model_type, **(processor_kwargs or {}))
        if getattr(processor, "tokenizer", None) is not None:
            # generate() continues every row of a batch at its last column, so pad before the prompt
            # (SmolVLM's and Qwen2.5-VL's tokenizers pad on the right by default).
            processor.tokenizer.padding_side = "left"
    except torch.cuda.OutOfMemoryError as error:
        raise ModelLoadError(f"{spec.label} does not fit in GPU memory ({error}). Pick a smaller model or "
                             "dtype=float16/bfloat16.") from error
    except UnsupportedModelError as error:
        raise ModelLoadError(f"Cannot load {spec.checkpoint} as {spec.label}: {error}.") from error
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Could not load {spec.checkpoint} from the Hugging Face Hub: {error}. Check the "
                             "network connection and the model id, or pick a built-in offline model.") from error
    return model, processor


@dataclass
class Result:
    text: str
    trace: PruneTrace | None
    # prefill_ms, vision_ms (of prefill), decode_tokens_per_s, total_ms, new_tokens, peak_mb, kv_cache_mb,
    # run_memory_mb (CUDA; None on a CPU)
    timings: dict = field(default_factory=dict)
    output_ids: torch.Tensor | None = None
    inputs: dict | None = None
    video: object | None = None    # transprune.video.Video actually used (sampled frames), None for images


def check_max_new_tokens(max_new_tokens) -> None:
    """TypeError / ValueError sentences for a max_new_tokens that is not a whole number >= 1."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be a whole number of tokens such as 32, got "
                        f"{type(max_new_tokens).__name__} {max_new_tokens!r:.40}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")


def context_length(model) -> int | None:
    """How many positions the language model was built for (max_position_embeddings), None if unknown."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(text_config, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    return int(length) if length else None


class ContextError(ValueError):
    """The prompt plus the new tokens do not fit the model's context; `room` new tokens would (0: none)."""

    def __init__(self, message: str, prompt_tokens: int, context: int):
        super().__init__(message)
        self.prompt_tokens, self.context = prompt_tokens, context
        self.room = max(context - prompt_tokens, 0)


def check_fits_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """ContextError (a ValueError) sentence when the prompt plus max_new_tokens exceed the model's context."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    if prompt_tokens >= context:
        raise ContextError(f"The prompt is {prompt_tokens} tokens, and this model's context is {context} positions; "
                           "shorten the question (or use a model with a longer context).", prompt_tokens, context)
    raise ContextError(f"The prompt is {prompt_tokens} tokens and this model's context is {context} positions, so at "
                       f"most {context - prompt_tokens} new tokens fit; pass max_new_tokens={context - prompt_tokens} "
                       f"or less (got {max_new_tokens}).", prompt_tokens, context)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    processor: object
    # Pruning hooks live on the model for the duration of one call; the lock keeps concurrent
    # callers (two app users) from ever running under each other's settings.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prompt(self, question: str, media: str = "image") -> str:
        content = [{"type": media}, {"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True)

    def prepare(self, image, question: str) -> dict:
        """Processor inputs for one image (see transprune.images.as_image: a path, bytes, a PIL image, an
        array or a tensor; None for a text-only prompt) and a question."""
        image = as_image(image)
        if image is None:
            inputs = self.processor(text=self.prompt(question, media="text").replace("  ", " "),
                                    return_tensors="pt")
        else:
            inputs = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    # -- video input (transprune.video) -------------------------------------------------------
    def as_video(self, video, num_frames: int | None = None):
        """A transprune.video.Video from a path / bytes (sampled with the family's default frame
        count unless `num_frames` is given), a list of PIL frames, or a Video; VideoError if the
        model takes no video or the file is unusable."""
        from .video import VideoError, as_video

        if not self.spec.video and not self._adapter.video_frames:
            video_models = ", ".join(name for name, spec in REGISTRY.items() if spec.video)
            raise VideoError(f"{self.spec.label} takes images only. Pick a video model: {video_models}.")
        return as_video(video, self._family, num_frames)

    @property
    def _adapter(self) -> adapters.Adapter:
        return adapters.for_model(self.model)

    @property
    def _family(self) -> str:
        return self._adapter.family

    def prepare_video(self, video, question: str, image=None, num_frames: int | None = None) -> dict:
        """Processor inputs for one video (path, frames or Video), an optional image and a question.

        The prompt holds the image (if any) first, then the video, then the question; each is its
        own visual span with its own keep budget.
        """
        from .video import video_inputs

        video = self.as_video(video, num_frames)
        image = as_image(image)
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "video"},
                                                                        {"type": "text", "text": question}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True)
        inputs = video_inputs(self.processor, self._family, [prompt], [video],
                              images=[image] if image is not None else None)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    def video_layout(self, video, num_tokens):
        return self._adapter.video_layout(self.model, self.processor, video.size, len(video.frames),
                                                  num_tokens)
    # -- end video input ---------------------------------------------------------------------

    def config_for(self, config: PruneConfig | str | None) -> PruneConfig | None:
        """`config` (a PruneConfig or preset name) with this model's recommended position mode filled
        in where it leaves `positions` unset (see ModelSpec.positions); None stays None. The pruner
        resolves the rest when it attaches (`transprune.resolve`)."""
        return recommended(config, self.spec)

    def resolve(self, config: PruneConfig | str) -> PruneConfig:
        """`config` resolved for this model as it will run (`transprune.resolve.for_model`)."""
        return resolve_for_model(self.model, config, self.spec)

    @torch.inference_mode()
    def generate(self, image, question: str, config: PruneConfig | str | None = None,
                 max_new_tokens: int = 32, inputs: dict | None = None, video=None,
                 num_frames: int | None = None) -> Result:
        """Greedy answer to `question` about `image` and/or `video`, pruned with `config` (None = unpruned).

        `video`: a path, bytes, a list of PIL frames or a transprune.video.Video; a file is sampled
        to `num_frames` frames (default: transprune.video.DEFAULT_FRAMES for the family; at most
        transprune.video.MAX_FRAMES). `image`: see transprune.images.as_image. `max_new_tokens`: a
        whole number >= 1 that fits in the model's context after the prompt (a ValueError says how
        many do).
        """
        check_max_new_tokens(max_new_tokens)
        config = self.config_for(config)
        image = as_image(image)
        if video is not None:
            video = self.as_video(video, num_frames)
            if inputs is None:
                inputs = self.prepare_video(video, question, image=image)
        inputs = inputs if inputs is not None else self.prepare(image, question)
        check_fits_context(inputs["input_ids"].shape[1], max_new_tokens, context_length(self.model))
        device = self.device
        clock = TokenClock(device)
        with self.lock:
            return self._generate_locked(image, inputs, config, max_new_tokens, clock, device, video)

    def _generate_locked(self, image, inputs, config, max_new_tokens, clock, device, video=None) -> Result:
        sync(device)
        memory_before = current_memory_mb(device)
        reset_peak_memory(device)       # the peak below is this run's, not the process's since it started
        pruner = apply(self.model, config) if config is not None else None
        try:
            with ModuleTimer(self._adapter.vision_encoders(self.model), device) as vision:
                start = time.perf_counter()
                if pruner is not None:
                    inputs = pruner.prepare_inputs(inputs)   # VisionZip (before the LLM) is part of the timed run
                generated = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                                streamer=clock, return_dict_in_generate=True)
                sync(device)
                end = time.perf_counter()
            output = generated.sequences
            trace = pruner.trace if pruner is not None else None
            pre_stage = pruner.pre_stage if pruner is not None else None
        finally:
            if pruner is not None:
                pruner.remove()
        new_ids = output[0, inputs["input_ids"].shape[1]:]
        text = self.processor.decode(new_ids, skip_special_tokens=True).strip()
        first = clock.stamps[0] if clock.stamps else end
        decode_steps = max(len(clock.stamps) - 1, 0)
        decode_seconds = end - first
        timings = dict(prefill_ms=(first - start) * 1000.0, total_ms=(end - start) * 1000.0,
                       new_tokens=len(new_ids),
                       decode_tokens_per_s=(decode_steps / decode_seconds) if decode_steps and decode_seconds > 0
                       else None,
                       peak_mb=peak_memory_mb(device),
                       # Above what was in use before the run (the loaded model): activations and KV cache.
                       # CUDA only: a CPU process's peak RSS is not reset per run and glibc keeps freed
                       # blocks, so after the first run it reads 0 and says nothing about this one.
                       run_memory_mb=(max(peak_memory_mb(device) - memory_before, 0.0) if device.type == "cuda"
                                      else None),
                       # What the run's own KV cache holds at the end: the memory pruning saves for good.
                       kv_cache_mb=cache_megabytes(generated.past_key_values),
                       # The vision encoder's share of prefill (VisionZip's second pass over it included).
                       vision_ms=vision.ms)
        if trace is not None and video is not None:
            # One video alone: a per-frame layout. Image + video in one prompt: no layout (one
            # VisualLayout describes one picture or one video).
            trace.layout = self.video_layout(video, trace.visual_tokens) if image is None else None
        elif trace is not None and image is not None and pre_stage is not None:
            # The trace is in the pre-LLM stage's patch space: the family's layout of those patches.
            trace.layout = pre_stage.layout(self.visual_layout(image.size, pre_stage.patches(self.model)), trace)
        elif trace is not None and image is not None:
            trace.layout = self.visual_layout(image.size, trace.visual_tokens)
        return Result(text=text, trace=trace, timings=timings, output_ids=output, inputs=inputs, video=video)

    def visual_layout(self, image_size, num_tokens):
        return self._adapter.visual_layout(self.model, self.processor, image_size, num_tokens)
