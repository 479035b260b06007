"""Plots of a run: sample flatness and the selection cut, token flatness by position, training
curves and the draft's acceptance by depth.

Every ``plot_*`` function is pure apart from writing one PNG: it takes arrays (or parsed
records), draws on its own ``matplotlib.figure.Figure`` rendered by the Agg canvas (no pyplot,
no global backend switch), writes the file atomically and returns its path. PNGs carry no
software/version metadata, so the same inputs give the same bytes on the same matplotlib.

Units: flatness is cos(p, U) in [V^-1/2, 1] (dimensionless); entropy and nll are in nats;
agreement and acceptance are fractions in [0, 1].
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from flatspec_jax.io import atomic_write
from flatspec_jax.train.metrics import HELDOUT_PREFIX

log = logging.getLogger(__name__)

DPI = 120
KEPT_COLOR = "tab:orange"
OTHER_COLOR = "tab:blue"
CUT_COLOR = "tab:red"

Records = Sequence[Mapping[str, Any]]


def _figure(width: float = 7.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI,
                                                         metadata={"Software": None}))


def _finite(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def plot_flatness_histogram(flatness: Any, path: str | Path, *, cut: float | None = None,
                            cut_label: str = "SFDD cut", kept: Any = None) -> Path:
    """Histogram of sample flatness (NaN samples left out), the kept samples overlaid, and the cut line.

    Args:
      flatness: [N] sample flatness.
      cut: flatness threshold to draw as a vertical line (None: none).
      cut_label: legend text of the line (its value is appended).
      kept: optional [N] bool mask of the selected samples.
    """
    flatness = np.asarray(flatness, dtype=np.float64)
    values = _finite(flatness)
    if values.size == 0:
        raise ValueError("no finite sample flatness to plot")
    bins = np.histogram_bin_edges(values, bins=int(np.clip(math.sqrt(values.size), 10, 60)))
    figure = _figure()
    ax = figure.add_subplot()
    ax.hist(values, bins=bins, color=OTHER_COLOR, alpha=0.55, label=f"all scored samples ({values.size})")
    if kept is not None:
        kept_values = _finite(flatness[np.asarray(kept, dtype=bool)])
        ax.hist(kept_values, bins=bins, color=KEPT_COLOR, alpha=0.8, label=f"selected ({kept_values.size})")
    if cut is not None and math.isfinite(cut):
        ax.axvline(cut, color=CUT_COLOR, linestyle="--", linewidth=1.5, label=f"{cut_label} = {cut:.4g}")
    ax.set_xlabel("sample flatness: mean cos(p, uniform) over trained tokens")
    ax.set_ylabel("samples")
    missing = int(flatness.size - values.size)
    if missing:  # a legend line of its own, without a handle
        ax.plot([], [], " ", label=f"({missing} without a trained token omitted)")
    ax.set_title("Sample flatness of the target's next-token distributions", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_flatness_vs_entropy(flatness: Any, entropy: Any, path: str | Path, *, kept: Any = None,
                             heldout: Any = None) -> Path:
    """Scatter of sample flatness (y) vs mean entropy (x), selected samples highlighted.

    Args:
      flatness, entropy: [N] per-sample means (NaN rows left out).
      kept: optional [N] bool mask of the selected samples.
      heldout: optional [N] bool mask of the held-out evaluation samples.
    """
    flatness = np.asarray(flatness, dtype=np.float64)
    entropy = np.asarray(entropy, dtype=np.float64)
    valid = np.isfinite(flatness) & np.isfinite(entropy)
    if not valid.any():
        raise ValueError("no sample with finite flatness and entropy to plot")
    kept_mask = np.zeros_like(valid) if kept is None else np.asarray(kept, dtype=bool)
    heldout_mask = np.zeros_like(valid) if heldout is None else np.asarray(heldout, dtype=bool)
    size = float(np.clip(3000 / valid.sum(), 2, 30))
    figure = _figure()
    ax = figure.add_subplot()
    groups = [(valid & ~kept_mask & ~heldout_mask, "not selected" if kept is not None else "samples",
               OTHER_COLOR, "o"),
              (valid & kept_mask, "selected", KEPT_COLOR, "o"),
              (valid & heldout_mask, "held out (evaluation)", "tab:green", "x")]
    for mask, label, color, marker in groups:
        if mask.any():
            ax.scatter(entropy[mask], flatness[mask], s=max(size, 16) if marker == "x" else size, c=color,
                       marker=marker, alpha=0.6, linewidths=1.0, label=f"{label} ({int(mask.sum())})")
    ax.set_xlabel("sample mean entropy of p (nats)")
    ax.set_ylabel("sample flatness: mean cos(p, uniform)")
    ax.set_title("Sample flatness vs entropy of the target's next-token distribution", fontsize=10)
    ax.legend(fontsize=8, markerscale=max(1.0, 20 / size) ** 0.5)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def smoothed_position_mean(sums: np.ndarray, counts: np.ndarray, window: int) -> np.ndarray:
    """Count-weighted moving mean: sum of flatness over a centred window / tokens in it (NaN where none)."""
    kernel = np.ones(window)
    total = np.convolve(sums, kernel, mode="same")
    count = np.convolve(counts, kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1e-300), np.nan)


def plot_position_flatness(position_stats: Any, path: str | Path, *, window: int | None = None) -> Path:
    """Mean token flatness by position in the sample, with a count-weighted moving mean and the token counts.

    Args:
      position_stats: [2, L]: flatness summed by position, and the token counts
        (``flatspec_jax.scoring.read_position_stats``).
      window: positions per moving-mean window (default: about L / 50, odd).
    """
    stats = np.asarray(position_stats, dtype=np.float64)
    if stats.ndim != 2 or stats.shape[0] != 2:
        raise ValueError(f"position statistics must have shape [2, L], got {stats.shape}")
    sums, counts = stats
    present = counts > 0
    if not present.any():
        raise ValueError("position statistics hold no token")
    positions = np.arange(sums.size)
    last = int(np.flatnonzero(present)[-1]) + 1
    window = window or max(1, (last // 50) | 1)
    mean = np.where(present, sums / np.where(present, counts, 1), np.nan)
    figure = _figure()
    ax = figure.add_subplot()
    counts_ax = ax.twinx()
    counts_ax.fill_between(positions[:last], counts[:last], step="mid", color="0.9", zorder=0)
    counts_ax.set_ylabel("tokens at this position (all samples)", color="0.45")
    counts_ax.tick_params(axis="y", colors="0.45")
    counts_ax.set_ylim(bottom=0)
    ax.set_zorder(counts_ax.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot(positions[present], mean[present], color=OTHER_COLOR, linewidth=0.6, alpha=0.5,
            label="mean at the position")
    if window > 1:
        ax.plot(positions[:last], smoothed_position_mean(sums, counts, window)[:last], color=CUT_COLOR,
                linewidth=1.8, label=f"count-weighted moving mean ({window} positions)")
    ax.set_xlabel("position in the sample (tokens; flatness of the prediction of the next token)")
    ax.set_ylabel("token flatness cos(p, uniform)")
    ax.set_xlim(0, max(last - 1, 1))
    ax.set_title(f"Token flatness by position ({int(counts.sum())} tokens)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(records: Records, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` over the records with a numeric ``step``, sorted by step.

    A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps its
    last value.
    """
    by_step: dict[float, float] = {}
    for record in records:
        step, value = record.get("step"), record.get(key)
        if _is_number(step) and _is_number(value):
            by_step[step] = float(value)
    steps = np.asarray(sorted(by_step), dtype=np.float64)
    return steps, np.asarray([by_step[s] for s in steps], dtype=np.float64)


def non_finite_metrics(records: Records) -> dict[str, float]:
    """The keys logged as NaN or infinite somewhere (a diverged training run), each with the first step
    that did; the plots leave those values out."""
    first: dict[str, float] = {}
    for record in records:
        step = record.get("step")
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value) and _is_number(step):
                first[key] = min(first.get(key, step), step)
    return first


def _points(steps: np.ndarray) -> dict[str, Any]:
    """Line style that still shows a series of one logged step (a line through one point draws nothing)."""
    return {"marker": "o", "markersize": 4} if steps.size < 2 else {}


def metric_keys(records: Records) -> list[str]:
    """Every key with a numeric value in some record (except ``step``), sorted."""
    return sorted({k for r in records for k, v in r.items() if k != "step" and _is_number(v)})


LOSS_LABELS = {"loss": "total loss", "loss_feature": "feature regression (SmoothL1)", "loss_token": "token term"}
LR_KEYS = ("lr", "learning_rate")


def loss_keys(records: Records) -> list[str]:
    """Loss terms (numeric keys ``loss*``, training batches; their ``eval_`` twins are held-out)."""
    keys = metric_keys(records)
    return [k for k in keys if k.startswith("loss")] or [
        k[len(HELDOUT_PREFIX):] for k in keys if k.startswith(HELDOUT_PREFIX + "loss")]


def _top_k(key: str) -> float:
    digits = key.rsplit("top", 1)[-1]
    return int(digits) if digits.isdigit() else math.inf


def agreement_keys(records: Records) -> list[str]:
    """Top-k agreement keys, held-out (``eval_top1``, ``eval_top3``, ...) and training (``top1``, ...),
    without the ``eval_`` prefix, in order of k."""
    keys = {k.removeprefix(HELDOUT_PREFIX) for k in metric_keys(records)}
    return sorted((k for k in keys if k.startswith("top")), key=lambda k: (_top_k(k), k))


def _series_or_raise(records: Records, keys: Sequence[str], what: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    series = [(k, *metric_series(records, k)) for k in keys]
    series = [s for s in series if s[1].size]
    if not series:
        raise ValueError(f"no {what} in the metrics records")
    return series


def _train_and_heldout(ax: Any, records: Records, keys: Sequence[str], label: Callable[[str], str],
                       width: Callable[[str], float] = lambda key: 1.2) -> list[np.ndarray]:
    """Each key's training series as a line and its ``eval_`` (held-out) series as markers, same colour."""
    drawn = []
    for index, key in enumerate(keys):
        color = f"C{index % 10}"
        steps, values = metric_series(records, key)
        if steps.size:
            ax.plot(steps, values, color=color, linewidth=width(key), label=f"{label(key)} (training batches)",
                    **_points(steps))
            drawn.append(values)
        steps, values = metric_series(records, HELDOUT_PREFIX + key)
        if steps.size:
            ax.plot(steps, values, "o--", color=color, markersize=4, linewidth=0.8, label=f"{label(key)} (held out)")
            drawn.append(values)
    if not drawn:
        raise ValueError(f"no {', '.join(keys)} in the metrics records")
    return drawn


def _two_and_five(value: float, _: Any = None) -> str:
    """Minor log-axis labels at 2 and 5 x 10^k only (plain numbers, not 2 x 10^-1)."""
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (2, 5) else ""


def plot_training_loss(records: Records, path: str | Path) -> Path:
    """Loss terms vs step (keys ``loss*``) as lines, their held-out values (``eval_loss*``) as markers.

    Log scale when every value is positive and they span more than a factor 20.
    """
    keys = loss_keys(records)
    if not keys:
        raise ValueError("no loss in the metrics records")
    figure = _figure()
    ax = figure.add_subplot()
    drawn = _train_and_heldout(ax, records, keys, lambda k: LOSS_LABELS.get(k, k),
                               lambda k: 1.6 if k == "loss" else 1.0)
    every = np.concatenate(drawn)
    if every.min() > 0 and every.max() / every.min() > 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per trained token)")
    ax.set_title("Draft training loss", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(figure, path)


def plot_learning_rate(records: Records, path: str | Path) -> Path:
    """Learning rate vs step (key ``lr`` or ``learning_rate``)."""
    _, steps, values = _series_or_raise(records, LR_KEYS, "learning rate")[0]
    figure = _figure(7.0, 3.5)
    ax = figure.add_subplot()
    ax.plot(steps, values, color="tab:purple", **_points(steps))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title("Learning-rate schedule", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def later_draft_keys(records: Records) -> list[str]:
    """Top-1 agreement keys of the later drafts a training-time test trains (``depth2_top1``, ...,
    held-out or training, without the ``eval_`` prefix), in order of the draft."""
    keys = {k.removeprefix(HELDOUT_PREFIX) for k in metric_keys(records)}
    later = [k for k in keys if re.fullmatch(r"depth\d+_top1", k)]
    return sorted(later, key=lambda k: int(k[len("depth"):-len("_top1")]))


def _agreement_label(key: str) -> str:
    if key == "acceptance":
        return "acceptance Σ min(p, q)"
    if key.startswith("depth"):
        return f"draft {key[len('depth'):-len('_top1')]} top-1 agreement (from its own drafts)"
    return f"top-{key[3:]} agreement"


def plot_agreement(records: Records, path: str | Path) -> Path:
    """Top-k agreement of the draft with the target vs step: held-out (``eval_top1``, ``eval_top3``, ...)
    as markers, training batches (``top1``, ...) as lines, the acceptance alpha = sum min(p, q), and
    the later drafts' top-1 agreement where ``train.unroll`` trains them (``depth2_top1``, ...)."""
    keys = agreement_keys(records)
    if not keys:
        raise ValueError("no top-k agreement (eval_top*, top*) in the metrics records")
    keys += ["acceptance", *later_draft_keys(records)]
    figure = _figure(7.0, 5.5)
    ax = figure.add_subplot()
    _train_and_heldout(ax, records, keys, _agreement_label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of trained tokens")
    ax.set_ylim(0, 1.02)
    ax.set_title("Draft agreement with the target (top-k: the target's top-1 token is in the draft's top k)",
                 fontsize=10)
    # Below the axes: the curves rise into any corner inside them.
    figure.legend(fontsize=8, loc="outside lower center", ncols=2)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_throughput(records: Records, path: str | Path) -> Path:
    """Training throughput vs step (``tokens_per_s``)."""
    _, steps, values = _series_or_raise(records, ("tokens_per_s",), "throughput (tokens_per_s)")[0]
    figure = _figure(7.0, 3.5)
    ax = figure.add_subplot()
    ax.plot(steps, values, color="tab:green", **_points(steps))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title("Training throughput", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_depth_acceptance(result: Mapping[str, Any], path: str | Path) -> Path:
    """Acceptance rate by draft depth from an ``eval.json`` result.

    Args:
      result: with ``per_depth_acceptance`` (list; index d is depth d + 1) and optionally
        ``per_depth_proposed`` (rounds that verified a draft at each depth: a depth with none is
        labelled so, not drawn as 0% acceptance), ``tau`` (tokens emitted per target forward, bonus included) and
        ``speedup``.
    """
    rates = result.get("per_depth_acceptance")
    if not isinstance(rates, (list, tuple)) or not rates or not all(_is_number(r) for r in rates):
        raise ValueError(f"per_depth_acceptance must be a non-empty list of numbers, got {rates!r}")
    proposed = result.get("per_depth_proposed")
    if not isinstance(proposed, (list, tuple)) or len(proposed) != len(rates):
        proposed = [1] * len(rates)  # an older eval.json: every depth counts as proposed
    depths = np.arange(1, len(rates) + 1)
    figure = _figure(7.0, 4.0)
    ax = figure.add_subplot()
    bars = ax.bar(depths, rates, color=OTHER_COLOR, alpha=0.8, width=0.7)
    ax.bar_label(bars, labels=[f"{r:.2f}" if n else "none\nproposed" for r, n in zip(rates, proposed)],
                 fontsize=8, padding=2)
    ax.plot(depths, [r if n else np.nan for r, n in zip(rates, proposed)], "o-", color="tab:blue", markersize=3,
            linewidth=1)
    ax.set_xticks(depths)
    ax.set_xlabel("draft depth (position of the drafted token within a round)")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.08)
    parts = []
    if _is_number(result.get("tau")):
        parts.append(f"τ = {result['tau']:.2f} tokens / round")
    if _is_number(result.get("speedup")):
        parts.append(f"speedup {result['speedup']:.2f}×")
    ax.set_title("Acceptance by draft depth" + (f" ({', '.join(parts)})" if parts else ""), fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(figure, path)
