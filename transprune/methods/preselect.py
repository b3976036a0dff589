"""What the pre-LLM stages that keep a *subset* of each image's projected visual tokens share
(DivPrune, CDPruner), and the input rewrite every pre-LLM stage uses (VisionZip too).

Such a stage runs the model's own vision tower and projector (`get_image_features`), chooses T of
the N projected tokens of each image (`SubsetStage.choose`), and hands the language model only
those, in their original order, through `mm_encoder_outputs` (what `generate` passes after encoding
pixels itself), with `input_ids` carrying T image tokens per image (`replace_image_runs`). The
language model therefore numbers positions over the shorter sequence ("compact"), as both
released codes do on LLaVA (they drop the features before building the sequence).

Families. Supported: LLaVA-1.5 (`LlavaForConditionalGeneration`), one tile of N patches per image,
where the image's tokens are exactly the projected patches. Not supported, and why:
LLaVA-NeXT / OneVision (the projected tiles are unpadded and interleaved with newline tokens after
projection, so "the image's tokens" are not `get_image_features`' rows), Qwen2.5-VL (M-RoPE
position ids are computed from `image_grid_thw` and the number of image tokens in `input_ids`,
which a shorter run breaks; the selection idea would carry over with "original" 3-D positions, which
this rewrite cannot express), SmolVLM (one span across tiles and text markup). There, run alone, the
same choice is made on the first decoder layer's input by the stage's twin (`first_layer.py`), which
`resolve.for_model` swaps in.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace

import torch

from ..errors import UnsupportedModelError
from ..trace import Stage
from .base import PreLLMStage

SUPPORTED_MODELS = ("LlavaForConditionalGeneration",)


def check_model(model, label: str) -> None:
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise UnsupportedModelError(
            f"{label} supports {', '.join(SUPPORTED_MODELS)} (a single CLIP tile per image); got {name}. "
            "On other families run it alone through transprune.apply (it then prunes the first decoder layer's "
            "input), or use an in-LLM method (dart, transprune, fastv, pdrop).")


def keep_count(keep: float, patches: int) -> int:
    """T = round(keep * patches), at least 1 and at most `patches` (64/576 of 576 -> 64)."""
    return max(1, min(patches, math.floor(keep * patches + 0.5)))


def image_runs(row: torch.Tensor, image_token: int) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive image tokens in one row of input_ids."""
    is_image = (row == image_token).tolist() + [False]
    runs, start = [], None
    for position, flag in enumerate(is_image):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            runs.append((start, position))
            start = None
    return runs


def image_rows(input_ids: torch.Tensor, image_token: int) -> list[list[int]]:
    """Per row of the batch, the numbers of its images (in the order pixel_values holds them)."""
    rows, image = [], 0
    for row in input_ids:
        count = len(image_runs(row, image_token))
        rows.append(list(range(image, image + count)))
        image += count
    return rows


def replace_image_runs(model, inputs: dict, tokens: torch.Tensor):
    """The processor's inputs with each image's run of image tokens replaced by `tokens` (I, T, d).

    Returns (new inputs without `pixel_values`, carrying `mm_encoder_outputs` and T image tokens per
    image, rows re-padded on the left; per row the list of its image numbers)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    input_ids = inputs["input_ids"]
    image_token = model.config.image_token_id
    count = tokens.shape[1]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows, masks, row_images, image = [], [], [], 0
    for b in range(input_ids.shape[0]):
        row, mask = input_ids[b], attention_mask[b]
        pieces, mask_pieces, cursor = [], [], 0
        row_images.append([])
        for start, end in image_runs(row, image_token):
            pieces += [row[cursor:start], row.new_full((count,), image_token)]
            mask_pieces += [mask[cursor:start], mask.new_ones(count)]
            row_images[-1].append(image)
            cursor, image = end, image + 1
        pieces.append(row[cursor:])
        mask_pieces.append(mask[cursor:])
        rows.append(torch.cat(pieces))
        masks.append(torch.cat(mask_pieces))
    if image != tokens.shape[0]:
        raise ValueError(f"input_ids hold {image} runs of image tokens but pixel_values has {tokens.shape[0]} "
                         "images; pass the processor's output unchanged.")
    width = max(len(r) for r in rows)
    pad_id = model.config.text_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    new_ids = input_ids.new_full((len(rows), width), pad_id)
    new_mask = attention_mask.new_zeros((len(rows), width))
    for b, (row, mask) in enumerate(zip(rows, masks)):
        new_ids[b, width - len(row):] = row
        new_mask[b, width - len(row):] = mask
    new_inputs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_ids", "attention_mask",
                                                               "image_sizes")}
    new_inputs.update(input_ids=new_ids, attention_mask=new_mask,
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(tokens))})
    return new_inputs, row_images


def reindex_trace(trace, index: torch.Tensor, total: int, first: Stage):
    """A trace taken on the tokens a pre-LLM stage let into the LLM, re-indexed into the original
    tokens: `index[t]` is the original index of LLM visual token t, `total` the number of original
    tokens, `first` the pre-LLM stage itself (layer 0). Tokens an in-LLM stage inserted (SparseVLM's
    recycled ones, indices from the LLM's N on) are numbered after the original tokens, in order."""
    if len(index) != trace.visual_tokens:
        raise ValueError(f"The trace has {trace.visual_tokens} visual tokens but the pre-LLM stage produced "
                         f"{len(index)}.")
    inserted = sum(0 if stage.inserted is None else len(stage.inserted) for stage in trace.stages)
    index = torch.cat([index, torch.arange(total, total + inserted)])
    stages = [first]
    for stage in trace.stages:
        candidates = index[stage.candidates]
        order = candidates.argsort()
        reorder = lambda t: None if t is None else t[order]  # noqa: E731
        stages.append(replace(stage, candidates=candidates[order], kept=index[stage.kept].sort().values,
                              score=stage.score[order], ttv=reorder(stage.ttv), iga=reorder(stage.iga),
                              inserted=None if stage.inserted is None else index[stage.inserted],
                              sources=None if stage.sources is None else [index[s] for s in stage.sources]))
    return replace(trace, visual_tokens=total, stages=stages, tokens_per_layer=list(trace.tokens_per_layer),
                   visual_tokens_per_layer=list(trace.visual_tokens_per_layer))


@torch.no_grad()
def projected_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(I, N, d) each image's projected visual tokens, exactly what the model inserts for it."""
    config = model.config
    out = model.model.get_image_features(pixel_values=pixel_values.to(model.dtype),
                                         vision_feature_layer=config.vision_feature_layer,
                                         vision_feature_select_strategy=config.vision_feature_select_strategy)
    return torch.stack(list(out.pooler_output))


def instruction_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           row: int) -> torch.Tensor:
    """(q, d) the input embeddings of one row's instruction: the tokens after its last image token."""
    ids = input_ids[row]
    positions = (ids == model.config.image_token_id).nonzero().flatten()
    after = torch.arange(int(positions[-1]) + 1, len(ids), device=ids.device)
    if attention_mask is not None:
        after = after[attention_mask[row, after].bool()]
    return model.get_input_embeddings()(ids[after])


class SubsetStage(PreLLMStage):
    """A pre-LLM stage that keeps T = round(pre_llm_keep * N) of each image's N projected tokens.

    A subclass provides `choose(features, instruction, keep) -> (kept, score)` on one image:
    features (N, d) its projected tokens, instruction (q, d) the input embeddings of its row's
    instruction (None unless `uses_instruction`), keep = T; kept: the T chosen indices, sorted;
    score: (N,) per token, what the trace shows (higher = more wanted)."""
    supported_models = "LLaVA-1.5-family models"
    default_keep = 64 / 576           # the released LLaVA-1.5 "64" setting
    uses_instruction = False

    def __init__(self, config):
        super().__init__(config)
        self.keep = config.pre_llm_keep
        self._last = None   # (kept per image (I, T), score per image (I, N), images of each row, input_ids)

    def choose(self, features: torch.Tensor, instruction: torch.Tensor | None, keep: int):
        raise NotImplementedError

    def check_model(self, model):
        check_model(model, self.label)

    @torch.no_grad()
    def select(self, model, inputs: dict, span=None):
        """(kept (I, T) sorted patch indices, score (I, N), tokens (I, T, d)) for the processor's inputs."""
        self.check_model(model)
        if inputs.get("pixel_values") is None:
            raise ValueError(f"{self.label} needs the image: pass the processor's inputs including pixel_values.")
        features = projected_features(model, inputs["pixel_values"])
        keep = keep_count(self.keep, features.shape[1])
        rows = image_rows(inputs["input_ids"], model.config.image_token_id)
        row_of = {image: b for b, images in enumerate(rows) for image in images}
        kept, scores = [], []
        with (span or _no_span)("score"):
            for image, image_features in enumerate(features):
                instruction = (instruction_embeddings(model, inputs["input_ids"], inputs.get("attention_mask"),
                                                      row_of[image]) if self.uses_instruction else None)
                chosen, score = self.choose(image_features, instruction, keep)
                kept.append(chosen)
                scores.append(score)
        kept = torch.stack(kept)
        tokens = features.gather(1, kept[..., None].expand(-1, -1, features.shape[-1]))
        return kept, torch.stack(scores), tokens

    def prepare_inputs(self, model, inputs: dict, span=None) -> dict:
        kept, scores, tokens = self.select(model, inputs, span)
        new_inputs, row_images = replace_image_runs(model, inputs, tokens)
        self._last = (kept, scores, row_images, new_inputs["input_ids"])
        return new_inputs

    def is_prepared(self, input_ids, pixel_values) -> bool:
        """True for a model call with the inputs `prepare_inputs` returned last."""
        return pixel_values is None and (input_ids is None or (
            self._last is not None and torch.equal(input_ids, self._last[3])))

    def map_traces(self, traces: list) -> list:
        if self._last is None:
            return traces
        kept, scores, row_images, _ = self._last
        mapped = []
        for trace, images in zip(traces, row_images):
            if not images:   # a text-only row: nothing was selected or pruned
                mapped.append(trace)
                continue
            patches = scores.shape[1]
            index = torch.cat([kept[i].cpu() + k * patches for k, i in enumerate(images)])
            total = len(images) * patches
            first = Stage(layer=0, keep_ratio=self.keep, candidates=torch.arange(total), kept=index.sort().values,
                          score=torch.cat([scores[i].float().cpu() for i in images]))
            mapped.append(reindex_trace(trace, index, total, first))
        return mapped

    def tokens_entering_llm(self, visual_tokens: int) -> int:
        return keep_count(self.keep, visual_tokens)

    def patches(self, model) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def layout(self, image_layout, trace):
        return image_layout   # the trace indexes the image's own patches


def _no_span(name):
    return nullcontext()
