"""The timed baseline-vs-pruned run the page shows, with every failure turned into a UserError.

Nothing here imports Gradio: the UI pieces call it and show `UserError` messages as they are.
One `Engine` per app; its parts live by responsibility: `components.policy` (which models may load,
their labels, the CPU-Space presets), `components.loading` (loading, the download checks, a small
LRU of loaded models), `components.hub` (Hub and memory probes), `components.errors` (UserError and
the visitor's messages); this module runs the comparison. The loaded model is shared by all users;
pruning settings travel with each call (`LoadedModel.generate(config=...)` attaches and removes
hooks per call under the model's lock), so two users never see each other's settings.
"""

from __future__ import annotations

import itertools
import statistics
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from transprune import ConfigError, IncompatibleTransformersError, PruneConfig, PruningInputError
from transprune import methods
from transprune.adapters import UnsupportedModelError, for_model
from transprune.flops import model_shape
from transprune.heldout import heldout_record
from transprune.models import ContextError, LoadedModel, ModelSpec, check_fits_context, context_length, default_device

from . import frontier
from .errors import GONE, UserError, log, logged, out_of_memory
from .loading import ModelLoader
from .policy import ModelPolicy, Settings
from .speed import RealSizeSpeed, release_memory


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
        when the model has no such set or this setting was not measured on it. The model's own eval JSON
        first, then its bundled frontier's (the same held-out questions, every method's presets)."""
        for path in (self.spec.heldout_path, frontier.results_for(self.spec.name)):
            found = heldout_record(path, self.resolved) if path else None
            if found is not None:
                return found
        return None


class Engine(ModelPolicy, ModelLoader):
    """The app's engine: its policy and loaded models (the two parts above) and the comparison."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.device = self.settings.device or default_device()
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._runs = itertools.count()
        self.unavailable: dict[str, str] = {}   # registry name -> why it failed to load, for labels
        self.real_size = RealSizeSpeed(self.device)   # "Speed at real size", cached per schedule

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
        config = lm.config_for(config)   # the model's recommended position mode where the config leaves it unset
        try:
            resolved = lm.resolve(config)    # the library's one resolver: positions, depth, family checks
        except ConfigError as error:
            raise UserError(f"Impossible pruning schedule for {lm.spec.label}: {error}") from error
        except UnsupportedModelError as error:
            if config.pre_llm is None:    # the model itself (refused at load, so not expected here)
                raise UserError(str(error)) from error
            stage = methods.PRE_LLM[config.pre_llm]
            family = for_model(lm.model).family
            raise UserError(f"{stage.label} runs on {stage.supported_models} only; {lm.spec.label} is a {family} "
                            "model. Pick another method or a model it supports.") from None
        steps = 2 + 2 + 2 * max(0, repeats - 1) + (video is not None)
        done = itertools.count(1)

        def step(what):
            if progress:
                progress(next(done) / (steps + 1), desc=what)

        try:
            # No global seeding here: every draw of a run has its own generator seeded from config.seed (the
            # random control, SparseVLM's clustering), and reseeding torch's shared generator would change the
            # weights of a tiny model another thread is building (tiny.BUILD_LOCK covers the builders only).
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
            if out_of_memory(error):
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
        if out_of_memory(error):
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
