"""The measuring core of `python -m transprune.bench`, which the app's "speed at real size" shares.

Random-weight LLaVA models in a language-model shape (`build_shape`, `build`), the benchmark's
method entries (`MethodSpec`, `parse_method`), the analytic figures of one entry (`analytic`) and
the fair, alternating timing of several entries on one input (`measure`). The CLI (arguments,
tables, plots) stays in `transprune.bench`; the method and the numbers are described there.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from . import adapters, flops, tiny
from .config import ConfigError, PruneConfig
from .measure import ModuleTimer, TokenClock, peak_memory_mb, reset_peak_memory, sync
from .runner import apply

TINY_ARCH = "tiny-llava"
LLAVA_VOCAB = 32064          # llava-hf/llava-1.5-*-hf text vocabulary (32000 + image/pad extras)
LLAVA_IMAGE_TOKEN = 32000


# ---------------------------------------------------------------------------------------- methods
class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says what to change (`main` exits with it)."""


@dataclass(frozen=True)
class MethodSpec:
    """One benchmark entry: a name and its PruneConfig (None = the unpruned baseline).

    `text_only` marks the fixed-cost probe (`FIXED_COST_PROBE`), not a method: the same prompt with
    its visual tokens taken out and no pixels, so the language model sees none."""
    name: str
    config: PruneConfig | None = None
    text_only: bool = False

    @property
    def pruned(self) -> bool:
        return self.config is not None

    @property
    def pre_llm(self) -> bool:
        """True when a stage before the language model (VisionZip) changes the tokens it sees."""
        return self.config is not None and self.config.pre_llm is not None


FIXED_COST_PROBE = MethodSpec("no visual tokens", text_only=True)


def parse_method(name: str) -> MethodSpec:
    """"baseline", a preset name ("high", "visionzip-64", ...) or a stack ("visionzip-128+high")."""
    key = name.strip().lower()
    if key == "baseline":
        return MethodSpec(name=key)
    try:
        return MethodSpec(name=key, config=PruneConfig.preset(key))
    except ConfigError as error:
        raise BenchError(f"Unknown method {name!r}: {error} Or use baseline.") from None


# ---------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class BenchModel:
    model: torch.nn.Module
    inputs: dict
    hidden: int
    intermediate: int
    layers: int
    heads: int
    visual_tokens: int
    text_tokens: int
    description: str

    def sequence_tflops(self, visual_per_layer) -> float:
        """Analytic TFLOPs of a prefill whose layers see `visual_per_layer` visual tokens each, plus the text."""
        return flops.tflops([n + self.text_tokens for n in visual_per_layer], self.hidden, self.intermediate)

    def baseline_tflops(self) -> float:
        """Analytic TFLOPs of the unpruned prefill: every layer sees every visual token."""
        return self.sequence_tflops([self.visual_tokens] * self.layers)


def _heads_for(hidden: int) -> int:
    for head_dim in (128, 64, 32, 16, 8):
        if hidden % head_dim == 0:
            return hidden // head_dim
    return 1


def random_llava(shape: flops.Shape, width_scale: float = 1.0, layers: int | None = None,
                 attn_implementation: str = "sdpa", seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """A random LlavaForConditionalGeneration whose language model has `shape` (scaled).

    The CLIP tower is tiny (2 layers, width 64) but sized to give shape.visual_tokens patches.
    Built directly on `device` in `dtype` (a full-size 7B in float32 on the host would need 28 GB).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    side = int(round(shape.visual_tokens ** 0.5))
    if side * side != shape.visual_tokens:
        raise BenchError(f"The random-weight bench builds LLaVA-1.5-style models (a square patch grid); "
                         f"N={shape.visual_tokens} is not square. Use --flops-only or --checkpoint for this arch.")
    hidden = max(8, int(round(shape.hidden * width_scale)))
    heads = _heads_for(hidden)
    text = LlamaConfig(vocab_size=LLAVA_VOCAB, hidden_size=hidden,
                       intermediate_size=max(8, int(round(shape.intermediate * width_scale))),
                       num_hidden_layers=layers or shape.layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=side * 14, patch_size=14)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=LLAVA_IMAGE_TOKEN,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=shape.visual_tokens)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    with tiny.BUILD_LOCK, torch.device(device):   # the global generator, shared with other builders
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def synthetic_inputs(model, text_before: int, text_after: int, seed: int = 0) -> dict:
    """input_ids = [bos] + text_before words + N image tokens + text_after words, random pixels.

    LLaVA-1.5's system prompt is ~35 tokens and a short question plus "ASSISTANT:" ~25.
    """
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    image_token = config.image_token_id
    low = min(10, vocab - 1)

    def words(count):
        ids = torch.randint(low, vocab, (count,), generator=generator)
        return torch.where(ids == image_token, torch.full_like(ids, low), ids)

    side = config.vision_config.image_size
    n_visual = (side // config.vision_config.patch_size) ** 2
    bos = config.text_config.bos_token_id or 1
    ids = torch.cat([torch.tensor([bos]), words(text_before), torch.full((n_visual,), image_token),
                     words(text_after)])[None]
    pixels = torch.randn(1, 3, side, side, generator=generator)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def _to_device(inputs: dict, device, dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


def build_shape(shape: flops.Shape, description: str, width_scale: float = 1.0, layers: int | None = None,
                device: str = "cpu", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                text_before: int = 35, text_after: int = 25, seed: int = 0) -> BenchModel:
    """A random-weight model of a language-model `shape` (square N) with a LLaVA-1.5 prompt around it."""
    model = random_llava(shape, width_scale, layers, attn_implementation, seed, device, dtype)
    model = model.to(device=device, dtype=dtype)
    inputs = _to_device(synthetic_inputs(model, text_before, text_after, seed), device, dtype)
    return _bench_model(model, inputs, f"{description}-shaped, random weights, width x{width_scale:g}")


def _bench_model(model, inputs: dict, description: str) -> BenchModel:
    text = model.config.text_config
    n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    return BenchModel(model=model, inputs=inputs, hidden=text.hidden_size, intermediate=text.intermediate_size,
                      layers=text.num_hidden_layers, heads=text.num_attention_heads, visual_tokens=n_visual,
                      text_tokens=inputs["input_ids"].shape[1] - n_visual, description=description)


def build(arch: str, width_scale: float = 1.0, layers: int | None = None, checkpoint: str | None = None,
          device: str = "cpu", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
          text_before: int = 35, text_after: int = 25, seed: int = 0) -> BenchModel:
    if checkpoint:
        from PIL import Image

        from . import models
        loaded = models.load(checkpoint, device=device, dtype=dtype, attn_implementation=attn_implementation)
        model = loaded.model
        image = Image.new("RGB", (640, 480), (120, 160, 200))
        inputs = loaded.prepare(image, "What is shown in this image? Describe it in detail.")
        description = f"{checkpoint} (real weights)"
    else:
        if arch == TINY_ARCH:
            model, _ = adapters.by_family("llava").build_tiny(attn_implementation=attn_implementation, seed=seed)
            model.generation_config.eos_token_id = None
            description = "tiny-llava (random weights)"
        elif arch in flops.ARCHITECTURES:
            return build_shape(flops.ARCHITECTURES[arch], arch, width_scale, layers, device, dtype,
                               attn_implementation, text_before, text_after, seed)
        else:
            raise BenchError(f"Unknown --arch {arch!r}. Choose one of: {', '.join([*flops.ARCHITECTURES, TINY_ARCH])}.")
        model = model.to(device=device, dtype=dtype)
        inputs = _to_device(synthetic_inputs(model, text_before, text_after, seed), device, dtype)
    return _bench_model(model, inputs, description)


# ---------------------------------------------------------------------------------------- analytic
def visual_schedule(spec: MethodSpec, visual_tokens: int, layers: int) -> list[int]:
    """Visual tokens each layer sees under `spec` (VisionZip first changes N)."""
    return flops.schedule_tokens(spec.config, visual_tokens, layers)


def analytic(spec: MethodSpec, arch_shape: flops.Shape, bench: BenchModel, baseline_full: float | None) -> dict:
    arch_visual = visual_schedule(spec, arch_shape.visual_tokens, arch_shape.layers)
    bench_visual = visual_schedule(spec, bench.visual_tokens, bench.layers)
    bench_full = bench.sequence_tflops(bench_visual)
    figures = dict(
        tflops=flops.tflops(arch_visual, arch_shape.hidden, arch_shape.intermediate),
        tflops_full_sequence=flops.tflops([n + bench.text_tokens for n in arch_visual], arch_shape.hidden,
                                          arch_shape.intermediate),
        bench_tflops_full_sequence=bench_full,
        mean_visual_tokens=sum(bench_visual) / len(bench_visual),
        final_visual_tokens=bench_visual[-1],
    )
    figures["bound"] = (baseline_full / bench_full) if baseline_full else 1.0
    return figures


def bound_with_fixed_cost(baseline_ms: float, zero_visual_ms: float, baseline_tflops: float,
                          zero_visual_tflops: float, method_tflops: float) -> float | None:
    """The analytic bound with a measured fixed cost: the most a method can gain if a prefill took
    `zero_visual_ms` (what it costs when the language model sees no visual tokens: the vision tower,
    the text tokens, and everything that does not grow with the sequence, such as reading the
    weights) plus a rate per TFLOP fitted through the baseline. With no fixed cost (zero_visual_ms
    proportional to its FLOPs) this is the plain analytic bound, baseline_tflops / method_tflops.
    None when the measurement cannot support a rate (the probe was not faster than the baseline)."""
    if baseline_ms <= zero_visual_ms or baseline_tflops <= zero_visual_tflops:
        return None
    rate = (baseline_ms - zero_visual_ms) / (baseline_tflops - zero_visual_tflops)
    return baseline_ms / (zero_visual_ms + rate * (method_tflops - zero_visual_tflops))


def text_only_inputs(model, inputs: dict) -> dict:
    """`inputs` with every visual token taken out of the prompt and no pixels (one prompt only)."""
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise BenchError("The fixed-cost probe times one prompt; the bench's inputs hold "
                         f"{ids.shape[0]}. Pass a single prompt.")
    keep = ~adapters.for_model(model).visual_mask(model, ids)[0]
    text = dict(input_ids=ids[:, keep])
    if "attention_mask" in inputs:
        text["attention_mask"] = inputs["attention_mask"][:, keep]
    return text


# ---------------------------------------------------------------------------------------- measuring
def timed_ms(fn, device: torch.device):
    """(result, milliseconds): CUDA events on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize(device)
        return result, start.elapsed_time(end)
    begin = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - begin) * 1e3


class _Attached:
    """Context: the pruner of one MethodSpec (attached outside timing) and its inputs (VisionZip
    rewrites them, inside the timed prefill, as it would in use)."""

    def __init__(self, model, spec: MethodSpec, inputs: dict):
        self.model, self.spec, self.inputs = model, spec, inputs
        self.pruner = None

    def __enter__(self):
        if self.spec.config is not None:
            self.pruner = apply(self.model, self.spec.config)
        if self.spec.text_only:
            self.inputs = text_only_inputs(self.model, self.inputs)
        return self

    def prepare(self) -> dict:
        return self.pruner.prepare_inputs(self.inputs) if self.pruner is not None else self.inputs

    def prefill(self):
        return self.model(**self.prepare(), use_cache=True, logits_to_keep=1)

    def __exit__(self, *exc):
        if self.pruner is not None:
            self.pruner.remove()
        return False


def decode_tokens_per_s(model, attached: _Attached, new_tokens: int, device) -> float | None:
    clock = TokenClock(device)
    model.generate(**attached.prepare(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   streamer=clock)
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    if not gaps:
        return None
    # The median step, not the mean: one step stalled by another process would otherwise decide it.
    return 1.0 / statistics.median(gaps)


class _ScoringClock:
    """Times the scoring of one attached method (instrumented runs only) through the pruner's
    public timing hook (`Pruner.timer`): TTV, the scores with their side passes, and a pre-LLM
    stage's own scoring (VisionZip's CLS attention and merge)."""

    def __init__(self, attached: _Attached, device):
        self.device, self.total, self.pruner = device, 0.0, attached.pruner
        if self.pruner is not None:
            self.pruner.timer = self._span

    @contextlib.contextmanager
    def _span(self, name):
        sync(self.device)
        begin = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.total += time.perf_counter() - begin

    def remove(self):
        if self.pruner is not None:
            self.pruner.timer = None


class _ReuseClock:
    """Times the key projections a pruner avoided (the layer after a stage took the survivors' keys
    from the side pass) by running each avoided projection once more, through the pruner's public
    `reuse_listener` hook. Only in separate runs: it adds that work to the prefill it instruments."""

    def __init__(self, attached: _Attached, device):
        self.device, self.total, self.pruner = device, 0.0, attached.pruner
        self.active = self.pruner is not None and self.pruner.needs.next_layer_qk and bool(self.pruner.prune_layers)
        if self.active:
            self.pruner.reuse_listener = self._redo

    def _redo(self, project, hidden):
        sync(self.device)
        begin = time.perf_counter()
        project(hidden)
        sync(self.device)
        self.total += time.perf_counter() - begin

    def remove(self):
        if self.pruner is not None:
            self.pruner.reuse_listener = None


def measure(bench: BenchModel, specs: list[MethodSpec], repeats: int, new_tokens: int, decode_repeats: int,
            scoring_repeats: int, log=print, reuse: bool = True) -> dict[str, dict]:
    """Median prefill, decode tokens/s, peak memory and scoring time of each method.

    `reuse=False` skips the extra prefill per pruned method that measures what key reuse saved
    (the app's real-size timing reads only the prefill times).

    Every loop runs the methods alternately, rotating the order each repeat. On CPU the scoring
    clock rides along the timed prefills (a few perf_counter calls per stage, no sync); on CUDA it
    needs a synchronize around each scored call, so it gets its own `scoring_repeats` runs. The
    baseline's vision-encoder time (`vision_ms`, for the fixed-cost bound) is read the same way.
    `FIXED_COST_PROBE` among `specs` is timed like a method and has no decode figures.
    """
    model, inputs = bench.model, bench.inputs
    device = next(model.parameters()).device
    separate_scoring = device.type == "cuda"
    names = [spec.name for spec in specs]
    prefill = {name: [] for name in names}
    scoring = {name: [] for name in names}
    reused = {name: [] for name in names}
    decode = {name: [] for name in names}
    vision = {name: [] for name in names}
    extra: dict[str, dict] = {name: {} for name in names}
    encoders = adapters.for_model(model).vision_encoders(model)

    def vision_clock(spec):
        """Times the vision encoders inside the baseline's prefill (None for every other entry)."""
        return ModuleTimer(encoders, device) if not spec.pruned and not spec.text_only and encoders else None

    def rotated(repeat):
        return specs[repeat % len(specs):] + specs[:repeat % len(specs)]

    with torch.inference_mode():
        for spec in specs:  # warm-up, and the trace of each method
            with _Attached(model, spec, inputs) as attached:
                attached.prefill()
                trace = attached.pruner.trace if attached.pruner is not None else None
                if trace is not None:
                    extra[spec.name]["tokens_per_layer"] = list(trace.tokens_per_layer)
                    extra[spec.name]["visual_tokens_per_layer"] = list(trace.visual_tokens_per_layer)
        for repeat in range(repeats):
            for spec in rotated(repeat):
                with _Attached(model, spec, inputs) as attached:
                    clock = _ScoringClock(attached, device) if spec.pruned and not separate_scoring else None
                    encoder_clock = None if separate_scoring else vision_clock(spec)
                    try:
                        with encoder_clock or contextlib.nullcontext():
                            _, ms = timed_ms(attached.prefill, device)
                    finally:
                        if clock is not None:
                            clock.remove()
                            scoring[spec.name].append(clock.total * 1e3)
                    if encoder_clock is not None:
                        vision[spec.name].append(encoder_clock.ms)
                    prefill[spec.name].append(ms)
            log(f"  prefill {repeat + 1}/{repeats}: " +
                ", ".join(f"{name} {prefill[name][-1]:.0f} ms" for name in names), file=sys.stderr)
        for repeat in range(scoring_repeats if separate_scoring else 0):
            for spec in rotated(repeat):
                encoder_clock = vision_clock(spec)
                if encoder_clock is not None:
                    with _Attached(model, spec, inputs) as attached, encoder_clock:
                        attached.prefill()
                    vision[spec.name].append(encoder_clock.ms)
                if spec.pruned:
                    with _Attached(model, spec, inputs) as attached:
                        clock = _ScoringClock(attached, device)
                        try:
                            attached.prefill()
                        finally:
                            clock.remove()
                        scoring[spec.name].append(clock.total * 1e3)
        for repeat in range(max(1, scoring_repeats) if reuse else 0):
            # What key reuse saved the layers after each stage, for the net scoring share.
            for spec in rotated(repeat):
                with _Attached(model, spec, inputs) as attached:
                    clock = _ReuseClock(attached, device)
                    if not clock.active:
                        continue
                    try:
                        attached.prefill()
                    finally:
                        clock.remove()
                    reused[spec.name].append(clock.total * 1e3)
        for repeat in range(decode_repeats):
            # Peak memory of a whole prefill + decode, reset before each method's generate.
            for spec in rotated(repeat):
                if spec.text_only:
                    continue
                with _Attached(model, spec, inputs) as attached:
                    reset_peak_memory(device)
                    if new_tokens > 1:
                        decode[spec.name].append(decode_tokens_per_s(model, attached, new_tokens, device))
                    else:
                        attached.prefill()
                    peak = peak_memory_mb(device)
                    extra[spec.name]["peak_mb"] = max(peak, extra[spec.name].get("peak_mb", 0.0))
            if new_tokens > 1:
                log(f"  decode {repeat + 1}/{decode_repeats}: " +
                    ", ".join(f"{name} {decode[name][-1]:.1f} tok/s" for name in names if decode[name]),
                    file=sys.stderr)
    results = {}
    for name in names:
        rates = [r for r in decode[name] if r is not None]
        results[name] = dict(prefill_ms=statistics.median(prefill[name]), prefill_ms_all=prefill[name],
                             decode_tokens_per_s=statistics.median(rates) if rates else None,
                             decode_tokens_per_s_all=rates, **extra[name])
        if scoring[name]:
            results[name]["scoring_ms"] = statistics.median(scoring[name])
        if reused[name]:
            results[name]["reused_keys_ms"] = statistics.median(reused[name])
        if vision[name]:
            results[name]["vision_ms"] = statistics.median(vision[name])
    return results


def fixed_cost(bench: BenchModel, probe: dict, baseline: dict) -> dict:
    """The measured fixed cost: the probe's prefill (the prompt without its visual tokens) plus the
    baseline's vision-encoder time, with the FLOPs of both ends of the fitted line."""
    text_tflops, full_tflops = bench.sequence_tflops([0] * bench.layers), bench.baseline_tflops()
    vision_ms = baseline.get("vision_ms", 0.0)
    return dict(text_only_ms=probe["prefill_ms"], text_only_ms_all=probe["prefill_ms_all"], vision_ms=vision_ms,
                zero_visual_ms=probe["prefill_ms"] + vision_ms, baseline_ms=baseline["prefill_ms"],
                zero_visual_tflops=text_tflops, baseline_tflops=full_tflops,
                share_of_baseline=(probe["prefill_ms"] + vision_ms) / baseline["prefill_ms"],
                share_of_baseline_flops=text_tflops / full_tflops)


def fixed_cost_bound(fixed: dict, method_tflops: float) -> float | None:
    """`bound_with_fixed_cost` for a prefill of `method_tflops` on the model `fixed` (see `fixed_cost`) measured."""
    return bound_with_fixed_cost(fixed["baseline_ms"], fixed["zero_visual_ms"], fixed["baseline_tflops"],
                                 fixed["zero_visual_tflops"], method_tflops)


def measure_fixed_cost(bench: BenchModel, repeats: int, log=print) -> dict:
    """The fixed cost of a prefill on `bench` (see `fixed_cost`): the baseline against the fixed-cost probe,
    `repeats` alternating pairs after a warm-up of each."""
    measured = measure(bench, [MethodSpec("baseline"), FIXED_COST_PROBE], repeats=repeats, new_tokens=1,
                       decode_repeats=0, scoring_repeats=0, log=log, reuse=False)
    return fixed_cost(bench, measured[FIXED_COST_PROBE.name], measured["baseline"])


def time_schedule(bench: BenchModel, config: PruneConfig, shape: flops.Shape, repeats: int, log=print) -> dict:
    """The baseline against one schedule on `bench` (a model of `shape`): `repeats` alternating prefill
    pairs after one warm-up of each. Returns baseline_ms and pruned_ms (medians), pairs (baseline ÷
    pruned of each pair, in the order run), bound (the analytic whole-sequence speedup of the model
    timed), bench_tflops (the pruned prefill's analytic TFLOPs on that model, for
    `bound_with_fixed_cost`) and final_visual_tokens. The app's real-size panel and `eval --frontier`
    time with this."""
    spec = MethodSpec("pruned", config)
    measured = measure(bench, [MethodSpec("baseline"), spec], repeats=repeats, new_tokens=1, decode_repeats=0,
                       scoring_repeats=0, log=log, reuse=False)
    base, pruned = measured["baseline"], measured["pruned"]
    baseline_full = bench.baseline_tflops()
    figures = analytic(spec, shape, bench, baseline_full)
    return dict(baseline_ms=base["prefill_ms"], pruned_ms=pruned["prefill_ms"],
                pairs=[b / p for b, p in zip(base["prefill_ms_all"], pruned["prefill_ms_all"])],
                bound=figures["bound"], bench_tflops=figures["bench_tflops_full_sequence"],
                final_visual_tokens=figures["final_visual_tokens"])

