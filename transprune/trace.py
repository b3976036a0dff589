"""PruneTrace: what one prefill pruned, for overlays, metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Stage:
    """One pruning stage of one sample.

    `candidates` are the visual-token indices (into the original visual tokens) alive before the
    stage; `ttv`, `iga` and `score` are aligned with them (None where the method has no such
    score). `kept` is the sorted set alive after it.

    A method that inserts tokens (SparseVLM's recycling) gives them indices from N on (N, N+1, ...
    in order of creation, N = PruneTrace.visual_tokens); `inserted` lists this stage's (they are
    in `kept`, and candidates of the next stage) and `sources[i]` the visual indices `inserted[i]`
    was made from. Indices below N are the image's own tokens (`PruneTrace.own`).
    """
    layer: int
    keep_ratio: float
    candidates: torch.Tensor
    kept: torch.Tensor
    score: torch.Tensor
    ttv: torch.Tensor | None = None
    iga: torch.Tensor | None = None
    inserted: torch.Tensor | None = None
    sources: list[torch.Tensor] | None = None

    @classmethod
    def of_scores(cls, layer: int, keep_ratio: float, candidates, scores, kept, insertion=None,
                  first_new: int = 0) -> "Stage":
        """The entry of one sample's stage, on the CPU: a method's StageScores, the candidates `kept`,
        and its Insertion, whose tokens get the visual indices first_new, first_new + 1, ..."""
        plain = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        inserted = sources = None
        if insertion is not None:
            inserted = torch.arange(first_new, first_new + len(insertion.anchors))
            sources = [candidates[s].cpu() for s in insertion.sources]
        kept = kept.cpu() if inserted is None else torch.cat([kept.cpu(), inserted])
        return cls(layer=layer, keep_ratio=keep_ratio, candidates=candidates.cpu(), kept=kept,
                   score=plain(scores.score), ttv=plain(scores.ttv), iga=plain(scores.iga),
                   inserted=inserted, sources=sources)

    def to_dict(self) -> dict:
        def plain(t):
            return None if t is None else t.tolist()
        return dict(layer=self.layer, keep_ratio=self.keep_ratio, candidates=plain(self.candidates),
                    kept=plain(self.kept), score=plain(self.score), ttv=plain(self.ttv), iga=plain(self.iga),
                    inserted=plain(self.inserted),
                    sources=None if self.sources is None else [plain(s) for s in self.sources])


@dataclass
class VisualLayout:
    """Where each visual token sits on the original image or video.

    boxes: (N, 4) float, (x0, y0, x1, y1) in original-image pixels, NaN for tokens without a
    place (LLaVA-NeXT newline tokens); segment: (N,) long index into `segments` (names such as
    "base" or "high-res"); frame: (N,) long frame index (0 for images); image_size: (W, H).
    """
    boxes: torch.Tensor
    segment: torch.Tensor
    segments: list[str]
    image_size: tuple[int, int]
    frame: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return dict(boxes=self.boxes.tolist(), segment=self.segment.tolist(), segments=self.segments,
                    image_size=list(self.image_size),
                    frame=None if self.frame is None else self.frame.tolist())


@dataclass
class PruneTrace:
    """Per sample: the number of visual tokens N, the stages and the per-layer sequence lengths."""
    visual_tokens: int
    stages: list[Stage] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    method: str = "transprune"
    config: dict = field(default_factory=dict)
    layout: VisualLayout | None = None

    @property
    def kept(self) -> torch.Tensor:
        """Visual tokens alive after the last stage (inserted ones included)."""
        return self.stages[-1].kept if self.stages else torch.arange(self.visual_tokens)

    def own(self, indices: torch.Tensor) -> torch.Tensor:
        """The entries of `indices` that are the image's own tokens (< N), for drawing patches."""
        return indices[indices < self.visual_tokens]

    def inserted_in(self, indices: torch.Tensor) -> int:
        """How many entries of `indices` are tokens a stage inserted (SparseVLM's recycled ones)."""
        return int((indices >= self.visual_tokens).sum())

    def to_dict(self) -> dict:
        return dict(visual_tokens=self.visual_tokens, method=self.method, config=self.config,
                    stages=[s.to_dict() for s in self.stages], tokens_per_layer=self.tokens_per_layer,
                    visual_tokens_per_layer=self.visual_tokens_per_layer,
                    layout=None if self.layout is None else self.layout.to_dict())
