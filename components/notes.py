"""Static text: the header and the "how this is measured" note."""

from __future__ import annotations

import os

import gradio as gr

from .inputs import MAX_PIXELS, MAX_QUESTION_CHARS, MAX_SIDE, MAX_UPLOAD

HEADER = """
# TransPrune: same answer, a fraction of the visual tokens
Training-free visual-token pruning inside a vision-language model · [paper (arXiv 2507.20630)](https://arxiv.org/abs/2507.20630)
· {code}
"""


def code_link() -> str:
    """A link to this app's code on a Hugging Face Space; elsewhere, where it lives."""
    space = os.environ.get("SPACE_ID", "").strip()
    if space:
        return f"[code](https://huggingface.co/spaces/{space}/tree/main) (the `transprune` library and this app)"
    return "code: the `transprune` library in this app's repository"

WHAT_YOU_SEE = """
**What you are seeing.** One click asks the same question about the same image twice: once with every visual
token (the baseline) and once with the chosen method (TransPrune by default) dropping most of them: inside the
language model (TransPrune, FastV, PDrop, SparseVLM, DART), or before it (VisionZip, DivPrune, CDPruner; on
models other than LLaVA-1.5, DivPrune and CDPruner prune the language model's first-layer input, the same
choice). The picture shows which image patches the pruned model still had after its last pruning stage.
"""

MEASUREMENT = f"""
**Same inputs, same greedy decoding, one loaded model.** Pruning hooks are attached for the pruned call
only and removed afterwards (per call, under the model's lock), so concurrent users never share settings.

**Timing.** Both paths are warmed up once (one new token each). The answer pass then runs both, in an order
that alternates from one click to the next; *Timing repeats − 1* more prefill-only pairs, again alternating,
follow. *Prefill ms* is the median over those runs: the time to the first new token, including the pruning
scores. *Decode tokens/s* and *end-to-end ms* come from the answer pass. On a GPU the clock is read after a
CUDA synchronize. *KV cache at the end* is what each run's cache holds when it stops, read from its
tensors: every layer keeps the tokens it saw, so layers after a pruning stage hold fewer. On a GPU, *Run
memory* is each run's own allocator peak above the loaded model (activations too). *Where the time went* splits the answer pass into the vision encoder, the language model's prefill and
decoding. Pruning has a
fixed cost per layer (hooks, the TTV and IGA scores): on the tiny built-in models it outweighs the FLOPs saved,
so they can measure slower than the baseline; the saving shows at real model sizes (`python -m transprune.bench`).

**FLOPs.** Analytic, with the paper's accounting: per decoder layer 4nd² + 2n²d + 3ndm for n visual
tokens (d hidden size, m MLP size), summed over layers. The *whole sequence* row counts every token (text
too) and gives the honest bound for the measured prefill speedup.

**Budgets.** *High* and *Low* are the paper's schedules, written for 32 layers and scaled to the model's
depth. *Custom* sets the share kept after the last stage; earlier stages drop the same fractions of the total
as *High*. FastV, PDrop and SparseVLM use their papers' schedules (*Low* halves their keep ratios); SparseVLM
also *recycles* what it prunes: a few cluster means of the best pruned tokens join the sequence, counted in the
table ("28 (26 + 2 recycled)") but not drawn, since they are no patch of the image. VisionZip works
before the language model (LLaVA-1.5 family): *High* keeps 192/576 of the patches, *Low* 64/576, *Custom* the
share you set; its prefill time includes its own pass over the vision tower, and its FLOPs count only the
language model, like every row here.

**Overlays.** Each visual token is drawn where its patch lies on your image (LLaVA-NeXT: the base view and
the high-resolution tiles separately). Hatched areas lie outside the model's view (center crop).

**Limits.** Uploads up to {MAX_UPLOAD}; images up to {MAX_PIXELS / 1e6:.0f} megapixels, downscaled to
{MAX_SIDE} px on the longer side; questions up to {MAX_QUESTION_CHARS} characters. The built-in *tiny* models
have random weights: they exercise the pruning path end to end, but their answers are noise.
"""


def build_header():
    return gr.Markdown(HEADER.format(code=code_link()), elem_id="header")


def build_what_you_see():
    return gr.Markdown(WHAT_YOU_SEE, elem_id="what-you-see")


def build_measurement():
    with gr.Accordion("How this is measured", open=False, elem_id="how-measured"):
        gr.Markdown(MEASUREMENT)
