"""What a prefill's input says about its tokens: the visual tokens of each sample, their spans (one
per image or video) and the instruction. Pure tensor functions; fixed for the prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prompt:
    """What a prefill's input says about its tokens (fixed for the prefill)."""
    is_visual: torch.Tensor                  # (B, L) bool, visual and not padding
    token_valid: torch.Tensor                # (B, L) bool, a real (non-padding) token
    visual_positions: list[torch.Tensor]     # per sample, (N_b,) positions of the visual tokens
    visual_spans: list[torch.Tensor]         # per sample, (N_b,) span number of each visual token
    instruction_positions: list[torch.Tensor]  # per sample, positions of the instruction tokens
    last_position: list[int]                 # per sample, position of the last prompt token

    @property
    def length(self) -> int:
        return self.is_visual.shape[1]


def visual_spans(positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Span number of each visual token: a new span starts after a gap or a change of token id.

    One image or video is one span; each span keeps its own floor(N_span * r) tokens.
    """
    if len(positions) == 0:
        return positions
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = (positions[1:] != positions[:-1] + 1) | (token_ids[1:] != token_ids[:-1])
    return starts.cumsum(0) - 1


def read_prompt(input_ids: torch.Tensor, is_visual: torch.Tensor, attention_mask: torch.Tensor | None) -> Prompt:
    """The Prompt of a batch: visual tokens, their spans, and the instruction (every non-visual
    token after the last visual one; a prompt that ends with its image has none, and its last
    token stands in)."""
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is not None and attention_mask.dim() == 2:
        token_valid = attention_mask.bool().to(device)
    else:
        token_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    positions, spans, instructions, last = [], [], [], []
    for b in range(batch):
        visual = (is_visual[b] & token_valid[b]).nonzero().flatten()
        real = token_valid[b].nonzero().flatten()
        positions.append(visual)
        spans.append(visual_spans(visual, input_ids[b, visual]))
        last.append(int(real[-1]))
        after = real[(real > visual[-1]) & ~is_visual[b, real]] if len(visual) else real[-1:]
        instructions.append(after if len(after) else real[-1:])
    return Prompt(is_visual=is_visual & token_valid, token_valid=token_valid, visual_positions=positions,
                  visual_spans=spans, instruction_positions=instructions, last_position=last)
