"""The report's figures: per-bundle bars, confusion matrices, ROC and cleared-vs-recall curves, as PNG for the
HTML page.

matplotlib ``Figure`` objects are used directly (no pyplot): they render with Agg and never open a window, and
matplotlib is imported only when a figure is made, so the console path never pays for it.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from xfeat.report.tables import ONE_CLASS, Table, table_title

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xfeat.learn.evaluation import ConfigurationResult

DPI = 100


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # imported here: the console path never pays for matplotlib

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def png_base64(fig: Figure) -> str:
    """The figure as a base64 PNG, for a ``data:`` URL."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _mpl_text(text: str) -> str:
    """Literal text for matplotlib: a ``$`` in a bundle name must not start mathtext."""
    return text.replace("$", r"\$")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def bundle_bars(table: Table) -> Figure:
    """Balanced accuracy per bundle (and Overall) for each method; one-class bundles hatched."""
    rows = [r for r in table.rows if r.n is not None]
    k = len(table.methods)
    fig = _figure(min(11.0, max(6.0, 0.12 * k * len(rows) + 2.5)), 3.4)
    ax = fig.subplots()
    x = np.arange(len(rows))
    step = 0.8 / k
    for j, (method, color) in enumerate(zip(table.methods, _colors(k))):
        cells = [r.cells[j] for r in rows]
        values = [0.0 if math.isnan(c.value) else c.value for c in cells]
        bars = ax.bar(x - 0.4 + step * (j + 0.5), values, step, color=color, label=_mpl_text(method))
        for bar, cell in zip(bars, cells):
            if cell.single_class:
                bar.set_hatch("///")
                bar.set_edgecolor("white")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.axvline(len(rows) - 1.5, color="grey", linewidth=0.8)  # bundles | Overall
    labels = [_mpl_text(r.label) + (ONE_CLASS if any(c.single_class for c in r.cells) else "") for r in rows]
    crowded = len(rows) > 6
    ax.set_xticks(x, labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(0, 105)
    ax.set_ylabel("balanced accuracy (%)")
    ax.set_title(_mpl_text(table_title(table)), fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def confusion_matrices(group: Sequence[ConfigurationResult]) -> Figure:
    """The overall (summed over folds) confusion matrix of each method, side by side; colour = row rate."""
    fig = _figure(2.3 * len(group) + 0.4, 2.6)
    axes = np.atleast_1d(fig.subplots(1, len(group)))
    for ax, r in zip(axes, group):
        c = r.overall
        counts = np.array([[c.tn, c.fp], [c.fn, c.tp]])
        totals = counts.sum(axis=1, keepdims=True)
        rates = np.divide(counts, totals, out=np.zeros((2, 2)), where=totals > 0)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{n}\n{100 * rates[i, j]:.0f}%", ha="center", va="center", fontsize=9,
                    color="white" if rates[i, j] > 0.6 else "black")
        ax.set_xticks([0, 1], ["normal", "abnormal"], fontsize=8)
        ax.set_yticks([0, 1], ["normal", "abnormal"], fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_title(_mpl_text(f"{r.config.method}: BA {100 * c.balanced_accuracy:.1f}"), fontsize=9)
    axes[0].set_ylabel("true", fontsize=8)
    return fig


def roc_curves(group: Sequence[ConfigurationResult]) -> Figure:
    """ROC of the pooled out-of-fold scores, one curve per method, AUROC in the legend."""

    fig = _figure(4.6, 4.2)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    for r, color, fpr, tpr in _pooled_rocs(group, "scores"):
        ax.plot(fpr, tpr, color=color, label=_mpl_text(f"{r.config.method} (AUROC {r.overall_auroc:.3f})"))
    _finish(ax, group, (0, 1), (0, 1.01), "false positive rate (1 - TNR)", "true positive rate (abnormal recall)",
            fontsize=8, loc="lower right")
    return fig


def _pooled_rocs(group: Sequence[ConfigurationResult], scores: str):
    """(result, colour, fpr, tpr) of each result's pooled out-of-fold ``scores`` (an attribute name), skipping
    results that hold one class only."""
    from sklearn.metrics import roc_curve

    for r, color in zip(group, _colors(len(group))):
        y = np.asarray(r.features.y)
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, getattr(r, scores))
            yield r, color, fpr, tpr


def _finish(ax, group: Sequence[ConfigurationResult], xlim, ylim, xlabel: str, ylabel: str, **legend) -> None:
    """Limits, labels, the group's title, and a legend when something is labelled."""
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_mpl_text(f"{group[0].config.backbone} / {group[0].config.clf}"), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**legend)


def cleared_curves(group: Sequence[ConfigurationResult]) -> Figure:
    """Normal images cleared against abnormal recall, one curve per method from the pooled out-of-fold scores;
    the nested held-out operating points marked, with their bundle-bootstrap intervals as error bars."""
    fig = _figure(5.6, 4.2)
    ax = fig.subplots()
    for r, color, fpr, tpr in _pooled_rocs(group, "screening_scores"):
        ax.plot(100 * tpr, 100 * (1 - fpr), color=color, linewidth=1.2, label=_mpl_text(r.config.method))
        for point, marker in zip(r.operating, "os^Dv"):
            if np.isnan(point.recall):
                continue
            (rl, rh), (cl, ch) = point.interval("tpr"), point.interval("tnr")
            x, yy = 100 * point.recall, 100 * point.cleared
            ax.errorbar(x, yy, xerr=[[x - 100 * rl], [100 * rh - x]], yerr=[[yy - 100 * cl], [100 * ch - yy]],
                        color=color, marker=marker, markersize=6, capsize=2, linewidth=0.8)
    for point, marker in zip(group[0].operating, "os^Dv"):
        ax.axvline(100 * point.target, color="grey", linewidth=0.7, linestyle=":")
        ax.plot([], [], color="black", marker=marker, linestyle="none",
                label=f"held out, target {100 * point.target:g}%")
    _finish(ax, group, (50, 101.5), (0, 101), "abnormal recall (%)", "normal cleared without a look (%)",
            fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


__all__ = ["bundle_bars", "cleared_curves", "confusion_matrices", "png_base64", "roc_curves"]
