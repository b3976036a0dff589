"""python -m transprune.bench: measured speed of pruning against the analytic FLOPs bound.

    python -m transprune.bench --arch llava-1.5-7b --width-scale 0.25 --threads 2 \\
        --methods baseline,fastv,pdrop,high,low,random --json docs/bench_cpu.json
    python -m transprune.bench --arch llava-1.5-7b --methods baseline,fastv,pdrop,high,low --flops-only

What it does, per method, on one fixed input:
- builds the model: `--checkpoint` loads real weights (registry name or Hugging Face id); otherwise
  random weights in the language-model shape of `--arch` (public config values in
  `flops.ARCHITECTURES`), optionally narrower (`--width-scale`, head_dim kept at 128 where it
  divides) or shallower (`--layers`), with a small CLIP tower that still yields the real N visual
  tokens (only the language model's cost matters here). "tiny-llava" is the 16-layer CI model;
- prefill = one full forward of the prompt with `use_cache=True, logits_to_keep=1` (what generate
  does first), with the pruner attached outside the timed region; methods run alternately (the
  order rotates every repeat) after one warm-up of each; the median of `--repeats` is reported;
- decode tokens/s from greedy generates of `--new-tokens` tokens: 1 / the median time between
  consecutive new tokens, median of `--decode-repeats`, methods again alternating;
- peak memory of a prefill + generate: CUDA `max_memory_allocated` after
  `reset_peak_memory_stats`; CPU the process's peak RSS (VmHWM, reset through
  /proc/self/clear_refs before each method, so it includes the weights);
- scoring share: the time spent inside the scoring code (TTV hooks and the method's score(),
  i.e. the IGA / attention side passes; for VisionZip the CLS attention and the merge), median
  over the timed prefills on CPU (timers without sync) or over `--scoring-repeats` separate
  synchronised runs on CUDA, divided by the method's median prefill. Top-k and the gathers are
  bookkeeping every method shares with "random" and are not counted. The IGA side pass projects
  the next layer's keys for every token, and that layer then takes the survivors' keys instead of
  projecting them (key reuse): `reused_keys_ms` is the time of those avoided projections, measured
  by running them in `--scoring-repeats` separate instrumented prefills, and `scoring_share_net`
  = (scoring - reused keys) / prefill, shown in parentheses in the table. Where "random" runs at
  the same schedule, `overhead_vs_random` = (t_method - t_random) / t_method is a cross-check.

Figures: `tflops` is the paper's accounting (visual tokens only, 4nd^2 + 2n^2d + 3ndm per layer)
at the full size of `--arch`, `tflops_full_sequence` counts the text tokens too. `bound` is the
analytic speedup of the model actually timed (its width and depth, all tokens of the prompt):
the most a method can gain if time followed FLOPs; `speedup_over_bound` = measured / bound.
Time does not follow FLOPs all the way down: a prefill also reads every weight, runs the vision
encoder and the text tokens, and pays per-layer overheads that do not shrink with the visual
tokens. So each run also times a fixed-cost probe, the same prompt with its visual tokens taken
out and no pixels (interleaved with the methods), and the baseline's vision encoder. `bound_fixed`
(table: "bound with fixed cost") is the bound when a prefill costs that measured zero-visual-token
time plus a rate per TFLOP fitted through the baseline (`benchmarking.bound_with_fixed_cost`);
`speedup_over_bound_fixed` = measured / it. `run.fixed_cost` keeps the probe's figures.
Output: a markdown table, one JSON line at the end of stdout, `--json` ({method: figures}) and a
plot of speedup against the mean number of visual tokens per layer (`--plot`, default next to
the JSON).

Method names: "baseline" (no pruning), any PruneConfig preset ("high", "low", "fastv", "pdrop",
"random", "off", "sparsevlm", "dart", "visionzip-64|128|192", "divprune-64|128|192" and
"cdpruner-64|128|192" before the LLM), a pre-LLM stage's name alone ("visionzip": its default share)
and stacks "<pre-LLM preset>+<in-LLM preset>" such as "visionzip-128+high".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import textwrap
from pathlib import Path

import torch

from . import flops, methods
from .benchmarking import (FIXED_COST_PROBE, TINY_ARCH, LLAVA_IMAGE_TOKEN, LLAVA_VOCAB,  # noqa: F401
                           BenchError, BenchModel, MethodSpec, _heads_for, analytic, bound_with_fixed_cost, build,
                           build_shape, decode_tokens_per_s, fixed_cost, fixed_cost_bound, measure, parse_method,
                           random_llava, synthetic_inputs, timed_ms, visual_schedule)
from .measure import DTYPES, TokenClock, peak_memory_mb, reset_peak_memory, sync  # noqa: F401  (re-exported)


# ---------------------------------------------------------------------------------------- report
def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            match = re.search(r"model name\s*:\s*(.+)", handle.read())
            cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _load() -> str:
    try:
        return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load avg n/a"


def _fmt(value, pattern="{:.2f}"):
    return "–" if value is None else pattern.format(value)


def _scoring_cell(r: dict) -> str:
    """"2.3% (1.6%)": gross scoring share, and net of reused keys where key reuse applies."""
    gross, net = r.get("scoring_share"), r.get("scoring_share_net")
    if gross is None or net is None or "reused_keys_ms" not in r:
        return _fmt(gross, "{:.1%}")
    return f"{gross:.1%} ({net:.1%})"


def markdown_table(results: dict[str, dict], flops_only: bool) -> str:
    if flops_only:
        lines = ["| method | visual tokens (mean/layer → final) | TFLOPs (paper) | TFLOPs (full seq.) | bound (timed shape) |",
                 "|---|---|---|---|---|"]
        for name, r in results.items():
            lines.append(f"| {name} | {r['mean_visual_tokens']:.0f} → {r['final_visual_tokens']} | {r['tflops']:.2f} | "
                         f"{r['tflops_full_sequence']:.2f} | {r['bound']:.2f}× |")
        return "\n".join(lines)
    lines = ["| method | visual tokens (mean/layer → final) | TFLOPs (paper) | prefill ms | speedup | bound | "
             "speedup ÷ bound | bound with fixed cost | speedup ÷ it | scoring share (net) | decode tok/s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['mean_visual_tokens']:.0f} → {r['final_visual_tokens']} | {r['tflops']:.2f} | "
            f"{r['prefill_ms']:.1f} | {r['speedup']:.2f}× | {r['bound']:.2f}× | {r['speedup_over_bound']:.2f} | "
            f"{_fmt(r.get('bound_fixed'), '{:.2f}×')} | {_fmt(r.get('speedup_over_bound_fixed'))} | "
            f"{_scoring_cell(r)} | {_fmt(r.get('decode_tokens_per_s'), '{:.1f}')} | "
            f"{r['peak_mb']:.0f} |")
    return "\n".join(lines)


def fixed_cost_sentence(fixed: dict) -> str:
    return (f"Fixed cost: with no visual tokens a prefill takes {fixed['zero_visual_ms']:.1f} ms "
            f"(the text-only prompt {fixed['text_only_ms']:.1f} ms + the vision encoder {fixed['vision_ms']:.1f} ms), "
            f"{fixed['share_of_baseline']:.1%} of the baseline's time for {fixed['share_of_baseline_flops']:.1%} of its "
            "FLOPs. 'bound with fixed cost' adds that time to every method and scales the rest with FLOPs.")


def plot(results: dict[str, dict], path: Path, title: str, flops_only: bool):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, (name, r) in enumerate(results.items()):
        color = f"C{index % 10}"
        x = r["mean_visual_tokens"]
        ax.scatter([x], [r["bound"]], facecolors="none", edgecolors=color, marker="o", s=70)
        if not flops_only:
            ax.scatter([x], [r["speedup"]], color=color, marker="o", s=40, label=name)
            ax.plot([x, x], [r["speedup"], r["bound"]], color=color, lw=0.8, ls=":")
        else:
            ax.scatter([], [], facecolors="none", edgecolors=color, label=name)
        ax.annotate(name, (x, r["speedup"] if not flops_only else r["bound"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("visual tokens per layer (mean over layers)")
    ax.set_ylabel("prefill speedup vs baseline")
    ax.axhline(1.0, color="0.6", lw=0.6)
    ax.set_title(title, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="filled: measured, hollow: analytic bound", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def run(args) -> dict[str, dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_method(name) for name in args.methods.split(",") if name.strip()]
    if not any(not s.pruned for s in specs):
        specs.insert(0, MethodSpec("baseline"))  # every speedup is relative to it
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BenchError(f"--methods lists a method twice: {args.methods}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    if args.arch is None:
        # The analytic TFLOPs describe the checkpoint's own architecture when the registry knows its shape
        # (else the loaded model's); without a checkpoint, LLaVA-1.5-7B, the paper's model.
        args.arch = (args.checkpoint if args.checkpoint in flops.ARCHITECTURES
                     else "checkpoint" if args.checkpoint else "llava-1.5-7b")
    load_before = _load()
    if args.flops_only and not args.checkpoint and args.arch in flops.ARCHITECTURES:
        shape = flops.ARCHITECTURES[args.arch]
        hidden = max(8, int(round(shape.hidden * args.width_scale)))
        bench = BenchModel(model=None, inputs={}, hidden=hidden,
                           intermediate=max(8, int(round(shape.intermediate * args.width_scale))),
                           layers=args.layers or shape.layers, heads=_heads_for(hidden),
                           visual_tokens=shape.visual_tokens, text_tokens=1 + args.text_before + args.text_after,
                           description=f"{args.arch} (analytic only)")
    else:
        bench = build(args.arch, args.width_scale, args.layers, args.checkpoint, str(device), dtype, args.attn,
                      args.text_before, args.text_after, args.seed)
    arch_shape = flops.ARCHITECTURES.get(args.arch) or flops.Shape(bench.hidden, bench.intermediate, bench.layers,
                                                                   bench.visual_tokens)
    baseline_full = bench.baseline_tflops()
    results = {s.name: analytic(s, arch_shape, bench, baseline_full) for s in specs}
    for s in specs:
        results[s.name]["config"] = None if s.config is None else s.config.to_dict()
        # A pre-LLM stage's own split of the tokens it keeps (VisionZip: [dominant, contextual]), if it has one.
        stage = methods.PRE_LLM[s.config.pre_llm] if s.pre_llm else None
        results[s.name]["pre_llm_split"] = (stage.kept_split(s.config.pre_llm_keep, bench.visual_tokens)
                                            if stage is not None else None)
    if not args.flops_only:
        print(f"Timing {len(specs)} methods x {args.repeats} repeats on {bench.description} ...", file=sys.stderr)
        measured = measure(bench, [*specs, FIXED_COST_PROBE], args.repeats, args.new_tokens,
                           max(1, args.decode_repeats), args.scoring_repeats)
        base = next(s.name for s in specs if not s.pruned)
        fixed = fixed_cost(bench, measured.pop(FIXED_COST_PROBE.name), measured[base])
        random_ms = measured.get("random", {}).get("prefill_ms")
        random_cfg = next((s.config for s in specs if s.name == "random"), None)
        for s in specs:
            r = results[s.name]
            r.update(measured[s.name])
            r["speedup"] = measured[base]["prefill_ms"] / r["prefill_ms"]
            # Interference from other processes only adds time: the fastest run is a second,
            # load-robust estimate (reported next to the median, not instead of it).
            r["prefill_ms_min"] = min(r["prefill_ms_all"])
            r["speedup_min"] = min(measured[base]["prefill_ms_all"]) / r["prefill_ms_min"]
            r["speedup_over_bound"] = r["speedup"] / r["bound"]
            r["bound_fixed"] = fixed_cost_bound(fixed, r["bench_tflops_full_sequence"])
            r["speedup_over_bound_fixed"] = r["speedup"] / r["bound_fixed"] if r["bound_fixed"] else None
            r["scoring_share"] = (r["scoring_ms"] / r["prefill_ms"]) if "scoring_ms" in r else None
            # Net: minus the key projections the layers after each stage no longer do (key reuse).
            r["scoring_share_net"] = (((r["scoring_ms"] - r.get("reused_keys_ms", 0.0)) / r["prefill_ms"])
                                      if "scoring_ms" in r else None)
            base_rate = measured[base]["decode_tokens_per_s"]
            r["decode_speedup"] = (r["decode_tokens_per_s"] / base_rate) if base_rate and r["decode_tokens_per_s"] else None
            same_schedule = (random_cfg is not None and s.config is not None and not s.pre_llm
                             and s.name != "random" and s.config.prune_layers == random_cfg.prune_layers
                             and s.config.keep_ratios == random_cfg.keep_ratios)
            r["overhead_vs_random"] = (1 - random_ms / r["prefill_ms"]) if same_schedule else None
    run_info = dict(arch=args.arch, model=bench.description, hidden=bench.hidden, intermediate=bench.intermediate,
                    layers=bench.layers, heads=bench.heads, visual_tokens=bench.visual_tokens,
                    prompt_tokens=bench.visual_tokens + bench.text_tokens,
                    device=str(device), dtype=str(dtype).replace("torch.", ""), attn=args.attn,
                    machine=machine_description(device) if not args.flops_only else None,
                    repeats=args.repeats, decode_repeats=args.decode_repeats, new_tokens=args.new_tokens, load_before=load_before, load_after=_load(),
                    flops_only=bool(args.flops_only), fixed_cost=None if args.flops_only else fixed)
    for r in results.values():
        r["run"] = run_info
    header = (f"{bench.description}: hidden {bench.hidden}, {bench.layers} layers, N={bench.visual_tokens}, "
              f"{bench.visual_tokens + bench.text_tokens}-token prompt")
    if not args.flops_only:
        header += (f"; {run_info['machine']}, {run_info['dtype']}, {args.attn}; median of {args.repeats}; "
                   f"{load_before} → {run_info['load_after']}")
    print(f"\n{header}\n")
    print(markdown_table(results, args.flops_only))
    if not args.flops_only:
        print("\n" + fixed_cost_sentence(fixed))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    plot_path = Path(args.plot) if args.plot else (Path(args.json).with_suffix(".png") if args.json else None)
    if plot_path is not None:
        plot(results, plot_path, "\n".join(textwrap.wrap(header, 100)), args.flops_only)
    print(json.dumps({"run": run_info, "results": {k: {f: v for f, v in r.items() if f != "run"}
                                                   for k, r in results.items()}}))
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m transprune.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None,
                   help=f"architecture: {', '.join([*flops.ARCHITECTURES, TINY_ARCH])} (default: llava-1.5-7b, or "
                        "with --checkpoint the checkpoint's own)")
    p.add_argument("--methods", default="baseline,fastv,pdrop,high,low,random",
                   help="comma-separated: baseline, presets (high, low, fastv, pdrop, random, off, dart, ...), "
                        "visionzip|divprune|cdpruner[-64|-128|-192], "
                        "stacks like visionzip-128+high")
    p.add_argument("--flops-only", action="store_true", help="analytic figures only, no model is built")
    p.add_argument("--width-scale", type=float, default=1.0, help="scale hidden and MLP width (random weights)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the architecture's)")
    p.add_argument("--checkpoint", default=None, help="real weights: registry name or Hugging Face id")
    p.add_argument("--json", default=None, help="write {method: figures} here")
    p.add_argument("--plot", default=None, help="speedup plot (default: the --json path with .png)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-repeats", type=int, default=3, help="generate runs per method for decode tokens/s")
    p.add_argument("--scoring-repeats", type=int, default=3,
                   help="instrumented runs: the scoring share on CUDA, the reused-key time everywhere")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated for decode tokens/s (<2: skip)")
    p.add_argument("--text-before", type=int, default=35, help="text tokens before the image (system prompt)")
    p.add_argument("--text-after", type=int, default=25, help="text tokens after the image (question)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--attn", default="sdpa", help="attention implementation: sdpa, eager, flash_attention_2")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict[str, dict]:
    try:
        return run(parser().parse_args(argv))
    except BenchError as error:   # a bad flag: the message, not a traceback
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
