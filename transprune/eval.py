"""Accuracy vs. budget: held-out shape scenes (`--suite shapes`) or your own questions (`--questions`).

Your own data (question JSONL + image folder, POPE/MME/GQA-style; one process or `accelerate
launch`) is `transprune.eval_questions`: see its docstring and docs/evaluation.md.
The rest of this module is the shapes suite, on a CPU:

    python -m transprune.eval --suite shapes --seed 1 --n 500 --json runs/eval.json --plot runs/eval.png

Draws N fresh questions with `seed` from the scene generator (types cycle, so each type gets N/5),
answers each with the shipped shapes-llava through `LoadedModel.generate` -- unpruned and under
every method/budget -- and scores exact match of the one-word answer. TFLOPs are the paper's
analytic count (visual tokens only) from the prefill's PruneTrace; "tflops_full" counts every
token. The random control draws a fresh keep-set per question (seed = question index), so it is
a random mask and not one fixed subset of patches.

Prints a markdown table, writes the JSON ({name: {accuracy, tflops, per_type, ...}}) and a plot,
and ends stdout with one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

from . import methods
from .config import PRESETS, PruneConfig
from .flops import ARCHITECTURES, config_tflops, model_shape, Shape, trace_tflops


def _with_seed(name: str, **overrides):
    """A factory (question index -> PruneConfig) for the random control: new keep-set per question."""
    return lambda index: PruneConfig.preset(name, seed=index, **overrides)


def _fixed(config):
    return lambda index: config


# A row: name -> (label for the plot's series, budget, factory). Position modes are explicit, so a
# name measures the same thing whatever the model's registry entry recommends (shapes-llava
# recommends "original"): a preset that leaves them open runs with the released code's "compact".
def method_table() -> dict:
    """Every row: the unpruned baseline, one per preset of every registered method, then the ablations."""
    return {"baseline": ("baseline", "none", _fixed(None)), **preset_rows(), **ablation_rows(), **random_budget_rows()}


FRONTIER_ARCH = "llava-1.5-7b"   # the frontier figure's cost axis: each config's TFLOPs at this shape

# Presets without a row of their own: "off" keeps every token (its answers are the baseline's), and
# the random control's preset is measured as random-high / random-low, a fresh keep-set per question.
NOT_ROWS = ("off", "random")


def preset_rows() -> dict:
    """One row per preset in PRESETS, named and budgeted by the preset, labelled by its method's
    stage class; a newly registered method with a preset gets its row here."""
    rows = {}
    for name, values in PRESETS.items():
        if name in NOT_ROWS:
            continue
        stage = methods.REGISTRY[values["method"]]
        # Only an in-LLM stage has positions to choose (a pre-LLM stage alone keeps its config as is).
        open_positions = not stage.pre_llm and "positions" not in values
        config = PruneConfig.preset(name, **(dict(positions="compact") if open_positions else {}))
        rows[name] = (stage.label, name, _fixed(config))
    return rows


# The random control at the budgets the pre-LLM methods and DART keep of LLaVA-1.5's 576 tokens
# (64 / 128 / 192), pruned once after layer 2 (DART's layer; the earliest an in-LLM stage runs here),
# a fresh keep-set per question.
RANDOM_BUDGETS = (64, 128, 192)


def random_budget_rows() -> dict:
    return {f"random-{kept}": ("random", f"{kept} tokens", _with_seed(
        "random", prune_layers=(2,), keep_ratios=(kept / 576,), positions="compact")) for kept in RANDOM_BUDGETS}


def frontier_rows() -> list[str]:
    """The rows of the frontier figure: the baseline, every preset of every registered method (one
    point per released budget) and the random control at every budget, without the ablations."""
    return ["baseline", *preset_rows(), "random-high", "random-low", *random_budget_rows()]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats on both (cheaper or equal and more accurate),
    by increasing cost."""
    front = []
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((cost, accuracy))
    return front


def ablation_rows() -> dict:
    """The rows that are not presets, so not derived from the registry: a preset with one switch
    changed (criterion, position mode), the random control with a fresh seed per question, and a
    stack of two presets."""
    low = PRESETS["low"]["keep_ratios"]
    compact = dict(positions="compact")
    return {
        "ttv-high": ("TTV only", "high", _fixed(PruneConfig.preset("high", criterion="ttv", **compact))),
        "ttv-low": ("TTV only", "low", _fixed(PruneConfig.preset("low", criterion="ttv", **compact))),
        "iga-high": ("IGA only", "high", _fixed(PruneConfig.preset("high", criterion="iga", **compact))),
        "iga-low": ("IGA only", "low", _fixed(PruneConfig.preset("low", criterion="iga", **compact))),
        "random-high": ("random", "high", _with_seed("random", **compact)),
        "random-low": ("random", "low", _with_seed("random", keep_ratios=low, **compact)),
        # VisionZip before the LLM at the released share of LLaVA-1.5's 576 patches, then TransPrune High.
        "visionzip-192+high": ("VisionZip + TransPrune", "visionzip-192+high",
                               _fixed(PruneConfig.preset("visionzip-192+high"))),
        # The released code renumbers positions after pruning ("compact", LLaVA's default); these
        # keep the original RoPE positions, which matters for "where" questions.
        "high-original": ("TransPrune, original positions", "high",
                          _fixed(PruneConfig.preset("high", positions="original"))),
        "low-original": ("TransPrune, original positions", "low",
                         _fixed(PruneConfig.preset("low", positions="original"))),
        "random-high-original": ("random, original positions", "high", _with_seed("random", positions="original")),
        "random-low-original": ("random, original positions", "low",
                                _with_seed("random", keep_ratios=low, positions="original")),
        "ttv-high-original": ("TTV only, original positions", "high",
                              _fixed(PruneConfig.preset("high", criterion="ttv", positions="original"))),
        "ttv-low-original": ("TTV only, original positions", "low",
                             _fixed(PruneConfig.preset("low", criterion="ttv", positions="original"))),
        "iga-high-original": ("IGA only, original positions", "high",
                              _fixed(PruneConfig.preset("high", criterion="iga", positions="original"))),
        "iga-low-original": ("IGA only, original positions", "low",
                             _fixed(PruneConfig.preset("low", criterion="iga", positions="original"))),
    }


def evaluate_method(lm, examples, factory, shape: tuple[int, int, int], progress=None) -> dict:
    """Exact-match accuracy (overall and per question type) and mean analytic TFLOPs of one method."""
    hidden, intermediate, layers = shape
    hits: dict[str, list[int]] = {}
    flops, flops_full, wrong = [], [], []
    for index, example in enumerate(examples):
        config = factory(index)
        result = lm.generate(example.image, example.question.text, config=config, max_new_tokens=3)
        ok = result.text.strip().lower() == example.question.answer
        hits.setdefault(example.question.qtype, []).append(int(ok))
        if not ok and len(wrong) < 5:
            wrong.append(dict(question=example.question.text, answer=example.question.answer, got=result.text))
        if result.trace is not None:
            flops.append(trace_tflops(result.trace, hidden, intermediate))
            flops_full.append(trace_tflops(result.trace, hidden, intermediate, full_sequence=True))
        else:
            tokens = result.inputs["input_ids"].shape[1]
            visual = int((result.inputs["input_ids"] == lm.model.config.image_token_index).sum())
            flops.append(config_tflops(None, Shape(hidden, intermediate, layers, visual)))
            flops_full.append(config_tflops(None, Shape(hidden, intermediate, layers, tokens)))
        if progress:
            progress(index)
    total = sum(len(v) for v in hits.values())
    return dict(accuracy=sum(sum(v) for v in hits.values()) / total,
                tflops=sum(flops) / len(flops), tflops_full=sum(flops_full) / len(flops_full),
                per_type={k: sum(v) / len(v) for k, v in sorted(hits.items())}, n=total, examples_wrong=wrong)


def run_shapes(model_name: str, seed: int, n: int, names: list[str]) -> dict:
    from . import models
    from .shapes import scenes

    table = method_table()
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(table)}.")
    lm = models.load(model_name, device="cpu")
    examples = scenes.dataset(seed, n)
    shape = model_shape(lm.model)
    results = {}
    for name in names:
        label, budget, factory = table[name]
        start = time.perf_counter()
        record = evaluate_method(lm, examples, factory, shape)
        config = factory(0)
        config = lm.config_for(config)   # what ran: the model's recommended positions where unset
        record.update(method=label, budget=budget, seconds=round(time.perf_counter() - start, 1),
                      config=None if config is None else lm.resolve(config).to_dict(),
                      tflops_llava15_7b=config_tflops(config, ARCHITECTURES[FRONTIER_ARCH]))
        results[name] = record
        print(f"{name}: {record['accuracy']:.3f} ({record['seconds']} s)", file=sys.stderr, flush=True)
    return results


def markdown_table(results: dict) -> str:
    types = sorted({t for r in results.values() for t in r["per_type"]})
    lines = ["| method | budget | accuracy | " + " | ".join(types) + " | TFLOPs (visual) | TFLOPs (all tokens) |",
             "|---" * (len(types) + 5) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{100 * r['per_type'].get(t, float('nan')):.1f}" for t in types)
        lines.append(f"| {name} | {r['budget']} | {100 * r['accuracy']:.1f} | {cells} | "
                     f"{r['tflops']:.2e} | {r['tflops_full']:.2e} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str):
    """Accuracy vs. analytic FLOPs (GFLOPs: this model is tiny), one series per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    series: dict[str, list] = {}
    for name, r in results.items():
        series.setdefault(r["method"], []).append((1e3 * r["tflops"], 100 * r["accuracy"], r["budget"]))
    markers = itertools.cycle("os^vDP*Xh<>")   # more series than markers: repeat (colours still differ)
    for label, points in series.items():
        points.sort()
        if label == "baseline":
            ax.axhline(points[0][1], color="grey", linestyle="--", linewidth=1, label=f"unpruned ({points[0][1]:.1f}%)")
            ax.plot([points[0][0]], [points[0][1]], "k*", markersize=10)
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=next(markers), label=label)
        for x, y, budget in points:
            if budget in ("high", "low"):
                ax.annotate(budget, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("analytic prefill GFLOPs (visual tokens, paper's accounting)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse turns the error into a usage message)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, such as 16; got {text!r}")
    return int(text)


FRONTIER_WIDTH = 0.25   # the speed column: FRONTIER_ARCH's language-model shape at a quarter width (a CPU's)


def measure_speed(results: dict, repeats: int = 2, width: float | None = None, log=print) -> str:
    """Add each pruned row's measured CPU prefill speedup on FRONTIER_ARCH's shape at `width` (random
    weights, timing only) to `results`: `cpu_speedup` (median baseline ÷ median pruned over `repeats`
    alternating pairs after a warm-up), `cpu_bound` (the analytic whole-sequence bound of that model),
    `cpu_bound_fixed` (that bound with the prefill's measured fixed cost, `benchmarking.bound_with_fixed_cost`,
    calibrated once on 2 * repeats + 1 pairs of the baseline and the prompt without its visual tokens)
    and `cpu_pairs` (each pair's ratio). Returns where it was measured, for the table and the figure."""
    import torch

    from . import benchmarking as bench
    from .bench import machine_description

    width = FRONTIER_WIDTH if width is None else width
    table = method_table()
    shape = ARCHITECTURES[FRONTIER_ARCH]
    model = bench.build_shape(shape, description=FRONTIER_ARCH, width_scale=width)
    fixed = bench.measure_fixed_cost(model, 2 * repeats + 1, log=lambda *a, **k: None)
    log(f"fixed cost: {fixed['zero_visual_ms']:.0f} ms with no visual tokens, {fixed['share_of_baseline']:.1%} of "
        f"the baseline's {fixed['baseline_ms']:.0f} ms", file=sys.stderr, flush=True)
    for name, record in results.items():
        config = table[name][2](0)
        if config is None:
            continue
        timed = bench.time_schedule(model, config, shape, repeats, log=lambda *a, **k: None)
        record.update(cpu_speedup=timed["baseline_ms"] / timed["pruned_ms"], cpu_bound=timed["bound"],
                      cpu_bound_fixed=bench.fixed_cost_bound(fixed, timed["bench_tflops"]),
                      cpu_pairs=timed["pairs"])
        log(f"{name}: {record['cpu_speedup']:.2f}x prefill (bound {record['cpu_bound']:.2f}x)", file=sys.stderr,
            flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{FRONTIER_ARCH} shape at {width:g}x width, random weights, {machine_description(torch.device('cpu'))}, "
            f"load {load:.1f} at the end, median of {repeats} alternating pairs after a warm-up; fixed cost (the "
            f"prompt without its visual tokens) {fixed['zero_visual_ms']:.0f} ms, {fixed['share_of_baseline']:.1%} of "
            f"the baseline's time for {fixed['share_of_baseline_flops']:.1%} of its FLOPs")


# Method colours without tab10's grey, which is the random control's.
_METHOD_COLOURS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "navy", "olive", "teal"]


def plot_frontier(results: dict, path: Path, title: str, speed_where: str | None = None):
    """Accuracy vs. LLaVA-1.5-7B analytic TFLOPs of each row's config, one marker series per method,
    with the accuracy/cost frontier over all rows drawn as a step line; each point carries its
    measured CPU prefill speedup when `measure_speed` ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.6), dpi=130)
    series: dict[str, list] = {}
    for r in results.values():
        series.setdefault(r["method"], []).append((r["tflops_llava15_7b"], 100 * r["accuracy"], r.get("cpu_speedup")))
    markers, colours = itertools.cycle("os^vDP*Xh<>"), iter(_METHOD_COLOURS)
    labelled: list[tuple[float, float]] = []
    for label, points in series.items():
        points.sort()
        if label == "baseline":
            ax.axhline(points[0][1], color="grey", linestyle="--", linewidth=1, label=f"unpruned ({points[0][1]:.1f}%)")
            continue
        style = (dict(color="dimgrey", linestyle=":", markerfacecolor="white") if label == "random"
                 else dict(color=next(colours, None)))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=next(markers), linewidth=0.9, label=label,
                **style)
        for x, y, speedup in points:
            if speedup is None:
                continue
            # Points at the same cost (the pre-LLM methods at one budget) stack their labels upward.
            near = sum(abs(x - u) < 0.06 and abs(y - v) < 4 for u, v in labelled)
            labelled.append((x, y))
            ax.annotate(f"{speedup:.1f}×", (x, y), textcoords="offset points", xytext=(5, -3 + 10 * near),
                        fontsize=7, color=style.get("color"))
    front = pareto_front([p[:2] for points in series.values() for p in points])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", linewidth=1.5,
            alpha=0.5, label="frontier")
    ax.set_xlabel(f"analytic prefill TFLOPs of the config on {FRONTIER_ARCH} (visual tokens, paper's accounting)")
    ax.set_ylabel("exact-match accuracy (%)")
    positions = sorted({r["config"]["positions"] for r in results.values()
                        if r.get("config") and r["config"].get("prune_layers")})
    if positions:
        title += f", {' / '.join(positions)} positions"
    if speed_where:
        title += f"\nnext to each point: measured CPU prefill speedup ({speed_where.split(', random weights')[0]})"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def frontier_markdown(results: dict, command: str, speed_where: str | None) -> str:
    """The frontier's table, cheapest first, with the command, the machine and the date."""
    import datetime

    lines = [f"Command: `{command}` ({datetime.date.today().isoformat()}).", ""]
    if speed_where:
        lines += [f"CPU prefill speedup: {speed_where}.", ""]
    # What a reader compares first (accuracy, cost, speed) comes first: on a phone the rest scrolls sideways.
    lines += ["| row | accuracy % | TFLOPs (LLaVA-1.5-7B) | CPU prefill × | method | budget | positions | pairs × | "
              "bound × | ÷ bound | bound with fixed cost × | ÷ it |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items(), key=lambda item: (-item[1]["tflops_llava15_7b"], item[0])):
        speed, config = r.get("cpu_speedup"), r.get("config") or {}
        positions = config.get("positions", "–") if config.get("prune_layers") else "–"
        fixed = r.get("cpu_bound_fixed")
        timing = (f"{' / '.join(f'{p:.2f}' for p in r['cpu_pairs'])} | {r['cpu_bound']:.2f} | "
                  f"{speed / r['cpu_bound']:.2f} | " + (f"{fixed:.2f} | {speed / fixed:.2f}" if fixed else "– | –")
                  if speed is not None else "– | – | – | – | –")
        lines.append(f"| {name} | {100 * r['accuracy']:.1f} | {r['tflops_llava15_7b']:.2f} | "
                     f"{'–' if speed is None else f'{speed:.2f}'} | {r['method']} | {r['budget']} | {positions} | "
                     f"{timing} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m transprune.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="shapes", choices=["shapes"], help="built-in suite (without --questions)")
    parser.add_argument("--model", default="shapes-llava", help="registry name or Hugging Face id")
    parser.add_argument("--seed", type=int, default=1, help="shapes: seed of the held-out questions")
    parser.add_argument("--n", type=int, default=500, help="shapes: number of questions")
    parser.add_argument("--methods", default=None,
                        help="comma-separated; shapes (default all): " + ", ".join(method_table()) +
                             "; --questions (default baseline,high,low): the bench's names (baseline, high, low, "
                             "fastv, pdrop, random, visionzip-64, visionzip-128+high, ...), ttv, iga, ttv-low, "
                             "iga-low, any with -original or -compact")
    parser.add_argument("--json", default=None, help="shapes: write the results here")
    parser.add_argument("--frontier", default=None,
                        help="shapes: write the frontier figure here (PNG: accuracy vs. LLaVA-1.5-7B TFLOPs, every "
                             "method's presets; --methods defaults to those rows, --json to the PNG's .json)")
    parser.add_argument("--speed-repeats", type=int, default=2,
                        help="--frontier: alternating baseline/pruned prefill pairs per row timed on the LLaVA-1.5-7B "
                             "shape at a quarter width (random weights); 0 skips the speed column")
    parser.add_argument("--plot", default=None, help="PNG path (default: next to --json; --questions: OUT/summary.png)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    own = parser.add_argument_group("your own data (python -m transprune.eval --questions ...)")
    own.add_argument("--questions", default=None, help="question file, JSONL (LLaVA/POPE fields)")
    own.add_argument("--images", default=".", help="folder the questions' image paths are relative to")
    own.add_argument("--annotations", default=None,
                     help="gold answers kept apart: a JSONL by question_id, or a folder of coco_pope_<category>.json")
    own.add_argument("--out", default=None, help="output folder (answers-<method>.jsonl, summary.json, summary.png)")
    own.add_argument("--max-new-tokens", type=_positive_int, default=16)
    own.add_argument("--prompt-suffix", default="",
                     help="appended to every question, e.g. ' Answer the question using a single word or phrase.'")
    own.add_argument("--device", default=None, help="default: this process's accelerate device (cuda:i or cpu)")
    own.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    own.add_argument("--attn", default=None, help="attention implementation: sdpa, eager, flash_attention_2")
    own.add_argument("--device-map", default=None, choices=["auto"],
                     help="spread a model too large for one GPU over all GPUs (one process only)")
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.questions is not None:
        from . import eval_questions
        from .config import ConfigError
        from .eval_data import DataError
        from .models import ModelLoadError

        try:
            return run_questions(args)
        except (DataError, ConfigError, ModelLoadError, eval_questions.EvalError) as error:
            raise SystemExit(str(error)) from None
    default_rows = frontier_rows() if args.frontier else list(method_table())
    names = [name.strip() for name in (args.methods or ",".join(default_rows)).split(",") if name.strip()]
    if args.frontier and not args.json:
        args.json = str(Path(args.frontier).with_suffix(".json"))
    if "baseline" not in names:
        names.insert(0, "baseline")
    try:
        results = run_shapes(args.model, args.seed, args.n, names)
    except ValueError as error:   # a bad --methods: the message, not a traceback
        raise SystemExit(str(error)) from None
    speed_where = None
    if args.frontier and args.speed_repeats > 0:
        speed_where = measure_speed(results, args.speed_repeats)
    print(markdown_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    plot_path = Path(args.plot) if args.plot else (Path(args.json).with_suffix(".png") if args.json else None)
    if args.frontier:
        title = f"{args.model}, {args.n} held-out questions (seed {args.seed})"
        plot_frontier(results, Path(args.frontier), title, speed_where)
        command = "python -m transprune.eval " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.frontier).with_suffix(".md").write_text(frontier_markdown(results, command, speed_where))
        plot_path = None if not args.plot else plot_path   # the frontier figure replaces the default plot
    if plot_path is not None:
        plot(results, plot_path, f"{args.model}, {args.n} held-out questions (seed {args.seed})")
    summary = {name: dict(accuracy=round(r["accuracy"], 4), tflops=r["tflops"]) for name, r in results.items()}
    print(json.dumps(dict(suite=args.suite, model=args.model, seed=args.seed, n=args.n, results=summary,
                          json=args.json, plot=str(plot_path) if plot_path else None, frontier=args.frontier)))


def run_questions(args):
    """The --questions mode; usage and data errors raise (main() turns them into one-line exits)."""
    from . import eval_questions

    if args.out is None:
        raise eval_questions.EvalError("--questions needs --out DIR: the folder for the answers files and "
                                       "summary.json.")
    names = [name.strip() for name in (args.methods or "baseline,high,low").split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise eval_questions.EvalError(f"--methods lists a method twice: {args.methods}")
    summary = eval_questions.evaluate(args.model, args.questions, args.images, names, args.out,
                                      annotations=args.annotations, device=args.device, dtype=args.dtype,
                                      attn=args.attn, device_map=args.device_map,
                                      max_new_tokens=args.max_new_tokens, prompt_suffix=args.prompt_suffix)
    if summary is None:      # not the main process of a data-parallel run
        return None
    print(eval_questions.markdown_table(summary))
    plot_path = Path(args.plot) if args.plot else Path(args.out) / "summary.png"
    plotted = eval_questions.plot(summary, plot_path, f"{args.model} on {Path(args.questions).name}")
    print(json.dumps(dict(questions=args.questions, model=args.model, out=args.out,
                          processes=eval_questions.distributed_state().num_processes,
                          plot=str(plot_path) if plotted else None,
                          results={name: {k: r[k] for k in ("n", "errors", "accuracy", "tflops")}
                                   for name, r in summary.items()})))
    return summary


if __name__ == "__main__":
    main()
