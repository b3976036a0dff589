"""The inputs panel: media, question, model, method, budget and the Advanced accordion.

Limits (documented in docs/app.md and the "how this is measured" note):
- uploads above MAX_UPLOAD are refused by the server before they reach the app;
- images above MAX_PIXELS are refused (decompression bombs never get decoded);
- images with a side above MAX_SIDE pixels are downscaled to MAX_SIDE on the longer side, with a
  notice (the models see at most 672 px anyway);
- videos longer than MAX_VIDEO_SECONDS or with frames above MAX_PIXELS are refused (read from
  the container header); transprune.video samples the frames the model sees;
- questions must be 1..MAX_QUESTION_CHARS characters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import gradio as gr
from PIL import Image, UnidentifiedImageError

from transprune import PruneConfig, methods
from transprune.adapters import FAMILIES, video_families
from transprune.images import ImageInputError, as_image

from . import engine as engine_module
from .engine import ATTENTION_CHOICES, DTYPE_CHOICES, GONE, UserError
from .examples import SCENES, example_rows
from .schedule import BUDGETS, METHODS, POSITION_CHOICES, method_kind, pre_llm_budgets

MAX_UPLOAD = "20mb"
MAX_PIXELS = 40_000_000
MAX_SIDE = 2048
MAX_QUESTION_CHARS = 500
MAX_VIDEO_SECONDS = 120
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


def prepare_question(question) -> str:
    text = " ".join(str(question or "").split())
    if not text:
        raise UserError("The question is empty: type a question about the image, e.g. "
                        f"“{DEFAULT_QUESTION}”.")
    if len(text) > MAX_QUESTION_CHARS:
        raise UserError(f"The question is {len(text)} characters long; keep it under {MAX_QUESTION_CHARS} "
                        "characters.")
    return text


UNREADABLE_IMAGE = "That file is not an image this app can read. Upload a PNG, JPEG or WebP image."


def upload_problem(payload) -> str | None:
    """The sentence guard_uploads gave for this raw image payload (a FileData dict), or None."""
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        return None
    try:
        check_image_file(path)
        with Image.open(path) as image:
            image.load()
    except UserError as error:
        return str(error)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return UNREADABLE_IMAGE
    return None


def guard_uploads(image: gr.Image) -> gr.Image:
    """Make a corrupt, non-image or oversized upload to `image` fail with a sentence.

    Such a file fails inside gr.Image.preprocess (PIL cannot open it), which Gradio reports as a
    bare processing error. The instance's preprocess is wrapped (not subclassed: a gr.Image
    subclass makes Gradio write a .pyi stub next to this module) to check the header first and
    turn PIL's errors into a gr.Error that says what to do. The page shows that sentence inline
    (compare.ErrorInbox.show asks `upload_problem` again: the handler never ran, so it left none).
    """
    original = image.preprocess

    def preprocess(payload):
        try:
            if payload is not None and payload.path:
                check_image_file(payload.path)
            return original(payload)
        except UserError as error:
            raise gr.Error(str(error), print_exception=False, visible=False) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise gr.Error(UNREADABLE_IMAGE, print_exception=False, visible=False) from None

    image.preprocess = preprocess
    return image


# ---------------------------------------------------------------------------- the panel
@dataclass
class Inputs:
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
    with gr.Tabs():
        with gr.Tab("Image", elem_id="tab-image"):
            # Preloaded with the first example, whose question is the default: one click on Run works.
            image = guard_uploads(gr.Image(value=example_rows()[0][0], label="Image", type="pil",
                                           sources=["upload", "clipboard"], height=300, elem_id="input-image"))
        with gr.Tab("Video", visible=engine.video_enabled(), elem_id="tab-video"):
            # format=None, include_audio=True: the upload is passed on as is (no ffmpeg needed).
            video = gr.Video(label=f"Video ({', '.join(FAMILIES[f].label for f in video_families())})", height=300,
                             sources=["upload"], format=None, include_audio=True, elem_id="input-video")
    question = gr.Textbox(label="Question", value=DEFAULT_QUESTION, lines=1, max_lines=4,
                          max_length=MAX_QUESTION_CHARS * 2, placeholder="Ask about the image…",
                          elem_id="question")
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
            layers = gr.Textbox(label="Pruning layers", value="", placeholder="preset (e.g. 4, 5, 6 on 16 layers)",
                                info="The model's own 1-indexed layer numbers; empty = preset.")
        with gr.Row():
            positions = gr.Radio(list(POSITION_CHOICES), value="Model default", label="Position ids after pruning")
            max_new_tokens = gr.Slider(1, 128, value=32, step=1, label="Max new tokens")
        with gr.Row():
            attn = gr.Radio(list(ATTENTION_CHOICES), value="sdpa", label="Attention implementation")
            dtype = gr.Dropdown(list(DTYPE_CHOICES), value="auto", label="dtype",
                                info="auto = float16 on GPU, float32 on CPU")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="Seed", info="Random method and torch seed")
            repeats = gr.Slider(1, 9, value=engine.default_repeats(), step=1, label="Timing repeats",
                                info="Prefill time = median over this many runs per side")
    return Inputs(image=image, video=video, question=question, model=model, model_info=info, method=method,
                  budget=budget, keep_ratio=keep_ratio, alpha=alpha, layers=layers, positions=positions,
                  max_new_tokens=max_new_tokens, attn=attn, dtype=dtype, seed=seed, repeats=repeats, run=run)


# ---------------------------------------------------------------------------- small handlers
def on_budget(budget: str):
    """Show the keep-ratio slider only for the Custom budget."""
    return gr.update(visible=budget == "Custom")


def budget_info(method: str) -> str:
    kind = method_kind(method)
    if kind == "pre_llm":
        stage = methods.PRE_LLM[METHODS[method][0]]
        budgets = pre_llm_budgets(stage.name)
        high, low = budgets["High"], budgets["Low"]
        return (f"Before the LLM: High keeps {_share(high)} of the patches ({high}), Low {_share(low)} ({low}); "
                f"Custom sets the share. {stage.supported_models} only.")
    if kind == "own_preset":
        return f"High is {method}'s published schedule, Low halves its keep ratios; Custom sets the final share."
    return ("High keeps 88% → 62% → 12% of the visual tokens over three stages, Low 50% → 25% → 6%; "
            "Custom sets the final share.")


def _share(preset: str) -> str:
    """The share of patches a pre-LLM preset keeps, as a fraction: "1/3" for visionzip-192."""
    return str(Fraction(PruneConfig.preset(preset).pre_llm_keep).limit_denominator(1000))


def on_method(method: str):
    """α only matters for TransPrune's combined score; a pre-LLM stage (VisionZip) has no pruning layers."""
    return (gr.update(interactive=METHODS[method] == ("transprune", "transprune")), gr.update(info=budget_info(method)),
            gr.update(interactive=method_kind(method) != "pre_llm"))
