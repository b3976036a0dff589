"""The one place that reads transformers' forward arguments, and the version range they are known for.

transformers does not promise to keep the names of the arguments its models pass around: in 5.24
the KV cache moved from `past_key_values=` to `cache=`, and a runner that looked for the old name
took every decode step for a new prompt and silently changed answers. So every hook of the runner
reads (and rewrites) forward arguments through the functions here:

- the KV cache is found by what it is, the first `transformers.Cache` among the arguments, never
  by its keyword;
- other arguments are looked up under every spelling the supported range uses (`ARGUMENT_NAMES`)
  and written back under the spelling the caller used;
- an argument the runner cannot do without raises `IncompatibleTransformersError`, which names
  the installed version and the tested range and says what to do.

The runner also checks cheap invariants at every decode step (see `Pruner._check_cache`) and raises
the same error when they fail, so an unknown future rename ends in an error, never in a wrong answer.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import transformers
from packaging.version import Version
from transformers import Cache

from .errors import PruningInputError

# The transformers releases CI runs the tests on: the oldest in the library's declared range
# (pyproject.toml) and the one requirements.txt pins. Keep these, pyproject.toml,
# requirements.txt and the README's "Tested with" table in step (tests/test_compat.py checks).
OLDEST_TESTED_TRANSFORMERS = "5.18.0"
PINNED_TRANSFORMERS = "5.24.0"

# Every spelling of a forward argument across the supported range, newest first.
ARGUMENT_NAMES: dict[str, tuple[str, ...]] = {
    "cache": ("cache", "past_key_values"),
    "attention_mask": ("attention_mask",),
    "position_ids": ("position_ids",),
    "position_embeddings": ("position_embeddings",),
    "cache_position": ("cache_position",),
    "hidden_states": ("hidden_states",),
    "input_ids": ("input_ids",),
    "inputs_embeds": ("inputs_embeds",),
    "pixel_values": ("pixel_values",),
    "use_cache": ("use_cache",),
    "video_grid_thw": ("video_grid_thw",),                    # Qwen3-VL: each video's size (its span),
    "mm_encoder_outputs": ("mm_encoder_outputs",),            # or its encoded features (generate passes these)
    "deepstack_visual_embeds": ("deepstack_visual_embeds",),  # Qwen3-VL's language model: DeepStack features
}


def installed_transformers() -> str:
    return transformers.__version__


def tested_range() -> str:
    return f"{OLDEST_TESTED_TRANSFORMERS} to {PINNED_TRANSFORMERS}"


def transformers_is_tested(version: str | None = None) -> bool:
    """True when `version` (default: the installed one) lies inside the range CI tests."""
    release = Version(version or installed_transformers()).release
    return Version(OLDEST_TESTED_TRANSFORMERS).release <= release <= Version(PINNED_TRANSFORMERS).release


class IncompatibleTransformersError(RuntimeError):
    """The installed transformers passes the model's arguments in a way the pruner does not know.

    Raised instead of computing a different answer than the unpruned model's slow reference would.
    """

    def __init__(self, what: str):
        super().__init__(
            f"TransPrune cannot prune safely with transformers {installed_transformers()}: {what} "
            f"TransPrune is tested with transformers {tested_range()}. Install the pinned set "
            f"(`pip install -r requirements.txt`, or `pip install transformers=={PINNED_TRANSFORMERS}`), "
            "run `python -m transprune.doctor` to check, and report the transformers version in an issue.")


# ---------------------------------------------------------------------------- reading arguments
def find_cache(args=(), kwargs: Mapping | None = None) -> Cache | None:
    """The KV cache of a forward call: the first `transformers.Cache` among keyword, then positional
    arguments, whatever the keyword is called (None when the call has none)."""
    for value in (*(kwargs or {}).values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def output_cache(output) -> Cache | None:
    """The KV cache a model returned (`output.cache` in 5.24+, `output.past_key_values` before)."""
    if isinstance(output, Mapping):
        return find_cache(kwargs=output)
    if isinstance(output, (tuple, list)):
        return find_cache(args=tuple(output))
    return None


def cache_length(cache: Cache, layer_index: int) -> int:
    """Tokens cached by decoder layer `layer_index` (0-based)."""
    return int(cache.get_seq_length(layer_index))


def cache_lengths(cache: Cache, num_layers: int) -> list[int]:
    """Tokens cached by each of the first `num_layers` decoder layers."""
    return [cache_length(cache, i) for i in range(num_layers)]


def check_cache_lengths(cache: Cache, prefill_lengths: list[int], steps: int, when: str):
    """Raise unless each layer caches what it kept in the pruned prefill plus `steps` decoded tokens."""
    expected = [length + steps for length in prefill_lengths]
    actual = cache_lengths(cache, len(prefill_lengths))
    if actual != expected:
        raise IncompatibleTransformersError(
            f"{when}, the KV cache holds {actual} tokens per decoder layer where the pruned prefill "
            f"and {steps} decoded tokens leave {expected} (a cache from another run, passed by hand, does "
            "this too: continue with the cache the pruned prefill returned).")


class DecodeGuard:
    """The decode-step invariants of one pruned prefill.

    Every later call that continues its KV cache must be recognised as a decode step, and each
    layer's cache must hold what that layer kept in prefill plus the tokens decoded since. Checked
    before and after each step (a few integer reads); a violation raises instead of decoding with
    the wrong positions or mask.
    """

    def __init__(self, prefill_lengths: list[int]):
        self.prefill_lengths = prefill_lengths

    def check(self, cache: Cache, when: str) -> int:
        """Raise unless `cache` is this prefill's, grown by whole decode steps; returns the steps."""
        # The first layer holds the whole prompt, unless a stage at layer 0 pruned its input.
        steps = cache_length(cache, 0) - self.prefill_lengths[0]
        check_cache_lengths(cache, self.prefill_lengths, steps, when)
        return steps

    @staticmethod
    def check_dynamic(cache: Cache | None):
        if cache is not None and "Static" in type(cache).__name__:
            raise PruningInputError("TransPrune needs a dynamic KV cache (pruned layers cache fewer tokens); "
                                    "do not use cache_implementation='static' or a StaticCache.")

    @staticmethod
    def check_unpruned(cache: Cache, num_layers: int, error: Exception):
        """Raise `error` unless every layer caches as many tokens (no pruned prefill wrote `cache`)."""
        if len(set(cache_lengths(cache, num_layers))) > 1:
            raise error

    @staticmethod
    def check_unseen_continuation(after_pruned_prefill: bool, adds_visual: bool):
        """For a call that continues a KV cache the pruner cannot find: refuse it after a pruned
        prefill (it would decode with the unpruned positions and mask over the pruned cache) and
        when it brings a new image or video."""
        if after_pruned_prefill:
            raise IncompatibleTransformersError(
                "a decode step passed the KV cache in a way the pruner does not recognise, so it would "
                "run with the unpruned positions and mask over the pruned cache.")
        if adds_visual:
            raise PruningInputError("Continuing a KV cache with a new image or video is not supported: "
                                    "start a new generation from the whole prompt.")


def continues_cache(kwargs: Mapping, input_ids) -> bool:
    """True for a model call that continues a KV cache, whether or not the cache can be found.

    A new prompt starts at position 0 and its attention mask is as long as its input; a call whose
    position ids start later, or whose 2-D mask also covers cached tokens, continues a cache even
    when that cache travels under a name or type we do not know.
    """
    mask, position_ids, embeds = get(kwargs, "attention_mask"), get(kwargs, "position_ids"), get(kwargs, "inputs_embeds")
    length = input_ids.shape[1] if input_ids is not None else embeds.shape[1] if embeds is not None else None
    longer_mask = mask is not None and mask.dim() == 2 and length is not None and mask.shape[1] > length
    later_positions = isinstance(position_ids, torch.Tensor) and position_ids.numel() > 0 and int(position_ids.min()) > 0
    return bool(longer_mask or later_positions)


def get(kwargs: Mapping, name: str, default=None):
    """Keyword argument `name` under any spelling of the supported range."""
    for spelling in ARGUMENT_NAMES[name]:
        if spelling in kwargs:
            return kwargs[spelling]
    return default


_MISSING = object()


def require(kwargs: Mapping, name: str, where: str):
    """Like `get`, but a missing argument means the installed transformers passes it differently."""
    value = get(kwargs, name, _MISSING)
    if value is not _MISSING:
        return value
    raise IncompatibleTransformersError(
        f"{where} received no `{name}` argument (it got: {', '.join(sorted(kwargs)) or 'none'}).")


def hidden_states(args, kwargs: Mapping):
    """The hidden states a decoder layer, attention or MLP module was called with."""
    if args:
        return args[0]
    return require(kwargs, "hidden_states", "A decoder module")


def replace(kwargs: Mapping, **updates) -> dict:
    """A copy of `kwargs` with `updates` (canonical names) written under the caller's own spelling."""
    result = dict(kwargs)
    for name, value in updates.items():
        spelling = next((s for s in ARGUMENT_NAMES.get(name, (name,)) if s in kwargs), name)
        result[spelling] = value
    return result


def cache_keyword(module) -> str:
    """The keyword `module.forward` takes the KV cache under in the installed transformers (for code
    that calls transformers modules itself, e.g. the tests' slow reference and the shapes trainer)."""
    parameters = inspect.signature(module.forward).parameters
    for spelling in ARGUMENT_NAMES["cache"]:
        if spelling in parameters:
            return spelling
    raise IncompatibleTransformersError(
        f"{type(module).__name__}.forward takes no KV cache argument under a known name "
        f"({', '.join(ARGUMENT_NAMES['cache'])}).")
