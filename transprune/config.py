"""PruneConfig: which method prunes, where, and how much.

Schedules are written in 1-indexed decoder-layer numbers. Presets are written for a 32-layer
language model (the LLaVA-1.5-7B depth the paper uses) and are scaled to the model's depth by
proportion when the pruner is attached; see `scale_layers`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from . import methods as registry   # method names are validated against the method registry

CRITERIA = ("transprune", "ttv", "iga")
DIRECTIONS = ("one_minus_cos", "one_minus_abs_cos")
POSITIONS = ("compact", "original")

REFERENCE_DEPTH = 32

# Every registered stage's presets (`PruningStage.presets`, declared in its method module), by name:
# field overrides written for a 32-layer language model, `method` filled in. The registry's own
# dict, so a stage registered later brings its presets along.
PRESETS: dict[str, dict] = registry.PRESETS


class ConfigError(ValueError):
    """A PruneConfig that cannot run; the message says what to change."""


def _pre_llm_presets() -> list[str]:
    """The presets that run a pre-LLM stage alone (the ones a stack starts with)."""
    return [name for name, values in PRESETS.items() if values["method"] in registry.PRE_LLM]


def _preset_values(key: str, name: str) -> dict:
    """The field values of preset `key` (`name` is what the caller asked for, for the error)."""
    if key in PRESETS:
        return dict(PRESETS[key])
    if key in registry.PRE_LLM:
        return dict(method=key)
    raise ConfigError(f"Unknown preset {name!r}. Choose one of: {', '.join(PRESETS)} (or stack "
                      "'<pre-LLM preset>+<in-LLM preset>', e.g. 'visionzip-128+high').")


def upgrade_saved_config(values: dict) -> dict:
    """A saved `PruneConfig.to_dict()` in today's field names.

    Configs saved before pre-LLM stages were named generically hold `visionzip_keep` (a share, None
    = no VisionZip) instead of `pre_llm` / `pre_llm_keep`: the bench and eval JSON under docs/ and
    the shipped transprune/assets/shapes-llava/eval.json, which the app still quotes.
    """
    values = dict(values)
    if "visionzip_keep" in values:
        keep = values.pop("visionzip_keep")
        if keep is not None:
            values.update(pre_llm="visionzip", pre_llm_keep=keep)
    return values


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scale_layers(layers, num_layers: int, reference_depth: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """Map 1-indexed layer numbers written for `reference_depth` layers onto `num_layers`.

    Rule: l' = round_half_up(l * num_layers / reference_depth), at least 1 and at least one more
    than the previous scaled layer, so a schedule stays strictly increasing on shallow models.
    Example: (7, 9, 12) on 16 layers -> (4, 5, 6); on 12 layers -> (3, 4, 5).
    Layer 0 (a stage before the first decoder layer, on its input) stays 0.
    """
    scaled, previous = [], 0
    for layer in layers:
        if layer == 0:
            scaled.append(0)
            continue
        value = max(1, _round_half_up(layer * num_layers / reference_depth), previous + 1)
        scaled.append(value)
        previous = value
    return tuple(scaled)


@dataclass(frozen=True)
class PruneConfig:
    method: str = field(default="transprune", metadata={"help": f"one of {registry.names()}"})
    prune_layers: tuple[int, ...] = field(
        default=(7, 9, 12), metadata={"help": "1-indexed layers on whose output pruning happens, increasing"})
    keep_ratios: tuple[float, ...] = field(
        default=(0.875, 0.625, 0.125),
        metadata={"help": "share of the original visual tokens kept after each stage, in (0, 1], non-increasing"})
    accumulation_layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "layers whose TTV is accumulated; None = first..last prune layer"})
    alpha: float = field(default=0.5, metadata={"help": "score = alpha*TTV + (1-alpha)*IGA"})
    criterion: str = field(default="transprune", metadata={"help": f"one of {CRITERIA}"})
    direction: str = field(default="one_minus_cos", metadata={"help": f"one of {DIRECTIONS}"})
    positions: str | None = field(
        default=None, metadata={"help": f"one of {POSITIONS}; None = the model family's default"})
    reference_depth: int | None = field(
        default=None, metadata={"help": "if set, layers are written for this depth and scaled to the model"})
    seed: int = field(default=0, metadata={"help": "seed of the random method"})
    pre_llm: str | None = field(
        default=None,
        metadata={"help": f"a stage before the language model, one of {tuple(registry.PRE_LLM)}; None = none. "
                          "Stacks with any in-LLM method; method=<that stage> runs it alone"})
    pre_llm_keep: float | None = field(
        default=None,
        metadata={"help": "share of each image's patches the pre-LLM stage keeps, in (0, 1]; "
                          "None = the stage's default"})

    def __post_init__(self):
        if self.method not in registry.REGISTRY:
            raise ConfigError(f"Unknown method {self.method!r}. Choose one of: {', '.join(registry.names())}.")
        if self._stage.pre_llm:
            # A pre-LLM stage alone (method="visionzip"): it is the config's pre-LLM stage, and there
            # are no in-LLM stages, whatever the schedule fields say.
            if self.pre_llm not in (None, self.method):
                raise ConfigError(f"method={self.method!r} is itself a pre-LLM stage, so pre_llm={self.pre_llm!r} "
                                  "cannot run too: leave pre_llm unset, or stack it on an in-LLM method.")
            object.__setattr__(self, "pre_llm", self.method)
            object.__setattr__(self, "prune_layers", ())
            object.__setattr__(self, "keep_ratios", ())
            object.__setattr__(self, "accumulation_layers", ())
        # Accept lists from JSON / the CLI, store tuples so the config stays hashable.
        object.__setattr__(self, "prune_layers", tuple(int(x) for x in self.prune_layers))
        object.__setattr__(self, "keep_ratios", tuple(float(x) for x in self.keep_ratios))
        if self.accumulation_layers is not None:
            object.__setattr__(self, "accumulation_layers", tuple(int(x) for x in self.accumulation_layers))
        self._check_names()
        if self.pre_llm is not None and self.pre_llm_keep is None:
            object.__setattr__(self, "pre_llm_keep", registry.PRE_LLM[self.pre_llm].default_keep)
        self._check_pre_llm_keep()
        self._check_schedule()

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str, **overrides) -> "PruneConfig":
        """A named preset of PRESETS ("high", "low", "fastv", "visionzip-64", ...), written for 32
        layers; a pre-LLM stage's own name ("visionzip") is that stage alone at its default share.
        "<pre-LLM preset>+<in-LLM preset>" stacks the two, e.g. "visionzip-128+high"."""
        key = name.lower().replace(" ", "")
        pre_part, plus, key = key.rpartition("+")
        values = dict(_preset_values(key, name), reference_depth=REFERENCE_DEPTH)
        if plus:
            pre = cls(**_preset_values(pre_part, name))
            if pre.method not in registry.PRE_LLM:
                raise ConfigError(f"Cannot stack {name!r}: write a pre-LLM preset ({', '.join(_pre_llm_presets())}), "
                                  "'+', then an in-LLM preset, e.g. 'visionzip-128+high'.")
            if values["method"] in registry.PRE_LLM:
                raise ConfigError(f"{name!r} stacks two pre-LLM stages; put an in-LLM preset after '+'.")
            values.update(pre_llm=pre.pre_llm, pre_llm_keep=pre.pre_llm_keep)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown PruneConfig field(s) {sorted(unknown)}.")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict) -> "PruneConfig":
        """The config of a `to_dict()`, also one saved before today's field names (`upgrade_saved_config`)."""
        return cls(**upgrade_saved_config(values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived values
    @property
    def _stage(self) -> type[registry.PruningStage]:
        return registry.REGISTRY[self.method]

    @property
    def effective_alpha(self) -> float:
        return {"transprune": self.alpha, "ttv": 1.0, "iga": 0.0}[self.criterion]

    @property
    def effective_accumulation_layers(self) -> tuple[int, ...]:
        if self.accumulation_layers is not None:
            return self.accumulation_layers
        if not self._stage.accumulates_ttv:
            return ()
        return tuple(range(self.prune_layers[0], self.prune_layers[-1] + 1))

    def resolve(self, num_layers: int, default_positions: str = "compact") -> "PruneConfig":
        """The concrete schedule for a model with `num_layers` decoder layers, validated against it."""
        values = self.to_dict()
        if self.reference_depth is not None and self.reference_depth != num_layers and self.prune_layers:
            prune = scale_layers(self.prune_layers, num_layers, self.reference_depth)
            window = tuple(range(self.prune_layers[0], self.prune_layers[-1] + 1))
            if self.accumulation_layers is None or self.accumulation_layers == window:
                # The usual "first..last prune layer" window stays that window at any depth.
                accumulate = self.accumulation_layers and tuple(range(prune[0], prune[-1] + 1))
            else:
                scaled = scale_layers(sorted(self.accumulation_layers), num_layers, self.reference_depth)
                accumulate = tuple(sorted({min(l, prune[-1]) for l in scaled}))
            values.update(prune_layers=prune, accumulation_layers=accumulate)
        values["reference_depth"] = None
        if values["positions"] is None:
            values["positions"] = default_positions
        resolved = PruneConfig(**values)
        resolved.check_depth(num_layers)
        return resolved

    # ------------------------------------------------------------------ validation
    def _check_names(self):
        for name, value, allowed in (("method", self.method, registry.names()), ("criterion", self.criterion, CRITERIA),
                                     ("direction", self.direction, DIRECTIONS)):
            if value not in allowed:
                raise ConfigError(f"Unknown {name} {value!r}. Choose one of: {', '.join(allowed)}.")
        if self.positions is not None and self.positions not in POSITIONS:
            raise ConfigError(f"Unknown positions {self.positions!r}. Choose one of: {', '.join(POSITIONS)}.")
        if self.pre_llm is not None and self.pre_llm not in registry.PRE_LLM:
            where = (f" ({self.pre_llm!r} prunes inside the language model: give it as method)"
                     if self.pre_llm in registry.METHODS else "")
            raise ConfigError(f"Unknown pre-LLM stage {self.pre_llm!r}{where}. "
                              f"Choose one of: {', '.join(registry.PRE_LLM)}.")

    def _check_pre_llm_keep(self):
        keep = self.pre_llm_keep
        if self.pre_llm is None:
            if keep is not None:
                raise ConfigError(f"pre_llm_keep {keep} is set but pre_llm is not: name the stage that keeps it, "
                                  f"one of: {', '.join(registry.PRE_LLM)}.")
            return
        label = registry.PRE_LLM[self.pre_llm].label
        if keep is None:
            raise ConfigError(f"{label} has no default share: give pre_llm_keep, the share of each image's "
                              "patches it keeps, in (0, 1].")
        if not (0.0 < keep <= 1.0):
            raise ConfigError(f"pre_llm_keep {keep} must lie in (0, 1]: it is the share of each image's "
                              f"patches {label} keeps before the language model.")

    def _check_schedule(self):
        layers, ratios = self.prune_layers, self.keep_ratios
        if self._stage.pre_llm:
            return
        if not layers:
            raise ConfigError("prune_layers is empty: give at least one pruning layer, e.g. (7, 9, 12).")
        if len(layers) != len(ratios):
            raise ConfigError(f"prune_layers has {len(layers)} entries but keep_ratios has {len(ratios)}; "
                              "give one keep ratio per pruning layer.")
        if any(l < 0 for l in layers):
            raise ConfigError(f"prune_layers {layers} must be 1-indexed layer numbers (>= 1), or 0 for a stage "
                              "before the first decoder layer.")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ConfigError(f"prune_layers {layers} must be strictly increasing.")
        if any(not (0.0 < r <= 1.0) for r in ratios):
            raise ConfigError(f"keep_ratios {ratios} must each lie in (0, 1].")
        if any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ConfigError(f"keep_ratios {ratios} must not increase from one stage to the next.")
        if not (0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"alpha {self.alpha} must lie in [0, 1].")
        accumulate = self.effective_accumulation_layers
        if any(l < 1 for l in accumulate):
            raise ConfigError(f"accumulation_layers {accumulate} must be 1-indexed layer numbers (>= 1).")
        if accumulate and max(accumulate) > layers[-1]:
            raise ConfigError(f"accumulation_layers {accumulate} reach past the last pruning layer {layers[-1]}; "
                              "TTV recorded after the last stage is never used.")
        problem = self._stage.check_config(self)
        if problem:
            raise ConfigError(problem)
        if self.reference_depth is not None and self.reference_depth < 1:
            raise ConfigError(f"reference_depth {self.reference_depth} must be a positive layer count.")

    def check_depth(self, num_layers: int):
        """Raise if the schedule does not fit a model with `num_layers` decoder layers."""
        if self.prune_layers and self.prune_layers[-1] >= num_layers:
            raise ConfigError(
                f"Pruning layer {self.prune_layers[-1]} does not fit a model with {num_layers} decoder layers: "
                f"pruning layers must be below {num_layers} so that a later layer sees the pruned sequence.")
        if self.positions not in POSITIONS:
            raise ConfigError(f"Unknown positions {self.positions!r}. Choose one of: {', '.join(POSITIONS)}.")


def as_config(config, allow_none: bool = False) -> "PruneConfig | None":
    """`config` as a PruneConfig: a PruneConfig as is, a preset name through `PruneConfig.preset`,
    None kept where `allow_none` (no pruning). Anything else is a TypeError that says what to pass."""
    if isinstance(config, PruneConfig):
        return config
    if isinstance(config, str):
        return PruneConfig.preset(config)
    if config is None and allow_none:
        return None
    accepted = "a transprune.PruneConfig or a preset name such as 'high'" + (" (or None for no pruning)"
                                                                             if allow_none else "")
    hint = " For a dict saved with to_dict(), pass PruneConfig.from_dict(it)." if isinstance(config, dict) else ""
    raise TypeError(f"config must be {accepted}, got {type(config).__name__} {config!r:.60}.{hint}")
