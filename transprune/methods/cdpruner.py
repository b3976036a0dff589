"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967): before the language model, keep the
subset of each image's projected visual tokens that a determinantal point process (DPP)
conditioned on the instruction finds most probable.

What the authors' released LLaVA code (github.com/Theia-4869/CDPruner, `llava_arch.py`
`encode_images`) does, and what this module does:

- similarity: S = cosine similarity of the projected tokens (the projector's output), float32;
- relevance of each token to the instruction: r_i = mean over the text of -cos(v_i, t_j), then
  min-max normalised, r = (r - min r + 1e-6) / (max r - min r). The sign is the release's: it
  negates the similarity before averaging;
- kernel L = diag(r) S diag(r) (the release's optional exp(theta-scaled) relevance is commented out;
  not used);
- greedy MAP inference of the DPP, the release's incremental Cholesky form: d_i^2 = L_ii; T times
  pick j = argmax d^2, e = (L_j - sum_t c_t[j] c_t) / sqrt(d_j^2), append e to c, d^2 -= e^2,
  d_j^2 = -inf. The T picks, sorted, go to the LLM in their original order ("compact" positions,
  as released).

Where our setting differs from the release, and what we chose:
- the release's relevance reads CLIP's *own* embeddings: the vision tower's post-layernorm and
  visual projection of the selected features (v), against CLIP's text tower on the raw question
  (t). A Hugging Face LLaVA checkpoint ships neither CLIP's visual projection nor its text tower, so
  here v = the projected tokens and t = the language model's input embeddings of the instruction
  tokens (the text after the image, chat-template suffix included): both then live in the language
  model's embedding space. This is our adaptation (the release has no code for a model without CLIP's
  text tower); the same formula and sign are kept;
- min and max are taken per image (the release takes them over the whole batch of images it
  encodes at once, which is the same for its one image per prompt).

Trace: `Stage.score` is the relevance r of each token (what conditions the DPP).
Presets "cdpruner-64|128|192" (T of LLaVA-1.5's 576) and stacks such as "cdpruner-128+high".
Families: see `transprune.methods.preselect`.
"""

from __future__ import annotations

import torch

from .preselect import SubsetStage


def relevance(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(N,) the release's instruction relevance: mean_j -cos(v_i, t_j), min-max normalised (+1e-6)."""
    v = visual.float() / visual.float().norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    r = (-(v @ t.T)).mean(dim=-1)
    return (r - r.min() + 1e-6) / (r.max() - r.min())


def conditional_kernel(visual: torch.Tensor, relevance_scores: torch.Tensor) -> torch.Tensor:
    """(N, N) L = diag(r) S diag(r), S the cosine similarity of the visual tokens (float32)."""
    unit = visual.float() / visual.float().norm(dim=-1, keepdim=True)
    return relevance_scores[:, None] * (unit @ unit.T) * relevance_scores[None, :]


def greedy_map(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """(keep,) distinct indices chosen by the fast greedy MAP inference of a DPP with kernel L, in order.

    Each step adds the unchosen token with the largest marginal gain d_i^2 (the released update).
    Once the gains run out (the rest lie in the span of the chosen tokens: repeated or uniform patches),
    the release's update divides by ~0 and its NaN gains pick the same token again and again; here a
    token is never chosen twice, and a step whose gain is spent adds no factor (the rest then come in
    the order of their remaining gains, ties by index), so exactly `keep` distinct tokens are kept.
    """
    count = kernel.shape[0]
    factors = kernel.new_zeros(keep, count)           # c_t, one row per pick
    gains = kernel.diagonal().clone()                 # d_i^2: the marginal gain of adding token i
    spent = 1e-6 * float(gains.abs().max().clamp_min(1e-30))   # below this a gain is rounding noise
    chosen = torch.zeros(count, dtype=torch.bool, device=kernel.device)
    order = []
    for step in range(keep):
        pick = int(gains.masked_fill(chosen, float("-inf")).argmax())
        order.append(pick)
        chosen[pick] = True
        if gains[pick] > spent:
            row = (kernel[pick] - factors[:step, pick] @ factors[:step]) / gains[pick].sqrt()
            factors[step] = row
            gains = gains - row.square()
    return torch.tensor(order, dtype=torch.long, device=kernel.device)


class CDPruner(SubsetStage):
    """Instruction-conditioned DPP over each image's projected tokens (see the module docstring)."""
    name = "cdpruner"
    label = "CDPruner"
    first_layer_twin = "cdpruner_first_layer"   # other families: the same choice at layer 0 (methods.first_layer)
    # As DivPrune's: 64 / 128 / 192 of LLaVA-1.5's 576 tokens; stack e.g. "cdpruner-128+high".
    presets = {"cdpruner-192": dict(pre_llm_keep=192 / 576), "cdpruner-128": dict(pre_llm_keep=128 / 576),
               "cdpruner-64": dict(pre_llm_keep=64 / 576)}
    uses_instruction = True

    def choose(self, features, instruction, keep):
        scores = relevance(features, instruction)
        order = greedy_map(conditional_kernel(features, scores), keep)
        return order.sort().values, scores
