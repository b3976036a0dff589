"""From the controls (method, budget, keep ratio, advanced fields) to one PruneConfig.

Budget rules, shown in the UI and docs/app.md:
- Which methods the page offers, under which labels, and how their budgets are built are facts each
  method declares (`PruningStage.ui_choices` / `app_kind` in transprune.methods.base).
- "High" and "Low" are the library's presets (written for 32 layers, scaled to the model's depth).
  TTV-only / IGA-only / Random use TransPrune's schedules ("transprune_schedule"). A peer method
  with a preset of its own name (FastV, PDrop, SparseVLM, DART, ...: "own_preset") uses that
  preset at "High" and half its keep ratios at "Low".
- "Custom" takes r, the share of visual tokens kept after the last stage. TransPrune-style
  schedules keep the preset's three layers and drop, at each stage, the same fraction of what is
  removed in total as the High preset does: r_i = 1 - (1 - r) * f_i with f = (1/7, 3/7, 1), so
  r = 0.125 is exactly High. A peer's preset ratios are scaled so the last one is r (capped at
  1): FastV keeps r in its one stage, PDrop (4r, 2r, r).
- A pre-LLM stage with presets (VisionZip, DivPrune, CDPruner, ...: "pre_llm") prunes before
  the language model: "High" is its preset that keeps the most, "Low" the one that keeps the least
  (VisionZip: 192 and 64 of 576 patches' share, 1/3 and 1/9, the released LLaVA-1.5 settings);
  "Custom" keeps the share r. It has no pruning layers; VisionZip, DivPrune and CDPruner run on
  LLaVA-1.5-family models only.
- "Pruning layers" in the Advanced panel overrides the layers with the model's own 1-indexed
  layer numbers; the keep ratios then come from the budget if the stage count matches, else
  r_i = r_final ** (i / n) for n stages (geometric, e.g. .5/.25/.125 for three stages).
"""

from __future__ import annotations

import re

from transprune import ConfigError, PruneConfig
from transprune import methods as method_registry
from transprune.config import PRESETS

def pre_llm_budgets(stage_name: str) -> dict[str, str]:
    """A pre-LLM stage's High and Low budgets, as preset names: of its presets in transprune.config
    (VisionZip: visionzip-192, -128, -64), the one that keeps the most and the one that keeps the
    least; {} for a stage without presets (the app does not offer it)."""
    presets = sorted((name for name, values in PRESETS.items() if values["method"] == stage_name),
                     key=lambda name: PruneConfig.preset(name).pre_llm_keep)
    return {"High": presets[-1], "Low": presets[0]} if presets else {}


def method_choices() -> dict[str, tuple[str, str]]:
    """Label shown in the UI -> (PruneConfig.method, criterion), from what each registered stage declares
    (`ui_choices`): in-LLM methods in registry order (TransPrune and its criteria first), then pre-LLM
    stages, then the controls (random)."""
    stages = sorted(method_registry.REGISTRY.values(), key=lambda stage: (stage.control, stage.pre_llm))
    return {label: (stage.name, criterion) for stage in stages for label, criterion in stage.ui_choices().items()}


METHODS = method_choices()


def method_kind(method_label: str) -> str:
    """"pre_llm" (VisionZip: before the language model), "own_preset" (a peer with its published
    schedule, FastV / PDrop) or "transprune_schedule" (TransPrune, its criteria, random): the
    stage's declared `app_kind`."""
    return method_registry.stage_class(METHODS[method_label][0]).app_kind()


def _on_transprune_schedule(method: str) -> bool:
    return method_registry.stage_class(method).app_kind() == "transprune_schedule"


BUDGETS = ("High", "Low", "Custom")
POSITION_CHOICES = ("Model default", "compact", "original")
HIGH_FINAL = PRESETS["high"]["keep_ratios"][-1]
# Fraction of the total removal done by each High stage: (1 - r_i) / (1 - r_final).
HIGH_SHAPE = tuple((1 - r) / (1 - HIGH_FINAL) for r in PRESETS["high"]["keep_ratios"])


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """"4, 5, 6" -> (4, 5, 6); empty -> None (use the method's layers)."""
    if text is None or not str(text).strip():
        return None
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"Pruning layers {text!r} must be whole layer numbers separated by commas, "
                          "e.g. 4, 5, 6.") from None


def custom_ratios(method: str, final: float) -> tuple[float, ...]:
    """Keep ratios for a custom final keep ratio, per the rule in the module docstring."""
    if not 0.0 < final <= 1.0:
        raise ConfigError(f"Keep ratio {final} must lie in (0, 1]: it is the share of visual tokens kept.")
    if _on_transprune_schedule(method):
        return tuple(round(1.0 - (1.0 - final) * f, 6) for f in HIGH_SHAPE)
    preset = PRESETS[method]["keep_ratios"]
    return tuple(round(min(1.0, r * final / preset[-1]), 6) for r in preset)


def geometric_ratios(final: float, stages: int) -> tuple[float, ...]:
    return tuple(round(final ** ((i + 1) / stages), 6) for i in range(stages))


def build_config(method_label: str = "TransPrune", budget: str = "High", keep_ratio: float = 0.125,
                 alpha: float = 0.5, layers_text: str = "", positions: str = "Model default",
                 seed: int = 0) -> PruneConfig:
    """The PruneConfig for one run; raises ConfigError with a message the UI can show as is."""
    if method_label not in METHODS:
        raise ConfigError(f"Unknown method {method_label!r}. Choose one of: {', '.join(METHODS)}.")
    if budget not in BUDGETS:
        raise ConfigError(f"Unknown budget {budget!r}. Choose one of: {', '.join(BUDGETS)}.")
    method, criterion = METHODS[method_label]
    if positions not in POSITION_CHOICES:
        raise ConfigError(f"Unknown position mode {positions!r}. Choose one of: {', '.join(POSITION_CHOICES)}.")
    if method in method_registry.PRE_LLM:
        if parse_layers(layers_text) is not None:
            raise ConfigError(f"{method_label} prunes before the language model and has no pruning layers: clear "
                              "\"Pruning layers\" in Advanced, or pick an in-LLM method.")
        if budget != "Custom":
            return PruneConfig.preset(pre_llm_budgets(method)[budget], reference_depth=None, seed=int(seed))
        keep = float(keep_ratio)
        if not 0.0 < keep <= 1.0:
            raise ConfigError(f"Keep ratio {keep} must lie in (0, 1]: it is the share of patches kept.")
        return PruneConfig(method=method, pre_llm_keep=keep, seed=int(seed))
    base = dict(PRESETS[method] if method in PRESETS else PRESETS["high"])   # TransPrune's schedule is "high"
    if budget == "Low":
        ratios = (PRESETS["low"]["keep_ratios"] if _on_transprune_schedule(method)
                  else tuple(r / 2 for r in base["keep_ratios"]))
    elif budget == "Custom":
        ratios = custom_ratios(method, float(keep_ratio))
    else:
        ratios = base["keep_ratios"]
    values = dict(base, keep_ratios=ratios, criterion=criterion, alpha=float(alpha), seed=int(seed),
                  reference_depth=32)
    layers = parse_layers(layers_text)
    if layers is not None:
        if len(layers) != len(ratios):
            ratios = geometric_ratios(ratios[-1], len(layers))
        values.update(prune_layers=layers, keep_ratios=ratios, reference_depth=None,
                      accumulation_layers=None if method_registry.stage_class(method).accumulates_ttv else ())
    values["positions"] = None if positions == "Model default" else positions
    return PruneConfig(**values)


def describe(config: PruneConfig, num_layers: int) -> str:
    """One line naming the resolved schedule, e.g. 'layers 4, 5, 6 keep 87.5% / 62.5% / 12.5%'."""
    resolved = config.resolve(num_layers)
    parts = []
    if resolved.pre_llm is not None:
        label = method_registry.PRE_LLM[resolved.pre_llm].label
        parts.append(f"{label} keeps {resolved.pre_llm_keep:.1%} of the patches before the LLM".replace(".0%", "%"))
    if resolved.prune_layers:
        layers = ", ".join(str(l) for l in resolved.prune_layers)
        method = method_registry.stage_class(resolved.method)
        ratios = " / ".join(f"{r:.1%}".replace(".0%", "%") + (f" {note}" if (note := method.keep_note(r)) else "")
                            for r in resolved.keep_ratios)
        one = len(resolved.prune_layers) == 1
        parts.append(f"layer{'' if one else 's'} {layers} keep{'s' if one else ''} {ratios}")
    return ", then ".join(parts)
