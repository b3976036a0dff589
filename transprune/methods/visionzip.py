"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary", 2024): fewer image
tokens *before* the language model.

Unlike the other methods this is not a per-stage `Method` the runner calls inside the decoder: it
rewrites the model inputs. At the vision feature-select layer (LLaVA's `vision_feature_layer`,
-2) of the CLIP tower:

- dominant tokens: the patches the CLS token attends to most in that layer (mean over heads);
  as in the released code the CLS token itself counts as one dominant token (`keep_cls=True`),
  so `dominant=54` means CLS + 53 patches;
- contextual tokens: the remaining patches, in their original order, are split into
  `contextual` targets picked uniformly (every `R // contextual`-th one) and the others; each
  other patch is assigned to its most similar target by cosine similarity of the layer's keys
  (mean over heads), and each group is averaged (target included).

The selected vision features then go through the model's own projector and reach the language
model through `mm_encoder_outputs` (what `generate` itself passes after encoding pixels), with
`input_ids` carrying the matching, smaller number of image tokens.

Two ways to use it. Through a PruneConfig (method="visionzip" alone, or pre_llm="visionzip" with
a share `pre_llm_keep` on any in-LLM config; presets "visionzip-64|128|192" and stacks like
"visionzip-128+high"): the pruner rewrites the inputs and its trace is in patch space, with
VisionZip as a stage at layer 0:

    with transprune.apply(model, "visionzip-128+high") as pruner:
        model.generate(**pruner.prepare_inputs(inputs), max_new_tokens=32)

Or by hand, with exact counts: `compress_inputs` returns an ordinary input dict, and a pruner
applied afterwards prunes the VisionZip tokens (its trace's N is then the VisionZip count).

    new_inputs, kept = compress_inputs(model, inputs, dominant=54, contextual=10)
    with transprune.apply(model, "high"):
        model.generate(**new_inputs, max_new_tokens=32)

Stacked, the in-LLM keep ratios apply to the VisionZip tokens (visionzip-128+high keeps 128,
then 112 / 80 / 16). Token order in the LLM: [CLS], dominant patches in patch order, then the
contextual tokens. Paper settings for LLaVA-1.5: 192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10
(the "visionzip-192|128|64" presets of transprune.config); a share `keep` of N patches gives T = round(keep * N) tokens, 5/32 of them contextual.
Supported: LLaVA-1.5 (`LlavaForConditionalGeneration`) with one vision feature layer.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import compat
from ..errors import UnsupportedModelError
from ..trace import Stage, VisualLayout
from .base import PreLLMStage
from .preselect import reindex_trace, replace_image_runs

SUPPORTED_MODELS = ("LlavaForConditionalGeneration",)
CONTEXTUAL_SHARE = 10 / 64


@dataclass
class VisionZipSelection:
    """What VisionZip kept of each image, shapes (I, ...) over the I images of the batch.

    dominant: (I, k) sorted patch indices (0-based over the N patches, CLS excluded);
    targets: (I, C) patch indices of the contextual targets;
    group: (I, N) per patch, the contextual group it was merged into (0..C-1), -1 if dominant;
    token_patch: (I, T) per output token, its patch index, -1 for CLS and contextual tokens;
    cls_attention: (I, 1+N) the CLS attention the dominant tokens were picked by (CLS first).
    """
    dominant: torch.Tensor
    targets: torch.Tensor
    group: torch.Tensor
    token_patch: torch.Tensor
    keep_cls: bool
    cls_attention: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.token_patch.shape[1]


def counts(keep: float, patches: int) -> tuple[int, int]:
    """(dominant, contextual) for keeping the share `keep` of `patches`: T = round(keep * patches)
    tokens, 5/32 of them contextual as in every released setting (54+10, 108+20, 162+30)."""
    total = max(2, min(patches, math.floor(keep * patches + 0.5)))
    contextual = math.floor(total * CONTEXTUAL_SHARE + 0.5)
    return total - contextual, contextual


def num_patches(model) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def check_model(model):
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise UnsupportedModelError(
            f"VisionZip supports {', '.join(SUPPORTED_MODELS)} (a single CLIP tile per image); got {name}. "
            "Use an in-LLM method (transprune, fastv, pdrop) for other families.")
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int) or layer == 0:
        raise UnsupportedModelError(
            f"VisionZip needs one vision feature layer after the embeddings; this model uses {layer!r}.")


def _select_layer(vision_tower, feature_layer: int):
    """The encoder layer whose output is hidden_states[feature_layer] (index 0 is the embeddings)."""
    layers = vision_tower.encoder.layers
    return layers[feature_layer] if feature_layer < 0 else layers[feature_layer - 1]


def cls_attention_and_keys(attn, normed: torch.Tensor):
    """CLS-to-all attention (mean over heads) and keys (mean over heads) of a CLIP attention layer.

    normed: (I, n, dv) the layer's input after its first LayerNorm; token 0 is CLS.
    Returns attention (I, n) float32 summing to 1, and keys (I, n, head_dim).
    Computed by hand so the vision tower can stay on SDPA (output_attentions would force eager).
    """
    images, n, _ = normed.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    query = attn.q_proj(normed[:, :1]).view(images, 1, heads, head_dim).transpose(1, 2)   # (I, H, 1, hd)
    key = attn.k_proj(normed).view(images, n, heads, head_dim).transpose(1, 2)             # (I, H, n, hd)
    logits = (query.float() @ key.float().transpose(-1, -2)) * attn.scale                  # (I, H, 1, n)
    attention = torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]
    return attention, key.mean(dim=1)


def select_tokens(features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor,
                  dominant: int, contextual: int, keep_cls: bool = True):
    """The VisionZip merge on one layer's outputs (pure function).

    features: (I, 1+N, dv) the select layer's hidden states (CLS first); cls_attention: (I, 1+N);
    keys: (I, 1+N, hd). Returns (tokens (I, T, dv), VisionZipSelection), T = dominant + contextual.
    """
    images, n_all, _ = features.shape
    patches = n_all - 1
    top = dominant - 1 if keep_cls else dominant
    if top < 0 or contextual < 0 or top + contextual > patches:
        raise ValueError(f"VisionZip dominant={dominant}, contextual={contextual} do not fit {patches} patches "
                         f"(need dominant{' - 1' if keep_cls else ''} + contextual <= {patches}, each >= 0"
                         f"{', dominant >= 1 with keep_cls' if keep_cls else ''}).")
    device = features.device
    patch_features, patch_keys = features[:, 1:], keys[:, 1:]
    dominant_idx = cls_attention[:, 1:].topk(top, dim=1).indices.sort(dim=1).values       # (I, top)
    is_dominant = torch.zeros(images, patches, dtype=torch.bool, device=device)
    is_dominant.scatter_(1, dominant_idx, True)
    group = torch.full((images, patches), -1, dtype=torch.long, device=device)
    token_parts = [features[:, :1]] if keep_cls else []
    token_parts.append(patch_features.gather(1, dominant_idx[..., None].expand(-1, -1, features.shape[-1])))
    targets = torch.empty(images, contextual, dtype=torch.long, device=device)
    if contextual:
        remaining_count = patches - top
        step = max(1, remaining_count // contextual)
        target_rank = torch.arange(0, remaining_count, step, device=device)[:contextual]
        merged = []
        for i in range(images):
            remaining = (~is_dominant[i]).nonzero().flatten()                              # (R,) patch order
            is_target = torch.zeros(remaining_count, dtype=torch.bool, device=device)
            is_target[target_rank] = True
            target_patches, other_patches = remaining[is_target], remaining[~is_target]
            normed = F.normalize(patch_keys[i].float(), dim=-1)
            similarity = normed[other_patches] @ normed[target_patches].T                  # (R - C, C)
            assign = similarity.argmax(dim=1)
            group[i, target_patches] = torch.arange(contextual, device=device)
            group[i, other_patches] = assign
            sums = patch_features[i, target_patches].clone().index_add_(0, assign, patch_features[i, other_patches])
            counts = torch.bincount(assign, minlength=contextual) + 1
            merged.append(sums / counts[:, None].to(sums.dtype))
            targets[i] = target_patches
        token_parts.append(torch.stack(merged))
    tokens = torch.cat(token_parts, dim=1)
    cls_part = [torch.full((images, 1), -1, dtype=torch.long, device=device)] if keep_cls else []
    token_patch = torch.cat(cls_part + [dominant_idx, torch.full((images, contextual), -1, dtype=torch.long,
                                                                 device=device)], dim=1)
    return tokens, VisionZipSelection(dominant=dominant_idx, targets=targets, group=group,
                                      token_patch=token_patch, keep_cls=keep_cls, cls_attention=cls_attention)


@torch.no_grad()
def compress_features(model, pixel_values: torch.Tensor, dominant: int = 54, contextual: int = 10,
                      keep_cls: bool = True, span=None):
    """Run the vision tower and return (projected tokens (I, T, d_text), VisionZipSelection).

    `span(name)`, if given, returns a context manager around VisionZip's own scoring ("score":
    the CLS attention and keys, then the merge); the tower and projector run outside it."""
    check_model(model)
    tower = model.model.vision_tower
    feature_layer = model.config.vision_feature_layer
    attn = _select_layer(tower, feature_layer).self_attn
    captured = {}

    def grab(module, args, kwargs):
        captured["normed"] = compat.hidden_states(args, kwargs)

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        dtype = next(tower.parameters()).dtype
        out = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
    finally:
        handle.remove()
    features = out.hidden_states[feature_layer]
    with (span or _no_span)("score"):
        cls_attention, keys = cls_attention_and_keys(attn, captured["normed"])
        tokens, selection = select_tokens(features, cls_attention, keys, dominant, contextual, keep_cls)
    return model.model.multi_modal_projector(tokens), selection


def patch_token_index(selection: VisionZipSelection, image: int) -> torch.Tensor:
    """Per VisionZip token of one image, its index in that image's patch space: the dominant
    token's patch, the contextual token's target patch (the group's representative), N for CLS."""
    index = selection.token_patch[image].clone()
    contextual = selection.targets.shape[1]
    if contextual:
        index[-contextual:] = selection.targets[image]
    if selection.keep_cls:
        index[0] = selection.group.shape[1]
    return index


def to_patch_space(trace, selection: VisionZipSelection, images: list[int], keep: float):
    """A trace taken on VisionZip tokens, re-indexed into the patches of `images` (the images of
    the trace's sample, in prompt order) with VisionZip itself as a first stage at layer 0.

    Image k's patches are indices k*(N+1) .. k*(N+1)+N-1 and its CLS token k*(N+1)+N (N+1 -> N
    without CLS), so overlays and metrics see the whole picture; the VisionZip stage keeps every
    token that entered the LLM (its score is the CLS attention), later stages keep a subset of those.
    """
    if not images:   # a text-only row of the batch: nothing was compressed or pruned
        return trace
    patches = selection.group.shape[1]
    per_image = patches + int(selection.keep_cls)
    index = torch.cat([patch_token_index(selection, i).cpu() + k * per_image for k, i in enumerate(images)])
    if len(index) != trace.visual_tokens:
        raise ValueError(f"The trace has {trace.visual_tokens} visual tokens but VisionZip produced {len(index)}.")
    score = torch.cat([torch.cat([selection.cls_attention[i, 1:], selection.cls_attention[i, :1]])[:per_image]
                       for i in images]).float().cpu()
    first = Stage(layer=0, keep_ratio=keep, candidates=torch.arange(len(images) * per_image),
                  kept=index.sort().values, score=score)
    return reindex_trace(trace, index, len(images) * per_image, first)


def patch_layout(layout, keep_cls: bool = True):
    """The family's VisualLayout of one image's N patches, plus a place-less (NaN) CLS token at
    index N, matching `to_patch_space`."""
    if not keep_cls:
        return layout
    nan = torch.full((1, 4), float("nan"), dtype=layout.boxes.dtype)
    return VisualLayout(boxes=torch.cat([layout.boxes, nan]), segment=torch.cat([layout.segment, layout.segment[:1]]),
                        segments=list(layout.segments), image_size=layout.image_size,
                        frame=None if layout.frame is None else torch.cat([layout.frame, layout.frame[:1]]))


@torch.no_grad()
def compress_inputs(model, inputs: dict, dominant: int = 54, contextual: int = 10, keep_cls: bool = True):
    """Processor inputs -> (inputs for the LLaVA model with VisionZip tokens, kept patch indices).

    Returns a new dict without `pixel_values`, with `mm_encoder_outputs` holding the projected
    VisionZip tokens and `input_ids` / `attention_mask` with T = dominant + contextual image tokens
    per image (rows re-padded on the left), a drop-in for `model(**...)` and `model.generate(**...)`.
    `kept` is a list, one per image, of the sorted dominant patch indices; `compress` also returns
    the full VisionZipSelection (contextual groups, CLS attention) and each row's images.
    """
    new_inputs, selection, _ = compress(model, inputs, dominant, contextual, keep_cls)
    return new_inputs, list(selection.dominant)


@torch.no_grad()
def compress(model, inputs: dict, dominant: int = 54, contextual: int = 10, keep_cls: bool = True, span=None):
    """`compress_inputs` returning (new inputs, VisionZipSelection, per row the list of its image numbers)."""
    check_model(model)
    if inputs.get("pixel_values") is None:
        raise ValueError("VisionZip needs the image: pass the processor's inputs including pixel_values.")
    tokens, selection = compress_features(model, inputs["pixel_values"], dominant, contextual, keep_cls, span)
    new_inputs, row_images = replace_image_runs(model, inputs, tokens)
    return new_inputs, selection, row_images


def _no_span(name):
    return nullcontext()


class VisionZip(PreLLMStage):
    """VisionZip as a registered pre-LLM stage: keeps the share `config.pre_llm_keep` of each
    image's patches (see `counts`), and maps the in-LLM traces back into patch space."""
    name = "visionzip"
    label = "VisionZip"
    score_title = "CLS attention"
    supported_models = "LLaVA-1.5-family models"
    default_keep = 64 / 576          # the released LLaVA-1.5 "64" setting
    # Alone, before the language model, at the released LLaVA-1.5 token counts (of 576 patches); the share
    # carries over to other patch grids. Stack with an in-LLM preset by name, e.g. "visionzip-128+high".
    presets = {"visionzip-192": dict(pre_llm_keep=192 / 576), "visionzip-128": dict(pre_llm_keep=128 / 576),
               "visionzip-64": dict(pre_llm_keep=64 / 576)}

    @classmethod
    def kept_split(cls, keep: float, visual_tokens: int) -> list[int]:
        return list(counts(keep, visual_tokens))

    def __init__(self, config):
        super().__init__(config)
        self.keep = config.pre_llm_keep
        self._last = None            # (VisionZipSelection, images of each row, input_ids) of prepare_inputs

    @property
    def selection(self) -> VisionZipSelection | None:
        """What the last `prepare_inputs` kept of each image."""
        return self._last[0] if self._last is not None else None

    def check_model(self, model):
        check_model(model)

    def prepare_inputs(self, model, inputs: dict, span=None) -> dict:
        dominant, contextual = counts(self.keep, num_patches(model))
        new_inputs, selection, row_images = compress(model, inputs, dominant, contextual, span=span)
        self._last = (selection, row_images, new_inputs["input_ids"])
        return new_inputs

    def is_prepared(self, input_ids, pixel_values) -> bool:
        """True for a model call with the inputs `prepare_inputs` returned last."""
        return pixel_values is None and (input_ids is None or (
            self._last is not None and torch.equal(input_ids, self._last[2])))

    def map_traces(self, traces: list) -> list:
        if self._last is None:
            return traces
        selection, row_images, _ = self._last
        return [to_patch_space(trace, selection, images, self.keep) for trace, images in zip(traces, row_images)]

    def tokens_entering_llm(self, visual_tokens: int) -> int:
        return sum(counts(self.keep, visual_tokens))

    def patches(self, model) -> int:
        """Patches per image: the tokens one image has before this stage."""
        return num_patches(model)

    def layout(self, image_layout, trace):
        """The family's layout of one image's patches (`image_layout`), in the patch space of
        `trace` (a place-less CLS token after the patches when the trace counts it)."""
        return patch_layout(image_layout, keep_cls=trace.visual_tokens > len(image_layout.boxes))
