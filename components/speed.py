"""Speed at real size: the chosen schedule timed on a language model of a real checkpoint's shape.

The tiny models the app answers with are too small for pruning to pay off in wall-clock time (the
fixed cost per layer outweighs the FLOPs saved). So this panel times the baseline and the chosen
schedule on a model with the language-model shape of the selected family's checkpoint (hidden and
MLP width, depth, visual tokens; `FAMILY_ARCH`), random weights (timing only: no answer is read),
built with the benchmark's own code (transprune.benchmarking, the core of `python -m transprune.bench`:
a LLaVA-1.5-style model whose vision tower gives a square patch grid, so N is rounded to the nearest
square): at full width on a GPU, at a quarter of the width on a CPU so that it fits in memory and seconds. On a CPU, a shape whose
unpruned prefill costs more FLOPs than LLaVA-1.5-7B's (the AnyRes and video families: thousands of
visual tokens into a 7B model) would take minutes, so it is timed at LLaVA-1.5-7B's shape instead,
and the panel says so; SmolVLM's ~1k visual tokens into a 0.5B model cost far less and run at its
own shape.

Figures are kept per (shape, schedule, device, CPU threads) in memory, so a schedule is measured once
per server (30 s on a CPU); on disk only where TRANSPRUNE_SPEED_BOOK names a JSON file (`SpeedBook`),
which the app's owner chooses: nothing is written into a home folder that other servers read. The page
quotes the figures recorded with this module (`python -m components.speed --record`, bundled as
assets/real_size_speed.json), each labelled with its machine, threads, date and command. A live
measurement is quoted to the session that asked for it; other visitors keep seeing the recorded figure
(a visitor cannot change the headline everyone sees) and get the live one where nothing was recorded.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from transprune import PruneConfig, benchmarking, flops
from transprune.adapters import FAMILIES

ARCH = "llava-1.5-7b"       # the default shape, and the CPU stand-in for long visual prompts
# Family -> the architecture whose shape it is timed at (each adapter's `timing_arch`).
FAMILY_ARCH = {name: adapter.timing_arch for name, adapter in FAMILIES.items() if adapter.timing_arch}
CPU_WIDTH = 0.25
# Alternating baseline/pruned pairs after one warm-up of each: the figure is their median, and each
# pair's own ratio is shown as the spread. Two pairs make the button's wait 6 prefills (it was 9, with
# a third pair and a key-reuse pass nobody read).
REPEATS = 2
# Pairs further apart than this ratio (or a figure this far above its bound) mark a timing as noisy: it
# is flagged on the page, and pressing the button again measures it again instead of quoting it.
NOISY_SPREAD = 1.25
NOISY_WARNING = ("\n\n⚠ **Noisy**: the pairs disagree (or the figure beats its own bound), so other work was "
                 "running on this machine while it timed. Press the button again when it is quieter.")
RECORDED = Path(__file__).resolve().parent.parent / "assets" / "real_size_speed.json"
RECORD_COMMAND = "python -m components.speed --record"


def timed_shape(family: str | None, cuda: bool) -> tuple[str, flops.Shape, str]:
    """(arch name, the shape timed, a note) for a family: its checkpoint's language-model shape with N
    rounded to a square; on a CPU, LLaVA-1.5-7B's when that shape's prefill costs more (minutes)."""
    arch = FAMILY_ARCH.get(family or "", ARCH)
    shape = flops.ARCHITECTURES[arch]
    note = ""
    if not cuda and flops.config_tflops(None, shape) > flops.config_tflops(None, flops.ARCHITECTURES[ARCH]):
        note = (f"this family's prompts carry {shape.visual_tokens} visual tokens, minutes per run on a CPU, "
                "so the LLaVA-1.5-7B shape stands in")
        arch, shape = ARCH, flops.ARCHITECTURES[ARCH]
    side = round(math.sqrt(shape.visual_tokens))
    return arch, dataclasses.replace(shape, visual_tokens=side * side), note


@dataclass(frozen=True)
class SpeedResult:
    arch: str
    layers: int
    width_scale: float
    device: str
    baseline_ms: float
    pruned_ms: float
    bound: float                 # analytic prefill speedup of the timed model (all tokens)
    visual_tokens: int
    final_visual_tokens: int
    repeats: int
    note: str = ""
    machine: str = ""            # the CPU's or GPU's name
    threads: int = 0             # torch CPU threads during the timing
    date: str = ""               # YYYY-MM-DD
    load: float | None = None    # the machine's 1-minute load average when the timing ended
    recorded: bool = False       # True: a bundled figure recorded elsewhere, not measured by this server
    pair_speedups: tuple = ()    # baseline ÷ pruned of each alternating pair, in the order run (the spread)

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.pruned_ms

    @property
    def where(self) -> str:
        width = "full width" if self.width_scale == 1 else f"{self.width_scale:g}× width"
        return (f"{self.arch} language-model shape ({width}, {self.layers} layers, {self.visual_tokens} visual "
                f"tokens) on {self.device}")

    @property
    def provenance(self) -> str:
        """Where and when the figure was measured: recorded with the app elsewhere, or by this server."""
        machine = " ".join(word for word in (self.machine or self.device).replace("(R)", "").replace("(TM)", "").split()
                           if word not in ("CPU", "Processor"))     # "Intel(R) Xeon(R) Processor" -> "Intel Xeon"
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        where = f"{machine}, {threads}" if self.device == "cpu" else machine
        load = f", load {self.load:.1f}" if self.load is not None else ""
        return f"{'recorded' if self.recorded else 'measured by this server'} on {where}{load}, {self.date}"

    @property
    def spread(self) -> str:
        """"pairs 2.21× and 2.35×" (or "pairs from 2.1× to 2.4×"); empty when the pairs were not kept."""
        if len(self.pair_speedups) < 2:
            return ""
        ratios = sorted(self.pair_speedups)
        if len(ratios) == 2:
            return f"pairs {ratios[0]:.2f}× and {ratios[1]:.2f}×"
        return f"pairs from {ratios[0]:.2f}× to {ratios[-1]:.2f}×"

    @property
    def noisy(self) -> bool:
        """The pairs disagree by more than NOISY_SPREAD, or the figure beats its own analytic bound by more
        than that: the machine was busy while timing, so the figure says little."""
        ratios = self.pair_speedups
        spread = len(ratios) >= 2 and max(ratios) / min(ratios) > NOISY_SPREAD
        return spread or self.speedup > self.bound * NOISY_SPREAD

    def headline(self) -> str:
        noisy = "noisy, " if self.noisy else ""
        return f"**{self.speedup:.2f}×** prefill at real size ({noisy}bound {self.bound:.2f}×)"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SpeedResult":
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in fields}
        values["pair_speedups"] = tuple(values.get("pair_speedups", ()))   # JSON gives a list
        return cls(**values)

    def markdown(self, schedule: str = "") -> str:
        """The panel's text; `schedule` ("FastV · High") names what was timed in its heading."""
        note = f" ({self.note})" if self.note else ""
        named = f"{schedule}: " if schedule else ""
        return (f"### {named}{self.speedup:.2f}× faster prefill at real size\n"
                f"{self.where}{note}: baseline **{self.baseline_ms:.0f} ms**, pruned **{self.pruned_ms:.0f} ms** "
                f"({self.visual_tokens} → {self.final_visual_tokens} visual tokens), median of {self.repeats} "
                f"alternating runs after a warm-up{f' ({self.spread})' if self.spread else ''}. The analytic bound for this schedule is **{self.bound:.2f}×**, "
                f"so it reaches **{self.speedup / self.bound:.0%}** of it. Random weights: timing only, no answer "
                f"is read. *{self.provenance[0].upper() + self.provenance[1:]}"
                f"{f' with `{RECORD_COMMAND}`; press the button to measure it here' if self.recorded else ''}.*"
                f"{NOISY_WARNING if self.noisy else ''}")


def machine_name(device: str) -> str:
    """The GPU's name on CUDA; the CPU's model name (from /proc/cpuinfo) on a CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "CPU"


def load_average() -> float | None:
    """The 1-minute load average (other work sharing the CPU slows a timing down), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def schedule_key(arch: str, config: PruneConfig) -> list:
    """What a timing's speed depends on besides the machine, JSON-ready: the shape and the schedule on
    its depth; the position mode and seed do not change its speed."""
    resolved = config.resolve(flops.ARCHITECTURES[arch].layers)
    return [arch, json.loads(json.dumps(dataclasses.replace(resolved, positions="compact", seed=0).to_dict()))]


class SpeedBook:
    """SpeedResults on disk, one JSON object {key: result}; a missing or unreadable file is an empty
    book. Writes go to a temporary file renamed into place, so a reader never sees half a file."""

    def __init__(self, path: Path | str | None):
        self.path = Path(path) if path else None
        self._entries: dict[str, dict] = {}
        if self.path is not None:
            try:
                self._entries = json.loads(self.path.read_text())["results"]
            except (OSError, ValueError, KeyError, TypeError):
                self._entries = {}

    def get(self, key: str) -> SpeedResult | None:
        values = self._entries.get(key)
        return SpeedResult.from_dict(values) if isinstance(values, dict) else None

    def items(self):
        for key, values in self._entries.items():
            yield key, SpeedResult.from_dict(values)

    def put(self, key: str, result: SpeedResult):
        self._entries[key] = result.to_dict()
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, staging = tempfile.mkstemp(dir=self.path.parent, prefix=".speed-", suffix=".json")
            os.chmod(staging, 0o644)      # mkstemp's 0600 would hide a bundled file from other users
            with os.fdopen(handle, "w") as file:
                json.dump({"results": self._entries}, file, indent=1, sort_keys=True)
            os.replace(staging, self.path)
        except OSError:      # a read-only disk: the figure stays in memory
            pass


def default_book_path() -> Path | None:
    """Where live figures are kept on disk: TRANSPRUNE_SPEED_BOOK if set, else nowhere (memory only)."""
    path = os.environ.get("TRANSPRUNE_SPEED_BOOK")
    return Path(path) if path else None


class RealSizeSpeed:
    """Measures and keeps `SpeedResult`s; one measurement at a time (they share the CPU).

    `cached()` answers from this server's measurements (memory, and `book` on disk where one is named)
    and the `recorded` figures bundled with the app (same shape, schedule and kind of device). Given a
    page session, a live figure is quoted only to the session that measured it, or where nothing was
    recorded; without one (the library, the tools) the live figure comes first.
    """
    SESSIONS_KEPT = 1024    # sessions whose measured schedules are remembered, oldest forgotten first

    def __init__(self, device: str | None = None, cpu_width: float = CPU_WIDTH, book: Path | str | None = "default",
                 recorded: Path | str | None = RECORDED):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cpu_width = cpu_width
        self.book = SpeedBook(default_book_path() if book == "default" else book)
        self.recorded = SpeedBook(recorded)
        self._lock = threading.Lock()
        self._measured_by: OrderedDict[str, set[str]] = OrderedDict()   # session -> keys it measured

    @property
    def width(self) -> float:
        """The width scale timed here: full width on a GPU, `cpu_width` on a CPU."""
        return 1.0 if self.device.startswith("cuda") else self.cpu_width

    def _key(self, arch: str, config: PruneConfig) -> str:
        # The schedule's key, the width timed, this device and the CPU threads torch uses now.
        return json.dumps(schedule_key(arch, config) + [self.width, self.device, torch.get_num_threads()],
                          sort_keys=True)

    def _shape(self, family: str | None):
        return timed_shape(family, self.device.startswith("cuda"))

    def cached(self, config: PruneConfig | None, family: str | None = None,
               session: str | None = None) -> SpeedResult | None:
        """The figure to quote for `config` on `family`'s shape, or None (see the class docstring)."""
        if config is None:
            return None
        arch, _, note = self._shape(family)
        try:
            key = self._key(arch, config)
        except ValueError:       # a schedule the timed depth cannot run
            return None
        live, recorded = self.book.get(key), self._recorded(arch, config)
        own = session is None or (bool(session) and key in self._measured_by.get(session, ()))
        if live is not None and (own or recorded is None):
            return dataclasses.replace(live, note=note)   # the note is this family's
        return dataclasses.replace(recorded, recorded=True, note=note) if recorded is not None else None

    def _recorded(self, arch: str, config: PruneConfig) -> SpeedResult | None:
        schedule, kind = schedule_key(arch, config), self.device.split(":")[0]
        matches = [result for recorded_key, result in self.recorded.items()
                   if json.loads(recorded_key)[:2] == schedule and result.device.split(":")[0] == kind
                   and result.width_scale == self.width]
        if not matches:
            return None
        # The recording made with the most threads up to ours: the closest to this machine. A family timed
        # at a stand-in's shape (its own would take minutes on a CPU) carries that note.
        threads = torch.get_num_threads()
        return max(matches, key=lambda r: (r.threads <= threads, r.threads if r.threads <= threads else -r.threads))

    def _remember(self, session: str | None, key: str):
        if not session:     # the library's own calls, or a request without a session: nobody to remember
            return
        self._measured_by.setdefault(session, set()).add(key)
        self._measured_by.move_to_end(session)
        while len(self._measured_by) > self.SESSIONS_KEPT:
            self._measured_by.popitem(last=False)

    def measure(self, config: PruneConfig, progress=None, family: str | None = None,
                session: str | None = None) -> SpeedResult:
        """Baseline vs `config` on the real-size shape of `family` (cached). `progress(fraction, text)`
        is told where it is; `session` (a page session) is then quoted this figure by `cached`. Raises
        ValueError (ConfigError) for a schedule the shape cannot run."""
        arch, shape, note = self._shape(family)
        key = self._key(arch, config)
        with self._lock:
            known = self.book.get(key)
            if known is not None and not known.noisy:
                self._remember(session, key)
                return dataclasses.replace(known, note=note)
            cuda = self.device.startswith("cuda")
            width = self.width
            step = progress or (lambda fraction, text: None)
            step(0.05, "Building the real-size model (random weights)…")
            model = benchmarking.build_shape(shape, description=arch, width_scale=width, device=self.device,
                                      dtype=torch.float16 if cuda else torch.float32)
            try:
                done = [0]
                total = REPEATS        # log() is told once per alternating pair

                def log(*_, **__):
                    done[0] += 1
                    step(0.15 + 0.8 * min(done[0], total) / total, "Timing prefill, baseline and pruned alternately…")
                step(0.15, "Warming up both paths…")
                timed = benchmarking.time_schedule(model, config, shape, REPEATS, log=log)
                result = SpeedResult(arch=arch, layers=model.layers, width_scale=width, device=self.device,
                                     baseline_ms=timed["baseline_ms"], pruned_ms=timed["pruned_ms"],
                                     bound=timed["bound"], visual_tokens=model.visual_tokens,
                                     final_visual_tokens=timed["final_visual_tokens"], repeats=REPEATS, note=note,
                                     pair_speedups=tuple(round(ratio, 4) for ratio in timed["pairs"]),
                                     machine=machine_name(self.device), threads=torch.get_num_threads(),
                                     date=datetime.date.today().isoformat(), load=load_average())
            finally:
                del model
                release_memory()
            self.book.put(key, result)
            self._remember(session, key)
            step(1.0, "Done")
            return result


def release_memory():
    """Give a real-size model's memory back: to torch's CUDA cache's owner, and on Linux to the system
    (glibc keeps freed blocks of a CPU model in the process otherwise, so RSS stayed at its peak)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        pass


@dataclass
class Panel:
    result: object      # gr.Markdown
    run: object         # gr.Button


INTRO = ("### Speed at real size\nThe built-in models are too small for pruning to pay off in wall-clock time. "
         "This times the unpruned and the chosen schedule on a language model of the **selected family's real "
         f"checkpoint shape** (e.g. LLaVA-1.5-7B; random weights, timing only; {CPU_WIDTH:g}× width on a CPU), "
         "against the analytic bound.")
NOT_YET = " No figure for this schedule yet: about a minute on a 2-core CPU."


def build(initial: str = INTRO) -> Panel:
    """The "Speed at real size" panel: the chosen schedule's figure (or what it measures), and a button."""
    import gradio as gr

    with gr.Group(elem_classes=["speed-panel"]):   # a class: Gradio 6 writes a Group's elem_id on two divs
        result = gr.Markdown(initial, elem_id="speed-result")
        run = gr.Button("Measure speed at real size", elem_id="speed-run", variant="secondary", size="md")
    return Panel(result=result, run=run)


def record(path: Path = RECORDED, families=None, log=print) -> SpeedBook:
    """Measure the app's schedules on this machine into `path` (the bundled figures the page quotes
    before anyone measures): every method at High and Low on the shape of the built-in models' family
    (LLaVA-1.5-7B), TransPrune High and Low on every other shape the app times on this kind of device."""
    from transprune.adapters import UnsupportedModelError

    from .schedule import BUDGETS, METHODS, build_config

    speed = RealSizeSpeed(book=path, recorded=None)
    cuda = speed.device.startswith("cuda")
    families = families or sorted(FAMILY_ARCH, key=lambda f: f != "llava")
    done = set()
    for family in families:
        arch = timed_shape(family, cuda)[0]
        if arch in done:
            continue
        done.add(arch)
        labels = list(METHODS) if family == "llava" else ["TransPrune"]
        for label in labels:
            for budget in BUDGETS[:2]:
                config = build_config(label, budget)
                try:
                    result = speed.measure(config, family=family)
                except (ValueError, UnsupportedModelError) as error:
                    log(f"{arch} {label} {budget}: not timed ({error})")
                    continue
                log(f"{arch} {label} {budget}: {result.speedup:.2f}x (bound {result.bound:.2f}x)")
    return speed.book


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Record the real-size speed figures the app quotes before anyone "
                                                 "measures (assets/real_size_speed.json).")
    parser.add_argument("--record", action="store_true", help="measure and write the figures")
    parser.add_argument("--out", default=str(RECORDED))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if not args.record:
        parser.error("nothing to do: pass --record")
    if args.threads:
        torch.set_num_threads(args.threads)
    record(Path(args.out))
