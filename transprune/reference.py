"""A slow, hook-free reference of TransPrune for one unpadded prompt.

It runs the decoder layers itself, sub-module by sub-module, deletes the pruned tokens from its
own tensors and keeps its own KV cache. Its scores are computed independently of the library:
TTV with its own formula from the sub-modules' inputs/outputs, IGA from the attention
probabilities the next layer's own eager attention returns. The library must agree with it.

It ships with the package so `python -m transprune.doctor` can check an installation against it;
it shares nothing with the runner except `compat.cache_keyword` (the name the cache travels under)
and the adapter's `language_model` (where the decoder sits). A family whose decoder layers are not
Llama-style (other norms, per-layer rotary or masks) gives its own steps (`reference_steps` on its
adapter, written in its own module); `LlamaSteps` is the default.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from . import adapters, compat


def _ttv(x_in, x_out, direction):
    x_in, x_out = x_in[0].double(), x_out[0].double()          # (n, d)
    ratio = torch.linalg.vector_norm(x_out, dim=-1) / torch.linalg.vector_norm(x_in, dim=-1)
    cos = (x_in * x_out).sum(-1) / (torch.linalg.vector_norm(x_in, dim=-1) * torch.linalg.vector_norm(x_out, dim=-1))
    change = 1 - cos if direction == "one_minus_cos" else 1 - cos.abs()
    weights = torch.exp(change - change.max())
    return ratio * weights / weights.sum()


def _additive_causal_mask(n, dtype):
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


class LlamaSteps:
    """How the reference runs one Llama-style decoder layer: one rotary, a causal mask, pre-norms."""

    def __init__(self, language_model):
        self.lm = language_model

    def rotary(self, hidden, positions, number: int):
        return self.lm.rotary_emb(hidden, positions)

    def mask(self, kept, is_visual, number: int, dtype):
        return _additive_causal_mask(len(kept), dtype)

    def layer(self, layer, hidden, cos_sin, mask, cache_kwargs):
        """(output, (attention input, attention output), (MLP input, MLP output))."""
        normed = layer.input_layernorm(hidden)
        attn_out, _ = layer.self_attn(hidden_states=normed, position_embeddings=cos_sin, attention_mask=mask,
                                      **cache_kwargs)
        mid = hidden + attn_out
        normed2 = layer.post_attention_layernorm(mid)
        mlp_out = layer.mlp(normed2)
        return mid + mlp_out, (normed, attn_out), (normed2, mlp_out)


class Reference:
    def __init__(self, model, config, spans=None):
        """`config` must already be resolved for the model's depth (PruneConfig.resolve).

        `spans`: span number of each visual token (a sequence of ints), for layouts where one image
        is not one contiguous run (SmolVLM tiles); None = runs of adjacent tokens with one token id.
        """
        self.model, self.config, self.span_override = model, config, spans
        adapter = adapters.for_model(model)
        self.lm = adapter.language_model(model)
        self.steps = getattr(adapter, "reference_steps", LlamaSteps)(self.lm)
        self.layers = self.lm.layers
        self.stages = dict(zip(config.prune_layers, config.keep_ratios))

    def _embeds(self, inputs):
        captured = {}

        def grab(module, args, kwargs):
            captured["embeds"] = compat.require(kwargs, "inputs_embeds", "The language model")
            captured["position_ids"] = compat.get(kwargs, "position_ids")
            captured["deepstack"] = compat.get(kwargs, "deepstack_visual_embeds") or []   # Qwen3-VL
            raise StopIteration

        handle = self.lm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(**inputs)
        except StopIteration:
            pass
        finally:
            handle.remove()
        self.deepstack = captured["deepstack"]   # per DeepStack layer, (N, d) features of the visual tokens
        return captured["embeds"], captured["position_ids"]

    def _attention_probs(self, layer, hidden, cos_sin):
        """Attention probabilities (H, n, n) of `layer` on `hidden`, from its own eager attention."""
        config = layer.self_attn.config
        saved = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            normed = layer.input_layernorm(hidden)
            _, weights = layer.self_attn(hidden_states=normed, position_embeddings=cos_sin,
                                         attention_mask=_additive_causal_mask(hidden.shape[1], hidden.dtype))
        finally:
            config._attn_implementation = saved
        return weights[0].double()

    @torch.no_grad()
    def run(self, inputs, max_new_tokens=4):
        """Greedy ids, last-position prefill logits and the kept visual indices per stage."""
        config, model = self.config, self.model
        ids = inputs["input_ids"][0]
        is_visual = torch.zeros_like(ids, dtype=torch.bool)
        for name in ("image_token_id", "video_token_id"):
            value = getattr(model.config, name, None)
            if value is not None:
                is_visual |= ids == value
        visual_positions = is_visual.nonzero().flatten()
        num_visual = len(visual_positions)
        # Spans: runs of adjacent visual tokens with one token id (one image or video each).
        span_of, spans = [], []
        for i, position in enumerate(visual_positions.tolist()):
            if i == 0 or position != visual_positions[i - 1] + 1 or ids[position] != ids[visual_positions[i - 1]]:
                spans.append(0)
            spans[-1] += 1
            span_of.append(len(spans) - 1)
        if self.span_override is not None:
            span_of = [int(x) for x in self.span_override]
            spans = [span_of.count(span) for span in range(max(span_of) + 1)]
        hidden, model_positions = self._embeds(inputs)
        deepstack = self.deepstack
        length = hidden.shape[1]
        # M-RoPE models (Qwen2.5-VL) hand the LM 3-D positions (a 4th leading row = text positions).
        mrope = model_positions is not None and model_positions.dim() == 3
        if mrope:
            model_positions = model_positions[-3:]
        kept_seq = torch.arange(length)                  # original positions still in the sequence
        alive = torch.arange(num_visual)                  # alive visual indices
        removed_for_layer = []
        ttv_acc = torch.zeros(num_visual, dtype=torch.float64)
        cache = DynamicCache(config=self.lm.config)
        # The keyword the installed transformers takes the cache under (it was renamed in 5.24).
        cache_keyword = compat.cache_keyword(self.layers[0].self_attn)
        kept_per_stage = []
        alpha = config.effective_alpha

        def positions(removed):
            if mrope:
                return model_positions[:, :, kept_seq]
            if config.positions == "original":
                return kept_seq[None]
            return torch.arange(len(kept_seq))[None]

        removed = 0
        for number, layer in enumerate(self.layers, start=1):
            removed_for_layer.append(removed)
            pos = positions(removed)
            cos_sin = self.steps.rotary(hidden, pos, number)
            mask = self.steps.mask(kept_seq, is_visual, number, hidden.dtype)
            out, (normed, attn_out), (normed2, mlp_out) = self.steps.layer(layer, hidden, cos_sin, mask,
                                                                           {cache_keyword: cache})
            vis_slots = torch.searchsorted(kept_seq, visual_positions[alive])
            if number <= len(deepstack):   # DeepStack: layer `number`'s vision feature, to the visual tokens left
                out[:, vis_slots] += deepstack[number - 1][alive]
            if number in config.effective_accumulation_layers:
                ttv_acc[alive] += (_ttv(normed, attn_out, config.direction) +
                                   _ttv(normed2, mlp_out, config.direction))[vis_slots]
            if number in self.stages:
                ttv = ttv_acc[alive] / (ttv_acc[alive].sum() + 1e-8)
                # IGA: layer p+1's own q/k (and its type's rotary) on layer p's output, causal.
                probs = self._attention_probs(self.layers[number], out, self.steps.rotary(out, pos, number + 1)).mean(0)
                instruction = (~is_visual[kept_seq]).nonzero().flatten()
                instruction = instruction[kept_seq[instruction] > visual_positions[-1]]
                iga = probs[instruction][:, vis_slots].mean(0)
                iga = iga / (iga.sum() + 1e-8)
                score = alpha * ttv + (1 - alpha) * iga
                keep = []
                for span, size in enumerate(spans):
                    members = [i for i, a in enumerate(alive.tolist()) if span_of[a] == span]
                    k = int(size * self.stages[number] + 1e-9)
                    best = torch.topk(score[members], k).indices
                    keep += [members[i] for i in best.tolist()]
                keep = torch.tensor(sorted(keep), dtype=torch.long)
                alive = alive[keep]
                kept_per_stage.append(alive.clone())
                keep_mask = ~is_visual.clone()
                keep_mask[visual_positions[alive]] = True
                survivors = keep_mask[kept_seq]
                out = out[:, survivors]
                kept_seq = kept_seq[survivors]
                removed = num_visual - len(alive)
            hidden = out
        logits = model.lm_head(self.lm.norm(hidden[:, -1:]))[0, -1]
        generated = [int(logits.argmax())]
        step_logits_all = [logits]
        for step in range(max_new_tokens - 1):
            token = torch.tensor([[generated[-1]]])
            hidden = self.lm.embed_tokens(token)
            position = length + step
            for number, layer in enumerate(self.layers, start=1):
                shift = removed_for_layer[number - 1] if config.positions == "compact" else 0
                if mrope:  # text after the last image continues from the largest M-RoPE position
                    step_position = (model_positions.max() + 1 + step).view(1, 1, 1).expand(3, 1, 1)
                else:
                    step_position = torch.tensor([[position - shift]])
                cos_sin = self.steps.rotary(hidden, step_position, number)
                # No mask: one new token sees every key its layer caches (a sliding layer's cache keeps
                # only the last window - 1 of them).
                hidden, _, _ = self.steps.layer(layer, hidden, cos_sin, None, {cache_keyword: cache})
            step_logits = model.lm_head(self.lm.norm(hidden))[0, -1]
            generated.append(int(step_logits.argmax()))
            step_logits_all.append(step_logits)
        return dict(ids=generated, logits=logits, step_logits=torch.stack(step_logits_all), kept=kept_per_stage,
                    cache_lengths=[cache.layers[i].get_seq_length() for i in range(len(self.layers))])
