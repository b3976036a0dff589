"""`python -m transprune.doctor` and the app's start-up check built on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import transformers

from components import health
from transprune import compat, doctor

ROOT = Path(__file__).resolve().parent.parent


def _report(ok=True, tested=True, version=transformers.__version__):
    versions = {**doctor.versions(), "transformers": version}
    check = doctor.Check("llava: high vs reference", ok, "" if ok else "pruned decoding differs from the reference.")
    return doctor.Report(versions=versions, device="cpu", transformers_tested=tested, checks=[check])


def test_doctor_cli_passes_on_this_installation():
    done = subprocess.run([sys.executable, "-m", "transprune.doctor", "--json"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["versions"]["transformers"] == transformers.__version__
    assert report["transformers_tested"] == compat.transformers_is_tested()
    names = [check["name"] for check in report["checks"]]
    assert names == ["llava: keep-all", "llava: high vs reference", "qwen2_5_vl: keep-all",
                     "qwen2_5_vl: high vs reference"]
    assert all(check["ok"] for check in report["checks"])


def test_doctor_human_output_names_versions_and_range(capsys, monkeypatch):
    monkeypatch.setattr(doctor, "self_check", lambda: _report(tested=False, version="5.99.0"))
    assert doctor.main([]) == 0               # untested but working: a warning, not a failure
    out = capsys.readouterr().out
    assert "5.99.0 is OUTSIDE the tested range " + compat.tested_range() in out
    assert "WARNING" in out and out.strip().endswith("OK")
    monkeypatch.setattr(doctor, "self_check", lambda: _report(ok=False))
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] llava: high vs reference" in out and out.strip().endswith("FAILED")


def test_report_warning_lines():
    assert _report().warning is None
    failed = _report(ok=False).warning
    assert "Self-check failed" in failed and "pip install -r requirements.txt" in failed
    untested = _report(tested=False, version="5.99.0").warning
    assert "5.99.0 is outside the tested range" in untested and "\n" not in untested


def test_startup_check_runs_in_the_background_and_sets_the_banner():
    import threading
    release = threading.Event()

    def slow_failing_check():
        release.wait(10)
        return _report(ok=False)
    check = health.StartupCheck(slow_failing_check)
    assert not check.wait(0.05), "the check must not block whoever started it"
    release.set()
    banner = check.banner()
    assert banner["visible"] is True and "Self-check failed" in banner["value"]

    quiet = health.StartupCheck(lambda: _report()).banner()
    assert quiet["visible"] is False and quiet["value"] == ""

    def crashing():
        raise OSError("disk full")
    crashed = health.StartupCheck(crashing).banner()
    assert crashed["visible"] is True and "could not run (OSError: disk full)" in crashed["value"]


def test_the_app_wires_the_banner_to_page_load():
    import app as app_module

    check = health.StartupCheck(lambda: _report(tested=False, version="5.99.0"))
    built = app_module.build_demo("tiny-llava", self_check=check)
    config = built.demo.config
    warning_id = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "health-warning")
    loads = [d for d in config["dependencies"] if any(t[1] == "load" for t in d["targets"])]
    assert any(warning_id in d["outputs"] for d in loads)
    assert health.startup_check() is health.startup_check()   # one shared check per process


def test_the_reference_check_allows_generate_to_stop_at_eos():
    """generate() stops at the model's eos; the reference always runs its steps. A model whose first
    greedy token is eos (random weights can be) must still pass, and a wrong first token still fail."""
    from PIL import Image

    from transprune import PruneConfig, adapters
    from transprune.doctor import _pruned_decode_matches_reference
    from transprune.reference import Reference

    model, processor = adapters.by_family("llava").build_tiny(layers=16, attn_implementation="sdpa")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it ?"}]}],
        add_generation_prompt=True)
    inputs = dict(processor(images=[Image.new("RGB", (96, 64), (200, 30, 30))], text=[prompt], return_tensors="pt"))
    resolved = PruneConfig.preset("high").resolve(16, "compact")
    first = Reference(model, resolved).run(inputs, max_new_tokens=2)["ids"][0]
    model.generation_config.eos_token_id = first          # pruned generation now stops after one token
    check = _pruned_decode_matches_reference(model, inputs, "high")
    assert check.ok, check.detail
    model.generation_config.eos_token_id = None
