"""`python -m transprune.doctor`: is this installation safe to prune with?

Prints the versions that matter (torch, transformers, gradio), the device, whether transformers is
inside the range CI tests, then runs a self-check of a few seconds on tiny offline models of both
rotary kinds (1-D RoPE: LLaVA; M-RoPE: Qwen2.5-VL):

- keep-all pruning reproduces the unpruned logits and greedy ids bit for bit;
- pruned prefill and every decode step match the slow, hook-free reference (transprune.reference).

Exit status 0 when everything passes (an untested but working transformers is a warning, not a
failure), 1 otherwise. The app runs the same `self_check()` once at start-up, in the background.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import compat

NEW_TOKENS = 4


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    versions: dict
    device: str
    transformers_tested: bool
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def warning(self) -> str | None:
        """One line for a page banner: None when the check passed on a tested transformers."""
        failed = [check for check in self.checks if not check.ok]
        if failed:
            return (f"Self-check failed with transformers {self.versions['transformers']}: {failed[0].detail} "
                    f"Pruned answers may be wrong; install the tested set (pip install -r requirements.txt).")
        if not self.transformers_tested:
            return (f"transformers {self.versions['transformers']} is outside the tested range "
                    f"({compat.tested_range()}); the self-check passed, but results are not guaranteed.")
        return None

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "warning": self.warning}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _transprune_version() -> str:
    from . import __version__
    return __version__


def versions() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": compat.installed_transformers(), "gradio": _version("gradio"),
            "transprune": _transprune_version()}


def _keep_all_is_identical(model, inputs) -> Check:
    import transprune

    with torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        with transprune.apply(model, "off") as pruner:
            pruned_logits = model(**inputs).logits
            pruned_ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    if pruner.trace is None:
        return Check("keep-all", False, "the pruner lost its trace during generation.")
    if not (torch.equal(logits, pruned_logits) and torch.equal(ids, pruned_ids)):
        return Check("keep-all", False, "keep-all pruning changed the logits or the generated ids.")
    return Check("keep-all", True, "logits and greedy ids identical to the unpruned model")


def _eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _pruned_decode_matches_reference(model, inputs, preset: str) -> Check:
    import transprune
    from .config import PruneConfig
    from .reference import Reference
    from .resolve import for_model as resolve_for_model

    name = f"{preset} vs reference"
    config = PruneConfig.preset(preset)
    resolved = resolve_for_model(model, config)
    expected = Reference(model, resolved).run(inputs, max_new_tokens=NEW_TOKENS)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    trace = pruner.trace
    if trace is None:
        return Check(name, False, "the pruner lost its trace during generation.")
    if not all(torch.equal(stage.kept, kept) for stage, kept in zip(trace.stages, expected["kept"], strict=True)):
        return Check(name, False, "the pruned prefill kept other tokens than the reference.")
    ids = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    # generate() stops at the model's end-of-sequence token; the reference always runs NEW_TOKENS steps.
    # (Seeded random weights can make eos the first token: they depend on the global generator, which
    # another thread, e.g. the app's, may reseed while this model is built.)
    steps = len(ids)
    error = float((torch.stack(output.logits)[:, 0] - expected["step_logits"][:steps].float()).abs().max())
    if ids != expected["ids"][:steps] or (steps < NEW_TOKENS and ids[-1] not in _eos_ids(model)) or error > 1e-3:
        return Check(name, False, f"pruned decoding differs from the reference (ids {ids} vs {expected['ids']}, "
                                  f"max logit difference {error:.2e}).")
    return Check(name, True, f"kept sets and {NEW_TOKENS} decode steps match (max logit diff {error:.1e})")


def self_check() -> Report:
    """Versions plus the keep-all and reference checks on tiny LLaVA and Qwen2.5-VL models (seconds)."""
    from PIL import Image

    from . import adapters

    start = time.perf_counter()
    report = Report(versions=versions(), device="cuda" if torch.cuda.is_available() else "cpu",
                    transformers_tested=compat.transformers_is_tested())
    image = Image.new("RGB", (96, 64), (40, 40, 40))
    image.paste((220, 30, 30), (10, 10, 40, 40))
    for family in ("llava", "qwen2_5_vl"):   # 1-D RoPE and M-RoPE
        try:
            model, processor = adapters.by_family(family).build_tiny(layers=16, attn_implementation="sdpa")
            prompt = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it ?"}]}],
                add_generation_prompt=True)
            inputs = dict(processor(images=[image], text=[prompt], return_tensors="pt"))
            checks = [_keep_all_is_identical(model, inputs), _pruned_decode_matches_reference(model, inputs, "high")]
        except Exception as error:  # a self-check reports, it does not crash its caller (the app)
            checks = [Check("run", False, f"{type(error).__name__}: {error}")]
        for check in checks:
            check.name = f"{family}: {check.name}"
        report.checks += checks
    report.seconds = time.perf_counter() - start
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Check that this installation prunes correctly.")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = self_check()
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0 if report.ok else 1
    for package, version in report.versions.items():
        print(f"{package:<13} {version}")
    print(f"{'device':<13} {report.device}")
    tested = "inside" if report.transformers_tested else "OUTSIDE"
    print(f"transformers {report.versions['transformers']} is {tested} the tested range {compat.tested_range()}")
    for check in report.checks:
        print(f"  [{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    print(f"self-check took {report.seconds:.1f} s")
    if report.warning:
        print(f"WARNING: {report.warning}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
