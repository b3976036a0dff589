"""What the runner, the app and the tests need to know about a model family, with Llama-style defaults.

A new family = one module in this package with an `Adapter` subclass + one `register(...)` line in
`transprune/adapters/__init__.py` + its test file. Nothing else names the family: `transprune.models`
(its registry entries), `.flops` (shapes), `.video` (frame counts and preprocessing), `.reference`
(where the language model sits), `.resolve` (position modes), the app and `tests/conftest.py`
(whose FAMILIES parametrise every invariant) read it all from the adapter registry, and
`tests/test_registry.py` fails when a registered family lacks a fact. For example:

    class PaliAdapter(Adapter):
        family, label = "pali", "PaliGemma"
        model_classes = ("PaliGemmaForConditionalGeneration",)
        architectures = {"paligemma-3b": Shape(hidden=2048, intermediate=16384, layers=18, visual_tokens=256)}
        timing_arch = "paligemma-3b"
        models = (
            ModelSpec("tiny-pali", "Tiny PaliGemma (random weights)", size="0.9M", builder=lambda: tiny_pali(),
                      description="PaliGemma architecture, random weights."),
            ModelSpec("paligemma-3b", "PaliGemma-3B", size="3B", checkpoint="google/paligemma-3b-mix-224"),
        )

        @staticmethod
        def build_tiny(**kwargs):
            return tiny_pali(**kwargs)

        def language_model(self, model):          # only where it differs from model.model.language_model
            return model.model.language_model

    def tiny_pali(layers=16, hidden=64, attn_implementation="sdpa", seed=0):
        ...                                        # built with transprune.tiny's shared pieces

A family's adapter provides (class attributes unless noted; the defaults fit Llama-style decoders):

- `family` (registry key, e.g. "llava"), `label` (shown to users), `model_classes` (the
  transformers class names it handles; `transprune.models` loads the one a checkpoint's config.json
  names, see `model_class`);
- `models`: its registry entries (`transprune.spec.ModelSpec`: name, label, size, and either a
  Hub `checkpoint` or an offline `builder`; optionally a recommended `positions` mode with its
  reason and a held-out eval file). `register` fills in `family` and `video` (from `video_frames`);
  `transprune.models.REGISTRY` lists them (offline ones first). A subclass declares its own;
- sizes: `architectures`, its real checkpoints' language-model shapes by name
  (`transprune.architecture.Shape`: public config.json values and the usual number of visual
  tokens), which `transprune.flops.ARCHITECTURES` collects for the analytic FLOPs and
  `bench --arch`; `text_config(model)`, the loaded model's language-model config;
  `timing_arch`: the entry of `architectures` whose shape the app's "speed at real size" times
  for this family (None: LLaVA-1.5-7B's);
- structure: `language_model(model)` (the reference and the runner read it here) /
  `decoder_layers(model)`, and the names of a decoder layer's sub-modules the runner hooks:
  `attention_name`, `mlp_name`, `input_norm_name`, and the attention's `key_projection_name`,
  `query_projection_name`;
- positions: `default_positions`, `allowed_positions` (`transprune.resolve` applies them),
  `rotary(model, hidden, position_ids)` and `apply_rotary` (M-RoPE families override them if
  their layout differs); per layer, where layers differ: `layer_rotary`,
  `side_position_embeddings`, and `layer_masks` (each layer's `transprune.masks.LayerMask`: layer
  type, sliding window, bidirectional image blocks);
- side passes: `side_projection(layer, hidden, position_embeddings, query_slots)` (input norm,
  q/k projections with biases, q/k norms, rotary; override for another attention layout) and
  `attention_scaling(layer)`; `attn_implementation(model)` picks the mask builder;
- tokens: `visual_token_ids(model)` / `visual_mask(model, input_ids)` (every token the vision
  path fills in), `read_prompt(...)` (visual spans and the instruction; see
  `transprune.prompt.read_prompt`);
- `build_tiny(attn_implementation=..., seed=...)` -> (model, processor): the offline tiny model
  of the family (16 decoder layers, random weights, float32, fixed seed, offline processor) the
  tests and the app use, written in the family's module (`transprune.tiny` has the shared
  word-level tokenizer, chat template and config pieces);
- video facts: `video_frames` (default frames sampled from a file; None = the family takes no
  video), `required_frames` (a count its checkpoints insist on), `video_pixel_values(image_processor,
  clips)` (what its video processor makes of the frames, without torchvision; `transprune.frames`
  has the shared pieces), `video_metadata` (its processor reads the frame rate),
  `video_token_count(...)`, `video_layout(...)`;
- overlays: `visual_layout(model, processor, image_size, num_tokens)`;
- `attach(model, prefill_sequence)`: hooks of its own the pruner attaches before its own (Qwen3-VL's
  DeepStack), returning their handles.

The KV cache travels however transformers passes it: `transprune.compat` finds it by type.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import compat
from .. import prompt as prompts
from ..masks import LayerMask
from ..architecture import Shape
from ..spec import ModelSpec
from ..errors import UnsupportedModelError


class Adapter:
    family = "base"
    label = "base"
    model_classes: tuple[str, ...] = ()
    # Real checkpoints' language-model shapes by name (a subclass declares its own, or {}).
    architectures: dict[str, Shape] = {}
    timing_arch: str | None = None   # the name in `architectures` whose shape the app times at real size
    models: tuple[ModelSpec, ...] = ()   # its registry entries (a subclass declares its own, or ())
    default_positions = "compact"
    allowed_positions = ("compact", "original")
    # Sub-module names of one decoder layer (and of its attention).
    attention_name = "self_attn"
    mlp_name = "mlp"
    input_norm_name = "input_layernorm"
    key_projection_name = "k_proj"
    query_projection_name = "q_proj"
    # Video: None = images only.
    video_frames: int | None = None
    required_frames: int | None = None
    video_metadata = False

    # ----------------------------------------------------------------- structure
    @classmethod
    def model_class(cls, config=None):
        """The transformers class `transprune.models` loads a checkpoint of this family with: the one its
        config.json names (`config.architectures`), which must be one of `model_classes`; the first of
        them for a config that names none."""
        import transformers

        name = (getattr(config, "architectures", None) or cls.model_classes[:1])[0]
        if name not in cls.model_classes:
            raise UnsupportedModelError(f"its config.json names {name}, which is not a {cls.label} model class "
                                        f"(those are: {', '.join(cls.model_classes)})")
        return getattr(transformers, name)

    @staticmethod
    def build_tiny(**kwargs):
        """(model, processor): the family's offline tiny random model."""
        raise NotImplementedError

    def attach(self, model: nn.Module, prefill_sequence) -> list:
        """Handles of hooks the family needs beyond the runner's, attached before the runner's (so on
        a shared module they run first); `prefill_sequence()` is the `transprune.sequence.PrunedSequence`
        of the prefill in progress, None outside one. Most families need none."""
        return []

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    # Where vision encoders sit on the inner model: LLaVA's, Qwen2.5-VL's, Idefics3's, Video-LLaVA's two.
    vision_encoder_names = ("vision_tower", "visual", "vision_model", "image_tower", "video_tower")

    def vision_encoders(self, model: nn.Module) -> list[nn.Module]:
        """The model's vision encoders (timed apart from the language model); [] where none is found."""
        inner = getattr(model, "model", model)
        return [getattr(inner, name) for name in self.vision_encoder_names
                if isinstance(getattr(inner, name, None), nn.Module)]

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm the language model applies after its last decoder layer."""
        return self.language_model(model).norm

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def key_projection(self, layer: nn.Module) -> nn.Module:
        return getattr(self.attention(layer), self.key_projection_name)

    def text_config(self, model: nn.Module):
        """The language model's config (hidden_size, intermediate_size, num_hidden_layers, ...)."""
        return getattr(model.config, "text_config", model.config)

    def attn_implementation(self, model: nn.Module) -> str:
        return str(getattr(self.text_config(model), "_attn_implementation", None) or "eager")

    # ----------------------------------------------------------------- tokens
    def visual_token_ids(self, model: nn.Module) -> list[int]:
        ids = []
        for name in ("image_token_id", "video_token_id"):
            value = getattr(model.config, name, None)
            if value is not None:
                ids.append(int(value))
        return ids

    def visual_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: True at every token the vision path fills in."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.visual_token_ids(model):
            mask |= input_ids == token_id
        return mask

    def read_prompt(self, model: nn.Module, input_ids: torch.Tensor, is_visual: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> prompts.Prompt:
        """Visual tokens, their spans (one per image or video) and the instruction of each sample."""
        return prompts.read_prompt(input_ids, is_visual, attention_mask)

    # ----------------------------------------------------------------- positions
    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) for the given position ids, as the language model computes them."""
        return self.language_model(model).rotary_emb(hidden, position_ids=position_ids)

    def layer_rotary(self, model: nn.Module, number: int, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) of decoder layer `number` (1-indexed): `rotary`, unless layers differ (Gemma 3)."""
        return self.rotary(model, hidden, position_ids)

    def side_position_embeddings(self, model: nn.Module, number: int, layer_kwargs: dict, hidden: torch.Tensor):
        """(cos, sin) that layer `number` would use on the sequence the latest layer saw (its
        `layer_kwargs`): the same ones, unless layers differ (Gemma 3)."""
        return compat.get(layer_kwargs, "position_embeddings")

    def layer_masks(self, model: nn.Module) -> list[LayerMask]:
        """Per decoder layer, what its attention mask says (`transprune.masks`): causal everywhere
        unless the family interleaves layer types (Gemma 3)."""
        return [LayerMask()] * len(self.decoder_layers(model))

    def apply_rotary(self, attn: nn.Module, query, key, cos, sin):
        module = sys.modules[type(attn).__module__]
        return module.apply_rotary_pos_emb(query, key, cos, sin)

    def side_projection(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings,
                        query_slots: torch.Tensor | None = None, key_proj: torch.Tensor | None = None):
        """Queries (B, H, n, hd) and keys (B, Hkv, n, hd) that `layer` would compute from `hidden`,
        and the raw key projection (B, n, Hkv*hd) it used.

        Runs the layer's input norm, q/k projections (with their biases), q/k norms where the
        model has them, and its rotary embedding; the model's attention kernel is not involved.
        With `query_slots` (B, m) only those queries are computed (the scores read no others);
        the other query rows are left at zero. Pass `key_proj` when the projection is already
        known (the layer computed it in its own forward) to skip it; the runner also hands it to
        the next layer so survivors are not projected twice.
        """
        attn = self.attention(layer)
        normed = getattr(layer, self.input_norm_name)(hidden)
        q_proj, k_proj = getattr(attn, self.query_projection_name), getattr(attn, self.key_projection_name)
        cos, sin = position_embeddings
        if key_proj is None:
            key_proj = k_proj(normed)
        key = key_proj.view(*normed.shape[:-1], -1, attn.head_dim)
        if query_slots is None:
            query = q_proj(normed).view(*normed.shape[:-1], -1, attn.head_dim)
        else:
            picked = normed.gather(1, query_slots[:, :, None].expand(-1, -1, normed.shape[-1]))
            query = q_proj(picked).view(*picked.shape[:-1], -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        if query_slots is None:
            return (*self.apply_rotary(attn, query, key, cos, sin), key_proj)
        _, key = self.apply_rotary(attn, key[:, :0], key, cos, sin)
        index = query_slots[:, :, None].expand(-1, -1, cos.shape[-1])
        picked_cos = cos.expand(hidden.shape[0], -1, -1).gather(1, index)
        picked_sin = sin.expand(hidden.shape[0], -1, -1).gather(1, index)
        query, _ = self.apply_rotary(attn, query, query, picked_cos, picked_sin)
        full = query.new_zeros(query.shape[0], query.shape[1], hidden.shape[1], query.shape[-1])
        full.scatter_(2, query_slots[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]), query)
        return full, key, key_proj

    def attention_scaling(self, layer: nn.Module) -> float:
        return float(self.attention(layer).scaling)

    # ----------------------------------------------------------------- video
    def video_token_count(self, model_config, processor, num_frames: int, frame_size) -> int:
        """How many visual tokens one video of `num_frames` frames of size (W, H) becomes."""
        raise NotImplementedError(f"{self.family} models take no video.")

    def video_pixel_values(self, image_processor, clips: list) -> dict:
        """What the family's video processor returns for `clips` (lists of PIL frames), made without
        torchvision with the image processor's settings: `pixel_values_videos` (and whatever else the
        model reads, e.g. Qwen's `video_grid_thw`). Every video family overrides it."""
        raise NotImplementedError(f"{self.family} models take no video.")

    # ----------------------------------------------------------------- overlays
    def visual_layout(self, model: nn.Module, processor, image_size: tuple[int, int], num_tokens: int):
        """VisualLayout for one image of size (W, H) giving `num_tokens` tokens, or None if unknown."""
        return None

    def video_layout(self, model: nn.Module, processor, frame_size: tuple[int, int], num_frames: int,
                     num_tokens: int):
        """VisualLayout for one video of `num_frames` frames of size (W, H) giving `num_tokens` tokens.

        One entry per visual token: its frame index and its box in original frame pixels (NaN for
        tokens without a place). None if the family takes no video or the count does not match.
        """
        return None
