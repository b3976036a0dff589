"""The /compare handler: validate, run both models, and turn the Comparison into every output.

`make_handlers(engine)` returns plain functions (closures over the app's Engine) that app.py
wires to events; tests call them directly. User-fixable problems surface as gr.Error with a
sentence saying what to do; the app keeps serving.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import NamedTuple

import gradio as gr
from PIL import Image

from transprune import ConfigError
from transprune.flops import model_shape
from transprune.models import REGISTRY

from . import answers, downloads, metrics, overlay, schedule, speed
from .files import STORE
from .engine import Engine, gpu_task
from .errors import UserError, logged, out_of_memory, public_message
from .gate import UNREADABLE_REQUEST
from .inputs import LIMITS, check_video_file, model_info, prepare_image, prepare_question, upload_problem



class CompareOutputs(NamedTuple):
    """Everything /compare returns, by name; app.py wires its components in this order and the API
    client receives them in this order (without `state`)."""
    verdict: object
    status: object
    baseline: object
    pruned: object
    table: object
    chart: object
    stages: object          # overlay gallery, one per stage
    inspect: object         # the patch inspector's image
    segment: object
    patch_note: object
    patch_table: object
    heat_stage: object
    heatmaps: object
    trace: object           # trace JSON download
    card: object            # card PNG download
    preview: object         # card preview
    state: object           # RunState (not part of the API result)


@dataclass
class RunState:
    """The session's last run, kept in gr.State for the overlay, heatmap and speed handlers.

    Every visitor's session holds one, so it is kept small (about 0.1 MB instead of 1.1 MB): the
    comparison without the model inputs' pixels and video frames, and the canvas picture as PNG
    bytes, decoded when a handler asks for the canvas.
    """
    comparison: object
    canvas_without_image: overlay.Canvas
    image_png: bytes

    @classmethod
    def keep(cls, comparison, canvas: overlay.Canvas) -> "RunState":
        def slim(result):
            ids = (result.inputs or {}).get("input_ids")
            return replace(result, inputs=None if ids is None else {"input_ids": ids}, video=None)
        buffer = io.BytesIO()
        canvas.image.save(buffer, format="PNG")
        return cls(comparison=replace(comparison, baseline=slim(comparison.baseline), pruned=slim(comparison.pruned),
                                      frames=None),
                   canvas_without_image=replace(canvas, image=None), image_png=buffer.getvalue())

    @property
    def canvas(self) -> overlay.Canvas:
        with Image.open(io.BytesIO(self.image_png)) as image:
            return replace(self.canvas_without_image, image=image.convert("RGB"))


def status_line(comparison, method_label: str, budget: str) -> str:
    layers = comparison.shape[2]
    return (f"**{comparison.spec.label}** ({comparison.spec.size}, {layers} layers) on **{comparison.device}** · "
            f"{comparison.dtype} · {method_label} ({budget}): {schedule.describe(comparison.resolved, layers)} · "
            f"{comparison.resolved.positions} positions{_positions_why(comparison)} · {comparison.first} ran first "
            "in the answer pass")


def _positions_why(comparison) -> str:
    """Why this model runs its recommended position mode, when it does."""
    spec = comparison.spec
    if spec.positions and spec.positions_reason and comparison.resolved.positions == spec.positions \
            and comparison.config.positions in (None, spec.positions):
        return f" (this model's recommended mode: {spec.positions_reason})"
    return ""


def _run_on_device(engine: Engine, model, image, question, config, max_new_tokens, repeats, dtype, attn, progress,
                   video=None):
    return engine.compare(model, image, question, config, max_new_tokens=max_new_tokens, repeats=repeats,
                          dtype=dtype, attn=attn, progress=progress, video=video)


# On ZeroGPU Spaces only the model work holds the GPU; rendering happens outside.
run_on_device = gpu_task(_run_on_device)


class ErrorInbox:
    """The last error sentence of each browser session, for the event that shows it inline.

    A failed /compare still raises (API clients get the error); its `.failure()` follow-up reads the
    sentence from here and writes it into the result area, where it stays until the next run.
    """

    def __init__(self, capacity: int = 1000):
        self._messages: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def put(self, request, message: str):
        key = getattr(request, "session_hash", None)
        if key is None:
            return
        with self._lock:
            self._messages[key] = message
            self._messages.move_to_end(key)
            while len(self._messages) > self._capacity:
                self._messages.popitem(last=False)

    # What a failed run empties besides the verdict: everything an earlier run left (answers, table,
    # overlays, downloads, the session's RunState), so none of it reads as this run's result.
    CLEARED = ("status", "baseline", "pruned", "table", "chart", "stages", "inspect", "patch_table", "heatmaps",
               "trace", "card", "preview", "state")

    def show(self, image_payload=None, request: gr.Request = None):
        """Event handler: the session's last error as the verdict's text, then None for each of
        `CLEARED` (wired in that order after the verdict).

        Wired with the image input unprocessed (`preprocess=False`): when the run failed before its
        handler (an upload Gradio could not decode), the sentence comes from the upload itself.
        """
        with self._lock:
            message = self._messages.pop(getattr(request, "session_hash", None), None)
        if message is None:   # refused before the handler ran
            message = upload_problem(image_payload) or UNREADABLE_REQUEST
        return (f"⚠ **Could not run:** {message}", *[None] * len(self.CLEARED))


def whole_number(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (default: LIMITS[name]); a fraction, a non-number or an
    out-of-range value is a UserError (never silently truncated)."""
    if low is None:
        low, high = LIMITS[name]
    wanted = f"{name} must be a whole number from {low} to {high}"
    try:
        if isinstance(value, bool):
            raise TypeError("True is not a count")
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{wanted}, not {value!r}.") from None
    if not number.is_integer() or not low <= number <= high:
        raise UserError(f"{wanted}, not {value}.")
    return int(number)


def share(value, name: str) -> float:
    """`value` as a float in [0, 1]; text, NaN or out of range is a UserError naming the setting."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number from 0 to 1, not {value!r}.") from None
    if not 0.0 <= number <= 1.0:     # also False for NaN
        raise UserError(f"{name} must be a number from 0 to 1, not {value}.")
    return number


def make_handlers(engine: Engine, default_model: str, errors: ErrorInbox | None = None):
    """The event handlers of one app, as plain functions closing over its Engine. With `errors`,
    every error sentence of /compare is also left there for the page to show inline."""

    def fail(request, message: str) -> gr.Error:
        message = public_message(message)
        if errors is not None:
            errors.put(request, message)
        # Shown inline by the page (ErrorInbox); the toast is only for pages without that wiring.
        return gr.Error(message, print_exception=False, visible=errors is None)

    def compare(image, question, video=None, model=default_model, method="TransPrune", budget="High",
                keep_ratio=0.125, alpha=0.5, layers="", positions="Model default", max_new_tokens=32,
                attn="sdpa", dtype="auto", seed=0, repeats=3, progress=gr.Progress(), request: gr.Request = None):
        """Run the unpruned baseline and the pruned model on the same image (or video) and question."""
        try:
            question = prepare_question(question)
            if video is not None:
                if image is not None:
                    raise UserError("Both an image and a video are loaded: clear one of them (the × on its "
                                    "panel), then press Run.")
                spec = REGISTRY.get(model)
                if spec is not None and not spec.video:
                    video_models = ", ".join(n for n in engine.model_names() if REGISTRY.get(n) and REGISTRY[n].video)
                    raise UserError(f"{spec.label} takes images only. Upload an image, or pick a video model: "
                                    f"{video_models}.")
                check_video_file(video)
                picture, notices = None, []
            else:
                picture, notices = prepare_image(image)
            seed = whole_number(seed or 0, "Seed")
            max_new_tokens = whole_number(max_new_tokens, "Max new tokens")
            repeats = whole_number(repeats, "Timing repeats")
            keep_ratio, alpha = share(keep_ratio, "Keep ratio r"), share(alpha, "α (the TTV vs IGA weight)")
            try:
                config = schedule.build_config(method, budget, keep_ratio, alpha, layers, positions, seed)
            except (ConfigError, ValueError, TypeError) as error:
                raise UserError(f"Impossible pruning schedule: {error}") from None
            comparison = run_on_device(engine, model, picture, question, config, max_new_tokens, repeats,
                                       dtype, attn, progress, video)
            progress(0.97, desc="Drawing overlays…")
            return render_outputs(comparison, picture, method, budget,
                                  engine.real_size.cached(config, comparison.spec.family or None, session(request)),
                                  notices)
        except UserError as error:
            raise fail(request, str(error)) from None
        except gr.Error as error:
            raise fail(request, error.message) from None
        except Exception as error:  # a bug, not the user's fault: say so, log it, keep serving
            reference = logged(error, "compare failed")
            raise fail(request, f"Something went wrong on the server (error {reference} in its log). The app is "
                                "still running; try again or pick other settings.") from None

    def load_model(model, dtype="auto", attn="sdpa", progress=gr.Progress()):
        """Load the chosen model now (with progress) and describe it; a failure is a warning."""
        try:
            lm = engine.get(model, dtype, attn, progress)
        except UserError as error:
            message = public_message(error)
            gr.Warning(message)
            return f"⚠ **{public_message(model, 80)} is not available:** {message}"
        layers = model_shape(lm.model)[2]
        high = schedule.describe(schedule.build_config("TransPrune", "High"), layers)
        return (model_info(engine, model) + f" · {layers} decoder layers · TransPrune High here: {high} · loaded on "
                f"{lm.device} ({str(lm.dtype).replace('torch.', '')})")

    return compare, load_model


def make_speed_handler(engine: Engine):
    """The "Speed at real size" handler: the chosen schedule timed on a real-size shape (cached).

    Returns the panel's text and the verdict: re-rendered to quote the new figure when the session's
    last run (`state`, a RunState) used this schedule on this family, else left as it is.
    """

    def measure_speed(model=None, method="TransPrune", budget="High", keep_ratio=0.125, alpha=0.5, layers="",
                      positions="Model default", seed=0, state=None, progress=gr.Progress(),
                      request: gr.Request = None):
        text = _measure(model, method, budget, keep_ratio, alpha, layers, positions, seed, progress, session(request))
        comparison = getattr(state, "comparison", None)
        if comparison is not None and comparison.spec.offline:
            measured = engine.real_size.cached(comparison.config, comparison.spec.family or None, session(request))
            if measured is not None and measured.markdown(schedule_label(method, budget)) == text:
                return text, verdict_text(comparison, measured, schedule_label(method, budget))
        return text, gr.skip()

    def _measure(model, method, budget, keep_ratio, alpha, layers, positions, seed, progress, session_id) -> str:
        spec = REGISTRY.get(model or "")
        try:
            config = _speed_schedule(method, budget, keep_ratio, alpha, layers, positions, seed)
            result = engine.real_size.measure(config, lambda fraction, text: progress(fraction, desc=text),
                                              family=spec.family if spec else None, session=session_id)
        except (ConfigError, UserError, ValueError, TypeError) as error:
            return f"⚠ This schedule cannot be timed at real size: {public_message(error)}"
        except Exception as error:  # never crash the app over a measurement
            logged(error, "real-size timing failed")
            if out_of_memory(error):
                return "⚠ Not enough memory here to build the real-size model; try again when no other run is going."
            return f"⚠ The real-size timing failed ({type(error).__name__}); the app is still running, try again."
        return result.markdown(schedule_label(method, budget))

    return measure_speed


def session(request) -> str:
    """The page session a request comes from ("" for a call without one: it sees only shared figures)."""
    return getattr(request, "session_hash", None) or ""


def _speed_schedule(method, budget, keep_ratio, alpha, layers, positions, seed):
    return schedule.build_config(method, budget, share(keep_ratio, "Keep ratio r"),
                                 share(alpha, "α (the TTV vs IGA weight)"), layers, positions,
                                 whole_number(seed or 0, "Seed"))


def make_speed_lookup(engine: Engine):
    """The "Speed at real size" panel's text for the chosen settings, without measuring: the figure this
    server measured or the app recorded for that schedule, else what the button would measure. Run when
    the page opens and whenever a setting changes, so the panel never shows another schedule's figure."""

    def show_speed(model=None, method="TransPrune", budget="High", keep_ratio=0.125, alpha=0.5, layers="",
                   positions="Model default", seed=0, request: gr.Request = None):
        spec = REGISTRY.get(model or "")
        try:
            config = _speed_schedule(method, budget, keep_ratio, alpha, layers, positions, seed)
        except (ConfigError, UserError, ValueError, TypeError):
            return speed.INTRO
        known = engine.real_size.cached(config, spec.family if spec else None, session(request))
        return known.markdown(schedule_label(method, budget)) if known is not None else speed.INTRO + speed.NOT_YET

    return show_speed


def speed_text(comparison, nums, real_size) -> str:
    """The speed figure that means something for this run, saying which it is.

    A real checkpoint: its own measured prefill speedup. The built-in tiny models are too small for
    pruning to pay off in wall-clock time, so never lead with their figure: show the schedule's
    speed at real size (components/speed.py) when it was measured, else where to measure it.
    """
    if not comparison.spec.offline:
        return (f"prefill **{nums.speedup:.2f}×** measured on this model, vision encoder included (its language "
                f"model alone {nums.llm_speedup:.2f}×; bound {nums.bound:.2f}×)")
    if real_size is not None:
        # A family whose prompts (videos, AnyRes tiles) would take minutes per prefill on a CPU is
        # timed at LLaVA-1.5-7B's shape: say so here, as the panel does.
        standing_in = (", standing in for this family's longer prompts" if real_size.note
                       else f", timed with {real_size.visual_tokens} visual tokens (one image's): a video prompt "
                            "carries more" if comparison.frames is not None else "")
        return (real_size.headline() + f" on a {real_size.arch}-shaped language model{standing_in} "
                f"({real_size.provenance})")
    return "speed: see **Speed at real size** below (a model this small is too small to show it)"


def verdict_text(comparison, real_size=None, ran: str = "") -> str:
    """The verdict line of a comparison, quoting `real_size` (a SpeedResult) when there is one.
    `ran` ("TransPrune · High") names the run's schedule, so a verdict left on the page
    after the settings change still says which run it describes."""
    nums = metrics.numbers(comparison)
    heldout = comparison.heldout
    recycled = nums.kept[-1][2] if nums.kept else 0      # of the last stage's tokens, those a method inserted
    return answers.verdict(comparison.baseline.text, comparison.pruned.text, len(comparison.pruned.trace.kept),
                           nums.visual_tokens, nums.flops_saved, speed_text(comparison, nums, real_size),
                           answers.heldout_line(*heldout) if heldout else None, comparison.question,
                           recycled=recycled, schedule=ran, model=comparison.spec.label)


def schedule_label(method_label: str, budget: str) -> str:
    return f"{method_label} · {budget}" if budget else method_label


def render_outputs(comparison, picture: Image.Image | None, method_label: str, budget: str,
                   real_size=None, notices=()) -> CompareOutputs:
    """Everything /compare returns (see CompareOutputs). `real_size`: the schedule's SpeedResult at
    real size, if one was measured; `notices`: what was done to the input (a downscaled image), kept
    under the verdict with this run's result rather than in a toast that outlives it."""
    base_text, pruned_text = comparison.baseline.text, comparison.pruned.text
    left, right = answers.diff_segments(base_text, pruned_text)
    nums = metrics.numbers(comparison)
    trace = comparison.pruned.trace
    canvas = overlay.canvas_for(comparison, picture)
    segments = canvas.segments
    inspect_segment = segments[-1]
    labels = overlay.stage_labels(trace)
    card_path = downloads.write_card(comparison, canvas, method_label, budget, real_size)
    notes = "".join(f"  \n<small>⚠ {notice}</small>" for notice in notices)
    return CompareOutputs(
        verdict_text(comparison, real_size, schedule_label(method_label, budget)) + notes,
        status_line(comparison, method_label, budget),
        left,
        right,
        metrics.table(comparison, method_label),
        STORE.image(metrics.stack(metrics.sequence_chart(nums.baseline_lengths, nums.pruned_lengths, width=480,
                                                         height=300),
                                  metrics.time_chart(*nums.time_split, width=480, toy=comparison.spec.offline)),
                    "sequence-chart"),
        STORE.gallery(overlay.stage_gallery(canvas), "stage"),
        STORE.image(overlay.inspect_view(canvas, inspect_segment), "kept"),
        gr.update(choices=segments, value=inspect_segment, visible=len(segments) > 1),
        overlay.PATCH_NOTE,
        [],
        gr.update(choices=labels, value=labels[0]),
        STORE.gallery(overlay.heatmap_gallery(canvas, 0), "heatmap"),
        gr.update(value=downloads.write_trace(comparison, method_label, budget), interactive=True),
        gr.update(value=card_path, interactive=True),
        card_path,
        RunState.keep(comparison, canvas),
    )
