"""What a training run may change when it resumes from its checkpoints, and what it may not.

Every checkpoint's metadata records the run's config, the fingerprint of the tokenized samples
and a hash of the selected sample ids. Resuming with other samples, another selection, or any
setting that shapes the trained function or its trajectory (model, draft, optimizer, loss, data
order, seed) would silently continue one run with another's inputs, and a pipeline re-run would
report the old draft as the new one. Those are refused, naming what changed; the length of the
run and its bookkeeping may change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from flatspec_jax.config import Config, ConfigError
from flatspec_jax.data.tokenized import TokenizedDataset
from flatspec_jax.train.optim import learning_rate_schedule

log = logging.getLogger(__name__)

COMPARED_SECTIONS = ("model", "data", "draft", "train", "seed")
"""Config sections whose settings a resumed run must share with its checkpoints, except:"""
FREE_TO_CHANGE = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
    "train.features",  # cached or recomputed target features: the same up to the cache's bfloat16 rounding
    "train.loss_chunk",  # how the loss's LM-head work is split: memory, not the result
    "data.num_workers",
    # Compared through the samples' fingerprint and the selection's hash instead, so that a moved
    # file or a renamed manifest with the same contents stays resumable:
    "model.path", "data.source", "data.responses", "data.limit", "data.max_length", "data.selection",
})


def selection_hash(selected_ids: Sequence[str] | None) -> str | None:
    """The sha256 of the selected ids, in order (None: all samples)."""
    return None if selected_ids is None else hashlib.sha256(json.dumps(list(selected_ids)).encode()).hexdigest()


def training_inputs(dataset: TokenizedDataset, selected_ids: Sequence[str] | None) -> dict[str, Any]:
    """The fingerprint of the tokenized samples and the sha256 of the selected ids (None: all samples)."""
    return {"samples": dataset.fingerprint, "selection": selection_hash(selected_ids)}


def _trajectory_settings(config: dict[str, Any]) -> dict[str, Any]:
    """{"train.learning_rate": 3e-05, ...} for the compared settings, JSON-normalised (tuples as lists)."""
    flat: dict[str, Any] = {}
    for section in COMPARED_SECTIONS:
        value = json.loads(json.dumps(config.get(section)))
        if isinstance(value, dict):
            flat.update({f"{section}.{key}": item for key, item in value.items()})
        elif section in config:
            flat[section] = value
    return {key: value for key, value in flat.items() if key not in FREE_TO_CHANGE}


def setting_changes(saved_meta: dict[str, Any], cfg: Config) -> list[str]:
    before, now = _trajectory_settings(saved_meta.get("config", {})), _trajectory_settings(cfg.to_dict())
    return [f"{key}: {before[key]!r} -> {now[key]!r}" for key in sorted(before.keys() & now.keys())
            if before[key] != now[key]]


def refuse(directory: Path, changes: list[str]) -> None:
    """Raises ConfigError naming ``changes`` (a run that may not resume from ``directory``), if any."""
    if changes:
        raise ConfigError(f"{directory} holds a draft trained with other inputs: {'; '.join(changes)}. Train into "
                          f"a new run_dir, or delete {directory} to start this run over")


def refuse_imported_head(directory: Path) -> None:
    """Raises ConfigError: ``directory`` holds a head `flatspec import` wrote (a params-only step 0)."""
    raise ConfigError(f"{directory} holds an imported draft head (step 0, parameters only): training does not start "
                      "from it, and its checkpoints would be written beside it and rotate it out. Train into another "
                      "run_dir")


def check_resumable(directory: Path, saved_meta: dict[str, Any], cfg: Config, inputs: dict[str, Any],
                    start: int) -> None:
    """Raises ConfigError listing every difference between the checkpoints in ``directory`` and this run,
    and warns when a new ``train.steps`` changes the learning rate the run resumes with at step ``start``.

    Settings and inputs a checkpoint written by an older version did not record are not compared; one
    written before training left out samples with nothing to train within ``train.row_length`` was
    trained on rows that held them, so resuming it where this run leaves some out is warned about.
    """
    refuse(directory, setting_changes(saved_meta, cfg) + input_changes(saved_meta, inputs, cfg))
    if inputs.get("left_out") and "left_out" not in (saved_meta.get("inputs") or {}):
        log.warning("%s was written before training left out samples with nothing to train within "
                    "train.row_length; %s such samples are left out now, so the rows from the step it resumes at "
                    "differ from those an uninterrupted run of that version would have trained on", directory,
                    inputs["left_out"])
    saved_steps = saved_meta.get("config", {}).get("train", {}).get("steps", cfg.train.steps)
    if saved_steps == cfg.train.steps:
        return
    before = float(learning_rate_schedule(dataclasses.replace(cfg.train, steps=saved_steps))(start))
    now = float(learning_rate_schedule(cfg.train)(start))
    if before != now:
        log.warning("%s holds step %d of a %d-step run; resumed with train.steps=%d, the learning-rate schedule is "
                    "rebuilt for %d steps: step %d trains at %.3g instead of %.3g (neither the %d-step run nor an "
                    "uninterrupted %d-step one)", directory, start, saved_steps, cfg.train.steps, cfg.train.steps,
                    start + 1, now, before, saved_steps, cfg.train.steps)


SAMPLE_SETTINGS = ("data.source", "data.responses", "data.limit", "data.max_length", "model.path")
"""The settings naming what the tokenized samples are made from (compared through the samples' fingerprint)."""


def samples_change(saved_config: dict[str, Any], cfg: Config | None) -> str:
    """Why the tokenized samples differ: the :data:`SAMPLE_SETTINGS` that changed, else the files' contents."""
    if cfg is not None:
        before, now = _flat(saved_config), _flat(cfg.to_dict())
        changed = [f"{key}: {before[key]!r} -> {now[key]!r}" for key in SAMPLE_SETTINGS
                   if key in before and before[key] != now.get(key)]
        if changed:
            return f"the tokenized samples ({'; '.join(changed)})"
    return ("the tokenized samples (the contents of the data or model files, or data.source, data.limit, "
            "data.max_length, data.responses)")


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, fields in config.items() if isinstance(fields, dict)
            for key, value in fields.items()}


def input_changes(saved_meta: dict[str, Any], inputs: dict[str, Any], cfg: Config | None = None) -> list[str]:
    """The training inputs (:func:`training_inputs`; a key left out is not compared) that differ from
    the checkpoints' ``saved_meta``; with ``cfg`` (this run's), a changed sample setting is named."""
    saved_inputs = saved_meta.get("inputs") or {}
    changes = []
    if "samples" in inputs and saved_inputs.get("samples", inputs["samples"]) != inputs["samples"]:
        changes.append(samples_change(saved_meta.get("config", {}), cfg))
    if "selection" in inputs and saved_inputs.get("selection", inputs["selection"]) != inputs["selection"]:
        changes.append("the selected samples (select.*, score.* or data.selection changed)")
    if "left_out" in inputs and saved_inputs.get("left_out", inputs["left_out"]) != inputs["left_out"]:
        changes.append(f"the samples left out for nothing to train within train.row_length "
                       f"({saved_inputs['left_out']} -> {inputs['left_out']})")
    return changes
