"""Which scored samples train the draft: the SFDD rule and its baselines, and the selection manifest.

SFDD (arXiv 2601.18902) keeps the top ``keep`` fraction of samples by sample flatness: the
target's next-token distribution is flatter there, which is where a draft has the most to
learn. The baselines rank by the opposite end (``flatness_low``), by mean entropy or mean
nll, pick uniformly at random (seeded), or keep everything (``all``).

Semantics, shared by every rule:

* Held-out tail. The last ``heldout`` samples in file order are the evaluation set (the
  training pipeline computes held-out draft metrics on them) and are never selected. The
  remaining samples are the *candidates*.
* Eligibility. A candidate is *eligible* when it has at least one trained token
  (``n_trained_tokens > 0``) and, for a score rule, a finite score. A sample without a trained
  token has NaN flatness/entropy/nll and would contribute nothing to training, so no rule
  except ``all`` selects it -- not ``random`` either, so that every rule at the same ``keep``
  keeps the same number of samples (a fair ablation).
* Count. ``count = max(1, round_half_up(keep * eligible))``, computed exactly on the decimal
  value of ``keep`` as written (``0.35 x 10 = 3.5 -> 4``, not a binary-float ``3.4999...``).
  Examples: 7 eligible, keep 0.5 -> 4; 10, keep 0.25 -> 3 (2.5 rounds up); 3, keep 0.1 -> 1
  (0.3 rounds to 0, raised to the minimum of 1); 10, keep 1.0 -> 10.
* ``all`` keeps every candidate, eligible or not, whatever ``keep`` says: it is the
  unfiltered training set (the same samples as ``data.selection: null``). Its manifest records
  ``keep: 1.0``.
* Ties. Scores are ranked with a stable sort, so equal scores are broken by file order: the
  earlier sample is kept first.
* Order. The selected ids are returned (and written) in file order, not score order, so the
  training data order never depends on the scores.
* ``seed`` only matters for ``random``; the manifest records ``seed: null`` for the other
  rules, and changing it does not make their manifest stale.

The manifest (``selection.json``) is JSON with sorted keys and no timestamps or varying
absolute paths, so the same scores and settings give a byte-identical file; it records the
SHA-256 of the scores file's bytes, which is how a re-run knows it is current.
"""

from __future__ import annotations

import dataclasses
import json
import math
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pyarrow as pa

from flatspec_jax.config import ConfigError, SelectRule
from flatspec_jax.fingerprint import file_sha256
from flatspec_jax.io import atomic_write_json

SCORES_FILE = "scores.parquet"
"""The scoring stage's output in a run directory."""
SELECTION_FILE = "selection.json"
MANIFEST_VERSION = 1

RULES: tuple[str, ...] = get_args(SelectRule)
SCORE_COLUMN: dict[str, str] = {"sfdd": "flatness", "flatness_low": "flatness", "entropy": "entropy",
                                "nll": "nll"}
"""Score rules -> the scores.parquet column they rank by."""
HIGHEST_FIRST: dict[str, bool] = {"sfdd": True, "flatness_low": False, "entropy": True, "nll": True}
SUMMARY_COLUMNS = ("flatness", "entropy", "nll", "n_tokens", "n_trained_tokens")
COUNT_COLUMNS = ("n_tokens", "n_trained_tokens")
REQUIRED_COLUMNS = ("id", *SUMMARY_COLUMNS)

HELDOUT_NOTE = ("The last `heldout` samples of scores.parquet in file order (`heldout_ids`) are the "
                "evaluation set: they are never selected, whatever the rule.")


class ManifestError(ValueError):
    """A selection manifest is unreadable or invalid; the message names the file and the key at fault."""


class ScoresError(ValueError):
    """A scores file nothing can be selected from (a missing column, no eligible sample); names the file."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_samples`.

    Attributes:
      rule: the rule applied.
      keep: the fraction asked for (1.0 for ``all``, which ignores it).
      seed: the random rule's seed; None for the deterministic rules.
      heldout: samples in the held-out tail.
      total: samples in the scores table.
      candidates: samples outside the held-out tail.
      eligible: candidates the rule could select (see the module docstring).
      indices: row indices of the selected samples, ascending (file order).
      ids: their sample ids, in the same (file) order.
      heldout_ids: ids of the held-out tail, in file order.
      score_column: the column ranked by; None for ``random`` and ``all``.
      cut: score of the last sample kept in rank order (the threshold); None without a score.
      summary: statistics of the kept samples vs all candidates (JSON-ready; see :func:`summarize`).
    """

    rule: str
    keep: float
    seed: int | None
    heldout: int
    total: int
    candidates: int
    eligible: int
    indices: tuple[int, ...]
    ids: tuple[str, ...]
    heldout_ids: tuple[str, ...]
    score_column: str | None
    cut: float | None
    summary: dict[str, Any]

    @property
    def count(self) -> int:
        return len(self.indices)


def round_half_up(value: float | Decimal) -> int:
    """Nearest integer, halves rounded up: 3.5 -> 4, 2.5 -> 3, 2.4 -> 2."""
    return int(Decimal(value).to_integral_value(rounding=ROUND_HALF_UP))


def keep_count(keep: float, eligible: int) -> int:
    """``max(1, round_half_up(keep * eligible))`` in exact decimal arithmetic on ``keep`` as written
    (``repr``), capped at ``eligible``; 0 only when nothing is eligible."""
    if eligible <= 0:
        return 0
    return min(eligible, max(1, round_half_up(Decimal(repr(float(keep))) * eligible)))


def normalized_settings(rule: str, keep: float, seed: int | None) -> tuple[float, int | None]:
    """(keep, seed) as recorded in a manifest: ``all`` ignores keep (1.0), only ``random`` uses the seed."""
    return (1.0 if rule == "all" else float(keep)), (int(seed) if rule == "random" else None)


def _check_settings(rule: str, keep: float, seed: int | None, heldout: int) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {', '.join(RULES)}")
    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    if rule == "random" and (seed is None or isinstance(seed, bool)):
        raise ValueError(f"the random rule needs an integer seed, got {seed!r}")
    if isinstance(heldout, bool) or not isinstance(heldout, (int, np.integer)) or heldout < 0:
        raise ValueError(f"heldout must be an integer >= 0, got {heldout!r}")


def select_samples(table: pa.Table, rule: str, keep: float, seed: int | None, heldout: int) -> Selection:
    """Applies a selection rule to a scores table (one row per sample, file order).

    Args:
      table: scores.parquet's table; needs columns ``id``, ``flatness``, ``entropy``, ``nll``,
        ``n_tokens`` and ``n_trained_tokens``.
      rule: sfdd | flatness_low | entropy | nll | random | all.
      keep: fraction of the eligible candidates kept, in (0, 1] (ignored by ``all``).
      seed: seed of ``numpy.random.default_rng`` for ``random`` (ignored otherwise).
      heldout: the last ``heldout`` rows form the evaluation set and are never selected.

    Raises:
      ValueError: for a bad setting, a missing column, duplicate ids, a held-out tail that
        leaves no candidate, or a score rule with no eligible candidate.
    """
    _check_settings(rule, keep, seed, heldout)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"scores table lacks column {missing[0]!r} (has {', '.join(table.column_names)})")
    ids = np.asarray(table["id"].to_pylist(), dtype=object)
    total = len(ids)
    if len(set(ids.tolist())) != total:
        unique, counts = np.unique(ids.astype(str), return_counts=True)
        duplicate = str(unique[counts > 1][0])
        raise ValueError(f"scores contain sample id {duplicate!r} more than once; a selection by id "
                         "would be ambiguous")
    candidates = total - heldout
    if candidates <= 0:
        raise ConfigError(f"data.heldout={heldout} leaves no candidate out of {total} scored samples")
    columns = {c: _column(table, c) for c in SUMMARY_COLUMNS}
    trained = columns["n_trained_tokens"][:candidates] > 0
    keep_recorded, seed_recorded = normalized_settings(rule, keep, seed)
    score_column = SCORE_COLUMN.get(rule)
    cut = None
    if rule == "all":
        chosen = np.arange(candidates)
        eligible = candidates
    else:
        mask = trained.copy()
        if score_column is not None:
            mask &= np.isfinite(columns[score_column][:candidates])
        pool = np.flatnonzero(mask)
        eligible = len(pool)
        if eligible == 0:
            raise ValueError(f"none of the {candidates} candidate samples has a trained token and a finite "
                             f"{score_column or 'score'}; nothing to select")
        count = keep_count(keep, eligible)
        if rule == "random":
            chosen = pool[np.random.default_rng(seed).choice(eligible, size=count, replace=False)]
        else:
            scores = columns[score_column][pool]
            order = np.argsort(-scores if HIGHEST_FIRST[rule] else scores, kind="stable")
            ranked = pool[order[:count]]
            cut = float(columns[score_column][ranked[-1]])
            chosen = ranked
    chosen = np.sort(chosen)
    return Selection(
        rule=rule, keep=keep_recorded, seed=seed_recorded, heldout=int(heldout), total=total,
        candidates=candidates, eligible=int(eligible), indices=tuple(int(i) for i in chosen),
        ids=tuple(str(i) for i in ids[chosen]), heldout_ids=tuple(str(i) for i in ids[candidates:]),
        score_column=score_column, cut=cut, summary=summarize(columns, chosen, candidates))


def _column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 (nulls -> NaN)."""
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=np.float64)


def _stats(values: np.ndarray) -> dict[str, float | None]:
    """mean/median/min/max of the finite values (None when there are none: JSON has no NaN)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "min": float(finite.min()),
            "max": float(finite.max())}


def summarize(columns: dict[str, np.ndarray], chosen: np.ndarray, candidates: int) -> dict[str, Any]:
    """Statistics of the kept samples vs all candidates, per column, plus trained-token totals.

    NaN scores (samples without a trained token) are left out of the score statistics.
    """

    def group(rows: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {c: _stats(columns[c][rows]) for c in SUMMARY_COLUMNS}
        for name in COUNT_COLUMNS:  # token counts: integer extremes
            out[name].update({k: int(out[name][k]) for k in ("min", "max") if out[name][k] is not None})
        out["samples"] = len(rows)
        out["trained_tokens"] = int(columns["n_trained_tokens"][rows].sum())
        out["tokens"] = int(columns["n_tokens"][rows].sum())
        return out

    kept, pool = group(chosen), group(np.arange(candidates))
    fraction = kept["trained_tokens"] / pool["trained_tokens"] if pool["trained_tokens"] else None
    return {"kept": kept, "candidates": pool, "trained_tokens_kept_fraction": fraction}


def _recorded_path(scores_path: Path, manifest_path: Path) -> str:
    """The scores path relative to the manifest's directory (the run directory) when inside it,
    so the manifest does not depend on where the run directory lives; otherwise as given."""
    base, resolved = manifest_path.parent.resolve(), scores_path.resolve()
    return resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(scores_path)


def manifest_dict(selection: Selection, scores_path: str | Path, manifest_path: str | Path) -> dict[str, Any]:
    """The manifest's content (see :func:`write_manifest`); hashes the scores file."""
    scores_path = Path(scores_path)
    return {
        "version": MANIFEST_VERSION,
        "rule": selection.rule,
        "keep": selection.keep,
        "seed": selection.seed,
        "count": selection.count,
        "total": selection.total,
        "candidates": selection.candidates,
        "eligible": selection.eligible,
        "heldout": selection.heldout,
        "heldout_ids": list(selection.heldout_ids),
        "heldout_note": HELDOUT_NOTE,
        "ids": list(selection.ids),
        "score_column": selection.score_column,
        "cut": selection.cut,
        "scores_sha256": file_sha256(scores_path),
        "scores_path": _recorded_path(scores_path, Path(manifest_path)),
        "summary": selection.summary,
    }


def write_manifest(path: str | Path, selection: Selection, scores_path: str | Path) -> Path:
    """Writes the selection manifest atomically; the same scores and settings give identical bytes.

    Keys: ``rule``, ``keep``, ``seed`` (null unless random), ``count``, ``total``, ``candidates``,
    ``eligible``, ``heldout``, ``heldout_ids`` and ``heldout_note`` (the evaluation set), ``ids``
    (kept, file order), ``score_column``, ``cut`` (score of the last kept sample in rank order;
    null for random/all), ``scores_sha256`` (of the scores file's bytes), ``scores_path`` (relative
    to the manifest's directory when inside it, e.g. ``scores.parquet``), ``summary`` (kept vs
    candidate statistics: mean/median/min/max per column, sample and token totals) and ``version``.
    """
    return atomic_write_json(path, manifest_dict(selection, scores_path, path))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_KEY_CHECKS: dict[str, tuple[Any, str]] = {
    "version": (lambda v: v == MANIFEST_VERSION, f"must be {MANIFEST_VERSION}"),
    "rule": (lambda v: v in RULES, f"must be one of {', '.join(RULES)}"),
    "keep": (lambda v: _is_number(v) and 0 < v <= 1, "must be a number in (0, 1]"),
    "seed": (lambda v: v is None or _is_int(v), "must be an integer or null"),
    "count": (lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    "total": (lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    "candidates": (lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    "eligible": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
    "heldout": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
    "heldout_ids": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v), "must be a list of strings"),
    "ids": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v), "must be a list of strings"),
    "score_column": (lambda v: v is None or v in SUMMARY_COLUMNS, "must be a score column or null"),
    "cut": (lambda v: v is None or _is_number(v), "must be a number or null"),
    "scores_sha256": (lambda v: isinstance(v, str) and len(v) == 64
                      and all(c in "0123456789abcdef" for c in v), "must be 64 lowercase hex digits"),
    "scores_path": (lambda v: isinstance(v, str) and v != "", "must be a non-empty string"),
    "summary": (lambda v: isinstance(v, dict), "must be a mapping"),
}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads and validates a selection manifest.

    Raises:
      ManifestError: naming the file and the missing or invalid key (or the JSON error).
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except OSError as err:
        raise ManifestError(f"cannot read selection manifest {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    for key, (check, message) in _KEY_CHECKS.items():
        if key not in manifest:
            raise ManifestError(f"{path}: missing key {key!r}")
        if not check(manifest[key]):
            raise ManifestError(f"{path}: key {key!r} {message}, got {_short(manifest[key])}")
    ids = manifest["ids"]
    if len(ids) != manifest["count"]:
        raise ManifestError(f"{path}: key 'ids' has {len(ids)} entries but 'count' says {manifest['count']}")
    if len(set(ids)) != len(ids):
        raise ManifestError(f"{path}: key 'ids' lists a sample more than once")
    if len(manifest["heldout_ids"]) != manifest["heldout"]:
        raise ManifestError(f"{path}: key 'heldout_ids' has {len(manifest['heldout_ids'])} entries but "
                            f"'heldout' says {manifest['heldout']}")
    if set(ids) & set(manifest["heldout_ids"]):
        raise ManifestError(f"{path}: key 'ids' selects a held-out sample")
    if manifest["candidates"] + manifest["heldout"] != manifest["total"]:
        raise ManifestError(f"{path}: key 'candidates' + 'heldout' does not equal 'total'")
    if manifest["count"] > manifest["candidates"]:
        raise ManifestError(f"{path}: key 'count' exceeds 'candidates'")
    return manifest


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def manifest_is_current(path: str | Path, scores_path: str | Path, rule: str, keep: float, seed: int | None,
                        heldout: int) -> bool:
    """Whether ``path`` is a valid manifest made from exactly these scores (by content hash) and settings.

    A missing or invalid manifest is not current (the stage then rewrites it). ``keep`` and
    ``seed`` are compared as recorded (:func:`normalized_settings`), so a new seed does not make a
    deterministic rule's manifest stale.
    """
    try:
        manifest = read_manifest(path)
    except ManifestError:
        return False
    return Path(scores_path).is_file() and not selection_changes(manifest, scores_path, rule, keep, seed, heldout)


def selection_changes(manifest: dict[str, Any], scores_path: str | Path | None, rule: str, keep: float,
                      seed: int | None, heldout: int) -> list[str]:
    """What differs between a manifest and these settings (["select.keep: 0.5 -> 0.25", ...]), and
    one about the scores when ``scores_path`` (None: not compared) holds other scores than it was made from."""
    keep_recorded, seed_recorded = normalized_settings(rule, keep, seed)
    now = {"select.rule": rule, "select.keep": keep_recorded, "seed": seed_recorded, "data.heldout": heldout}
    recorded = {"select.rule": manifest["rule"], "select.keep": manifest["keep"], "seed": manifest["seed"],
                "data.heldout": manifest["heldout"]}
    changes = [f"{key}: {recorded[key]!r} -> {value!r}" for key, value in now.items() if recorded[key] != value]
    if scores_path is not None and manifest["scores_sha256"] != file_sha256(scores_path):
        changes.append(f"the scores ({scores_path} holds other scores than the selection was made from)")
    return changes
