"""The inputs panel: media, question, model, method, budget and the Advanced accordion.

Limits (documented in docs/app.md and the "how this is measured" note):
- uploads above MAX_UPLOAD are refused by the server before they reach the app;
- images above MAX_PIXELS are refused (decompression bombs never get decoded);
- images with a side above MAX_SIDE pixels are downscaled to MAX_SIDE on the longer side, with a
  notice kept in the result (the models see at most 672 px anyway); images longer than MAX_ASPECT
  times their width (or the reverse) are refused;
- videos longer than MAX_VIDEO_SECONDS or with frames above MAX_PIXELS are refused (read from
  the container header); transprune.video samples the frames the model sees;
- questions must be 1..MAX_QUESTION_CHARS characters of readable text (no control characters,
  text-direction overrides or broken surrogates);
- numbers (max new tokens, timing repeats, seed) within LIMITS: the components and the handlers
  read the same bounds, so the page, the API and the handler refuse the same values;
- files are read only from Gradio's upload folder or the bundled examples (components/gate.py).
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

import gradio as gr
from PIL import Image, UnidentifiedImageError

from transprune import PruneConfig, methods
from transprune.adapters import FAMILIES, video_families
from transprune.images import ImageInputError, as_image

from . import engine as engine_module
from .errors import GONE, UserError
from .loading import ATTENTION_CHOICES, DTYPE_CHOICES
from .examples import SCENES, example_rows
from .gate import NOT_AN_UPLOAD, allowed_upload
from .schedule import BUDGETS, METHODS, POSITION_CHOICES, method_kind, pre_llm_budgets

MAX_UPLOAD = "20mb"
MAX_PIXELS = 40_000_000
MAX_SIDE = 2048
MAX_QUESTION_CHARS = 500
# Longer side over shorter side. An 8000x100 strip became 2048x26 for the model, which then named a
# colour in a picture it could not see; panoramas up to this ratio still answer.
MAX_ASPECT = 12
MAX_VIDEO_SECONDS = 120
MAX_SEED = 2**31 - 1     # torch.Generator.manual_seed takes up to 2**64 - 1; the random method multiplies it
# (low, high) of each whole-number setting, shared by its component and the handlers.
LIMITS = {"Max new tokens": (1, 256), "Timing repeats": (1, 9), "Seed": (0, MAX_SEED)}
DEFAULT_QUESTION = SCENES[0].question   # goes with the preloaded first example image


# ---------------------------------------------------------------------------- validation
def check_image_file(path: str) -> None:
    """Refuse files that are not images or are too large, reading only the header."""
    if not os.path.isfile(path):
        raise UserError(GONE.format(what="image"))
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise UserError(f"This image is too large to process safely. Upload one under "
                        f"{MAX_PIXELS / 1e6:.0f} megapixels.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UserError("That file is not an image this app can read. Upload a PNG, JPEG or WebP image.") from None
    if width * height > MAX_PIXELS:
        raise UserError(f"This image is {width}x{height} ({width * height / 1e6:.0f} megapixels); the limit is "
                        f"{MAX_PIXELS / 1e6:.0f} megapixels. Upload a smaller image.")


def prepare_image(image) -> tuple[Image.Image, list[str]]:
    """An RGB PIL image ready for the model, and notices for the user (e.g. it was downscaled)."""
    if image is None:
        raise UserError("No image: upload an image (or click one of the examples), then press Run.")
    is_file = isinstance(image, str)
    if is_file:
        check_image_file(image)   # the header first: a decompression bomb is refused before it is decoded
    try:
        image = as_image(image)
    except ImageInputError as error:
        raise UserError("That image file is damaged and cannot be decoded. Upload another image." if is_file
                        else str(error)) from None
    if image.width * image.height > MAX_PIXELS:
        raise UserError(f"This image is {image.width}x{image.height}; the limit is {MAX_PIXELS / 1e6:.0f} "
                        "megapixels. Upload a smaller image.")
    if min(image.size) < 2:
        raise UserError(f"This image is only {image.width}x{image.height} pixels. Upload a real picture.")
    if max(image.size) > MAX_ASPECT * min(image.size):
        shape = "wide as it is tall" if image.width > image.height else "tall as it is wide"
        raise UserError(f"This image is {image.width}x{image.height}, {max(image.size) / min(image.size):.0f} times as "
                        f"{shape}; the limit is {MAX_ASPECT}:1 (the model would see a sliver). Crop it and upload it "
                        "again.")
    notices = []
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        original = image.size
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        notices.append(f"The image ({original[0]}x{original[1]}) was downscaled to {image.width}x{image.height}: "
                       f"images are limited to {MAX_SIDE} px on the longer side.")
    return image, notices


def check_video_file(path: str) -> None:
    """Refuse a video that is unreadable, too long or too large per frame, from its header only."""
    import av

    if not os.path.isfile(str(path)):
        raise UserError(GONE.format(what="video"))
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError("That file has no video track. Upload an MP4, WebM, AVI or MKV video.")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            seconds = container.duration / 1e6 if container.duration else None
    except UserError:
        raise
    except Exception:  # av raises many error types for garbage input
        raise UserError("That file is not a video this app can read. Upload an MP4, WebM, AVI or MKV video.") \
            from None
    if seconds is not None and seconds > MAX_VIDEO_SECONDS:
        raise UserError(f"This video is {seconds:.0f} s long; the limit is {MAX_VIDEO_SECONDS} s. Upload a "
                        "shorter clip.")
    if width * height > MAX_PIXELS:
        raise UserError(f"This video's frames are {width}x{height}; the limit is {MAX_PIXELS / 1e6:.0f} "
                        "megapixels per frame. Upload a smaller video.")


# Characters a question never needs and that change what the model or a reader sees: control
# characters (NUL included), the bidirectional embeddings, overrides and isolates, and lone
# surrogates (which the tokenizer cannot encode).
_BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")


def unreadable_character(text: str) -> str | None:
    """A description of the first character of `text` a question must not contain, or None."""
    for position, char in enumerate(text, 1):
        category = unicodedata.category(char)
        if category == "Cs":
            return f"a broken character (a lone UTF-16 surrogate) at position {position}"
        if category == "Cc" and char not in "\t\n\r":
            return f"an invisible control character (U+{ord(char):04X}) at position {position}"
        if _BIDI_CONTROLS.match(char):
            return f"a text-direction control (U+{ord(char):04X}) at position {position}"
    return None


def prepare_question(question) -> str:
    if question is not None and not isinstance(question, str):
        raise UserError("The question must be text.")
    problem = unreadable_character(question or "")
    if problem:
        raise UserError(f"The question contains {problem}: retype it or remove that character, then press Run.")
    text = " ".join((question or "").split())
    if not text:
        raise UserError("The question is empty: type a question about the image, e.g. "
                        f"“{DEFAULT_QUESTION}”.")
    if len(text) > MAX_QUESTION_CHARS:
        raise UserError(f"The question is {len(text):,} characters long; keep it to {MAX_QUESTION_CHARS} characters "
                        "at most.")
    return text


UNREADABLE_IMAGE = "That file is not an image this app can read. Upload a PNG, JPEG or WebP image."


# upload_problem answers without the queue: one decode at a time bounds its memory to one image.
_DECODING = threading.Lock()


def upload_problem(payload) -> str | None:
    """The sentence for a raw image payload (a FileData dict) whose run was refused before its handler,
    or None when the image itself is fine. Only a path inside the upload folders is read
    (components/gate.py), its header first, and one image is decoded at a time."""
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        return None
    if not allowed_upload(path):
        return NOT_AN_UPLOAD
    try:
        check_image_file(path)
        with _DECODING, Image.open(path) as image:
            image.load()
    except UserError as error:
        return str(error)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return UNREADABLE_IMAGE
    return None


def image_header_problem(path: str) -> str | None:
    """The request gate's check of an uploaded image before Gradio decodes it (components/gate.py):
    the header only, so a decompression bomb or a non-image is refused with its sentence, undecoded."""
    try:
        check_image_file(path)
    except UserError as error:
        return str(error)
    return None


def video_header_problem(path: str) -> str | None:
    """The request gate's check of an uploaded video: its container header (length, frame size)."""
    try:
        check_video_file(path)
    except UserError as error:
        return str(error)
    return None


def explain_refusal(component, payload) -> str | None:
    """The sentence for a value Gradio failed to read after the gate passed it: an image whose header
    was fine but whose data cannot be decoded (the gate asks; see upload_problem)."""
    return upload_problem(payload) if isinstance(component, gr.Image) else None


# ---------------------------------------------------------------------------- the panel
@dataclass
class Inputs:
    tabs: gr.Tabs
    image: gr.Image
    video: gr.Video
    question: gr.Textbox
    model: gr.Dropdown
    model_info: gr.Markdown
    method: gr.Radio
    budget: gr.Radio
    keep_ratio: gr.Slider
    alpha: gr.Slider
    layers: gr.Textbox
    positions: gr.Radio
    max_new_tokens: gr.Slider
    attn: gr.Radio
    dtype: gr.Dropdown
    seed: gr.Number
    repeats: gr.Slider
    run: gr.Button

    def run_inputs(self) -> list:
        """The inputs of /compare, in the order of the handler's parameters."""
        return [self.image, self.question, self.video, self.model, self.method, self.budget, self.keep_ratio,
                self.alpha, self.layers, self.positions, self.max_new_tokens, self.attn, self.dtype, self.seed,
                self.repeats]

    def schedule_inputs(self) -> list:
        """The inputs of the real-size timing: the schedule settings only."""
        return [self.model, self.method, self.budget, self.keep_ratio, self.alpha, self.layers, self.positions,
                self.seed]


def model_info(engine: engine_module.Engine, name: str) -> str:
    """A line under the dropdown: what the model is and its depth (once loaded)."""
    from transprune.models import REGISTRY

    spec = REGISTRY.get(name)
    if spec is None:
        families = ", ".join(adapter.label for adapter in FAMILIES.values())
        return f"**{name}**: a Hugging Face checkpoint of a supported family ({families})."
    text = f"**{spec.label}** · {spec.size} parameters"
    if spec.description:
        text += f" · {spec.description}"
    settings = engine.processor_kwargs(name)
    if settings:
        text += " · on this CPU: " + ", ".join(f"{key}={value}" for key, value in settings.items())
    return text


def build(engine: engine_module.Engine, default_model: str) -> Inputs:
    """Lay out the inputs column. Call inside a gr.Blocks / gr.Column context."""
    with gr.Tabs(elem_id="media-tabs") as tabs:
        with gr.Tab("Image", id="image", elem_id="tab-image"):
            # Preloaded with the first example, whose question is the default: one click on Run works.
            image = gr.Image(value=example_rows()[0][0], label="Image", type="pil", sources=["upload", "clipboard"],
                             height=300, elem_id="input-image")
        with gr.Tab("Video", id="video", visible=engine.video_enabled(), elem_id="tab-video"):
            # format=None, include_audio=True: the upload is passed on as is (no ffmpeg needed).
            # A short label: the video panel's icons cover a long one (the families are in the tab's note).
            video = gr.Video(label="Video", height=300,
                             sources=["upload"], format=None, include_audio=True, elem_id="input-video")
            gr.Markdown(f"Video models: {', '.join(FAMILIES[f].label for f in video_families())}.",
                        elem_classes=["model-info"])
    # No max_length: the browser would cut a pasted question silently; the handler refuses a long one
    # with its real length instead.
    question = gr.Textbox(label="Question", value=DEFAULT_QUESTION, lines=1, max_lines=4,
                          placeholder="Ask about the image…", elem_id="question")
    counter = gr.Markdown(question_count(DEFAULT_QUESTION), elem_id="question-count")
    # Counted in the browser as the visitor types (no server call): the one limit, shown before Run.
    question.change(None, question, counter, js=QUESTION_COUNT_JS)   # typed, pasted, cleared or set by an example
    run = gr.Button("Run comparison", variant="primary", size="lg", elem_id="run")
    model = gr.Dropdown(choices=engine.choices(), value=default_model, label="Model",
                        allow_custom_value=engine.settings.allowed_models is None, elem_id="model")
    info = gr.Markdown(model_info(engine, default_model), elem_classes=["model-info"])
    method = gr.Radio(list(METHODS), value="TransPrune", label="Method", elem_id="method")
    budget = gr.Radio(list(BUDGETS), value="High", label="Budget", elem_id="budget", info=budget_info("TransPrune"))
    keep_ratio = gr.Slider(0.02, 1.0, value=0.125, step=0.005, label="Custom keep ratio", visible=False,
                           info="Share of visual tokens left after the last stage.", elem_id="keep-ratio")
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        with gr.Row():
            alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="α (TTV weight)",
                              info="score = α·TTV + (1−α)·IGA (TransPrune only)")
            layers = gr.Textbox(label="Pruning layers", value="", placeholder="empty = the preset's; or this model's own layer numbers, e.g. 3, 4, 5",
                                info="The model's own 1-indexed layer numbers; empty = preset.")
        with gr.Row():
            positions = gr.Radio(list(POSITION_CHOICES), value="Model default", label="Position ids after pruning")
            max_new_tokens = gr.Slider(*LIMITS["Max new tokens"], value=32, step=1, label="Max new tokens")
        with gr.Row():
            attn = gr.Radio(list(ATTENTION_CHOICES), value="sdpa", label="Attention implementation")
            dtype = gr.Dropdown(list(DTYPE_CHOICES), value="auto", label="dtype",
                                info="auto = float16 on GPU, float32 on CPU")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, minimum=LIMITS["Seed"][0], maximum=LIMITS["Seed"][1], label="Seed",
                             info="Random method and torch seed")
            repeats = gr.Slider(*LIMITS["Timing repeats"], value=engine.default_repeats(), step=1,
                                label="Timing repeats",
                                info="Prefill time = median over this many runs per side")
    return Inputs(tabs=tabs, image=image, video=video, question=question, model=model, model_info=info, method=method,
                  budget=budget, keep_ratio=keep_ratio, alpha=alpha, layers=layers, positions=positions,
                  max_new_tokens=max_new_tokens, attn=attn, dtype=dtype, seed=seed, repeats=repeats, run=run)


# ---------------------------------------------------------------------------- small handlers
def on_video(video):
    """A video arrived (an upload or the video example): show its tab and let it replace the image
    (the preloaded example image would otherwise make the run refuse two inputs)."""
    return (gr.Tabs(selected="video"), None) if video is not None else (gr.skip(), gr.skip())


def on_image(image):
    """An image arrived (an upload or an example): it replaces any video."""
    return None if image is not None else gr.skip()


def on_budget(budget: str):
    """Show the keep-ratio slider only for the Custom budget."""
    return gr.update(visible=budget == "Custom")


def question_count(text: str) -> str:
    """"26 / 500 characters" (the JS twin below keeps it live)."""
    return f"{len(' '.join(text.split()))} / {MAX_QUESTION_CHARS} characters"


# Counts what the handler counts: the text with its runs of white space made one space.
# [...s] counts code points, as Python's len() does (s.length counts UTF-16 units: an emoji twice).
QUESTION_COUNT_JS = ("(q) => { const n = [...(q || '').trim().split(/\\s+/).join(' ')].length; "
                     f"return `${{n}} / {MAX_QUESTION_CHARS} characters` + "
                     f"(n > {MAX_QUESTION_CHARS} ? ' — too long: shorten it' : ''); }}")


def budget_info(method: str) -> str:
    kind = method_kind(method)
    if kind == "pre_llm":
        stage = methods.PRE_LLM[METHODS[method][0]]
        budgets = pre_llm_budgets(stage.name)
        high, low = budgets["High"], budgets["Low"]
        where = (f"Before the LLM on {stage.supported_models}; on other models at the LLM's first layer, the same "
                 "choice." if stage.first_layer_twin else f"Before the LLM; {stage.supported_models} only.")
        return (f"{where} High keeps {_share(high)} of each image's visual tokens ({high}: {_of_576(high)}), Low "
                f"{_share(low)} ({low}); Custom sets the share.")
    if kind == "own_preset":
        return f"High is {method}'s published schedule, Low halves its keep ratios; Custom sets the final share."
    return ("High keeps 87.5% → 62.5% → 12.5% of the visual tokens over three stages, Low 50% → 25% → 6.25%; "
            "Custom sets the final share.")


def _of_576(preset: str) -> str:
    """"192 of LLaVA-1.5's 576": what a pre-LLM preset's number means (the share carries over to other grids)."""
    return f"{round(PruneConfig.preset(preset).pre_llm_keep * 576)} of LLaVA-1.5's 576"


def _share(preset: str) -> str:
    """The share of patches a pre-LLM preset keeps, as a fraction: "1/3" for visionzip-192."""
    return str(Fraction(PruneConfig.preset(preset).pre_llm_keep).limit_denominator(1000))


def on_method(method: str):
    """α only matters for TransPrune's combined score; a pre-LLM stage (VisionZip) has no pruning layers."""
    return (gr.update(interactive=METHODS[method] == ("transprune", "transprune")), gr.update(info=budget_info(method)),
            gr.update(interactive=method_kind(method) != "pre_llm"))
