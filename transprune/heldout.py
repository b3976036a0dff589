"""Held-out accuracy of a model per pruning setting, read from the JSON `python -m transprune.eval` writes.

The eval CLI writes these files (a model's `ModelSpec.heldout`); the app quotes them beside a run.
Both read them through here, so the app never imports the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import PruneConfig, upgrade_saved_config


# The fields that make two resolved configs the same setting for held-out accuracy (not the seed:
# the random control draws a new keep-set per question anyway).
_SETTING_FIELDS = ("method", "prune_layers", "keep_ratios", "alpha", "criterion", "direction", "positions",
                   "pre_llm", "pre_llm_keep")


def heldout_record(path: str | Path, resolved: PruneConfig | None) -> tuple[dict, dict] | None:
    """(record of this setting, baseline record) from an eval JSON, or None if it was not measured.

    `resolved` is the config as run on the model (PruneConfig.resolve), None for the unpruned model.
    """
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    baseline = records.get("baseline")
    if baseline is None:
        return None
    if resolved is None:
        return baseline, baseline
    # Without an in-LLM stage (VisionZip alone) the position mode changes nothing.
    fields = [key for key in _SETTING_FIELDS if resolved.prune_layers or key != "positions"]
    wanted = {key: _as_tuple(resolved.to_dict()[key]) for key in fields}
    for record in records.values():
        stored = record.get("config")
        if stored and {key: _as_tuple(upgrade_saved_config(stored).get(key)) for key in fields} == wanted:
            return record, baseline
    return None


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value
