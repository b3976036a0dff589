"""Model registry and the one generation entry point the app, the benchmark and the eval share.

    lm = transprune.models.load("tiny-llava")                  # offline, random weights, seconds
    lm = transprune.models.load("llava-1.5-7b", device="cuda", dtype="float16")
    result = lm.generate(image, "What is in the picture?", config=transprune.PruneConfig.preset("high"))
    result.text, result.trace, result.timings

Real checkpoints load with `from_pretrained` (never trust_remote_code); offline entries build
from code in seconds and need no network.
"""

from __future__ import annotations

import dataclasses
import numbers
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import adapters
from .config import PruneConfig, as_config
from .errors import ModelLoadError, UnsupportedModelError
from .images import as_image
from .measure import (ModuleTimer, TokenClock, current_memory_mb, parse_dtype, peak_memory_mb, reset_peak_memory,
                      sync)
from .runner import apply
from .trace import PruneTrace


@dataclass(frozen=True)
class ModelSpec:
    name: str
    label: str
    family: str
    size: str
    checkpoint: str | None = None          # Hugging Face model id; None for built-in offline models
    builder: Callable | None = None        # () -> (model, processor) for offline models
    video: bool = False
    description: str = ""
    # Position mode used whenever a config leaves `positions` unset (None: the family's default, which
    # for 1-D RoPE is "compact", as the released code does). Say why in `positions_reason`.
    positions: str | None = None
    positions_reason: str = ""
    # Held-out accuracy per setting, measured by `python -m transprune.eval` (a JSON in the package).
    heldout: str | None = None

    @property
    def offline(self) -> bool:
        return self.checkpoint is None

    @property
    def heldout_path(self) -> Path | None:
        return Path(__file__).resolve().parent / self.heldout if self.heldout else None

    @property
    def display_name(self) -> str:
        where = "offline" if self.offline else "from the Hub"
        return f"{self.label} · {self.size} · {where}"


def _tiny(family: str, **kwargs) -> Callable:
    """The offline tiny model of a family (its adapter's builder), with default arguments but `kwargs`."""
    return lambda: adapters.by_family(family).build_tiny(**kwargs)


def _shapes_llava():
    # Trained weights shipped in the package (issue: embedded default model).
    from .shapes import load_shapes_llava
    return load_shapes_llava()


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"Model {spec.name!r} is already registered.")
    REGISTRY[spec.name] = spec
    return spec


for _spec in (
    ModelSpec("shapes-llava", "Shapes LLaVA (trained)", "llava", "2.9M",
              builder=_shapes_llava,
              description="A small LLaVA trained on synthetic shape scenes; answers colour/shape/count/where questions.",
              positions="original",
              positions_reason=("trained only on unpruned sequences, this small model reads where a shape is from "
                                "its 1-D positions: on 500 held-out questions High keeps 98.0 % of the answers with "
                                "original positions and 86.4 % with the released code's compact renumbering "
                                "(where 73 %, count 63 %)"),
              heldout="assets/shapes-llava/eval.json"),
    ModelSpec("tiny-llava", "Tiny LLaVA (random weights)", "llava", "0.65M", builder=_tiny("llava"),
              description="LLaVA-1.5 architecture, 16 layers, random weights: exercises pruning, answers are noise."),
    ModelSpec("tiny-llava-next", "Tiny LLaVA-NeXT (random weights)", "llava_next", "0.9M", builder=_tiny("llava_next"),
              description="LLaVA-NeXT AnyRes architecture, random weights."),
    ModelSpec("tiny-video-llava", "Tiny Video-LLaVA (random weights)", "video_llava", "0.9M",
              builder=_tiny("video_llava"), video=True, description="Video-LLaVA architecture, random weights."),
    ModelSpec("tiny-llava-onevision", "Tiny LLaVA-OneVision (random weights)", "llava_onevision", "0.9M",
              builder=_tiny("llava_onevision"), video=True, description="LLaVA-OneVision architecture, random weights."),
    ModelSpec("tiny-qwen2.5-vl", "Tiny Qwen2.5-VL (random weights)", "qwen2_5_vl", "0.9M",
              builder=_tiny("qwen2_5_vl"), video=True, description="Qwen2.5-VL architecture (M-RoPE), random weights."),
    ModelSpec("tiny-smolvlm", "Tiny SmolVLM (random weights)", "smolvlm", "0.9M", builder=_tiny("smolvlm"),
              description="SmolVLM architecture (image splitting: 2x2 tiles + global view), random weights."),
    ModelSpec("tiny-idefics3", "Tiny Idefics3 (random weights)", "smolvlm", "0.9M",
              builder=_tiny("smolvlm", model_type="idefics3"),
              description="tiny-smolvlm's model and weights in Idefics3ForConditionalGeneration, the class of "
                          "SmolVLM-256M/500M-Instruct."),
    ModelSpec("llava-1.5-7b", "LLaVA-1.5-7B", "llava", "7B", checkpoint="llava-hf/llava-1.5-7b-hf"),
    ModelSpec("llava-1.5-13b", "LLaVA-1.5-13B", "llava", "13B", checkpoint="llava-hf/llava-1.5-13b-hf"),
    ModelSpec("llava-next-vicuna-7b", "LLaVA-NeXT-Vicuna-7B", "llava_next", "7B",
              checkpoint="llava-hf/llava-v1.6-vicuna-7b-hf"),
    ModelSpec("llava-next-mistral-7b", "LLaVA-NeXT-Mistral-7B", "llava_next", "7B",
              checkpoint="llava-hf/llava-v1.6-mistral-7b-hf"),
    ModelSpec("qwen2.5-vl-3b", "Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", "3B", checkpoint="Qwen/Qwen2.5-VL-3B-Instruct",
              video=True),
    ModelSpec("qwen2.5-vl-7b", "Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", "7B", checkpoint="Qwen/Qwen2.5-VL-7B-Instruct",
              video=True),
    ModelSpec("video-llava-7b", "Video-LLaVA-7B", "video_llava", "7B", checkpoint="LanguageBind/Video-LLaVA-7B-hf",
              video=True),
    ModelSpec("llava-onevision-0.5b", "LLaVA-OneVision-0.5B", "llava_onevision", "0.9B",
              checkpoint="llava-hf/llava-onevision-qwen2-0.5b-ov-hf", video=True),
    ModelSpec("llava-onevision-7b", "LLaVA-OneVision-7B", "llava_onevision", "8B",
              checkpoint="llava-hf/llava-onevision-qwen2-7b-ov-hf", video=True),
    # SmolVLM(1) checkpoints: config.json model_type "idefics3", so Idefics3ForConditionalGeneration and
    # Idefics3Processor (which, unlike SmolVLM2's SmolVLMProcessor, does not need `num2words`).
    ModelSpec("smolvlm-256m", "SmolVLM-256M-Instruct", "smolvlm", "256M",
              checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct"),
    ModelSpec("smolvlm-500m", "SmolVLM-500M-Instruct", "smolvlm", "500M",
              checkpoint="HuggingFaceTB/SmolVLM-500M-Instruct"),
):
    register(_spec)
for _adapter in adapters.FAMILIES.values():   # entries a family lists in its own module (Adapter.models)
    for _entry in _adapter.models:
        _builder = None if _entry.get("checkpoint") else _tiny(_adapter.family)
        register(ModelSpec(family=_adapter.family, builder=_builder, **_entry))


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
    # prefill_ms, vision_ms (of prefill), decode_tokens_per_s, total_ms, new_tokens, peak_mb, run_memory_mb
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
        in where it leaves `positions` unset (see ModelSpec.positions). None stays None; any other
        type is a TypeError."""
        config = as_config(config, allow_none=True)
        if config is not None and config.positions is None and self.spec.positions is not None:
            config = dataclasses.replace(config, positions=self.spec.positions)
        return config

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
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                             streamer=clock)
                sync(device)
                end = time.perf_counter()
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
                       run_memory_mb=max(peak_memory_mb(device) - memory_before, 0.0),
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
