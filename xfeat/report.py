"""Show evaluation results: the paper's Table 1 on the console, CSV/JSON records, and one HTML report.

The library never prints: ``format_table(s)`` return strings, ``write_results`` writes files. Every
file is written to a temporary name and renamed, so an interrupted run never leaves half a file.
Plots use matplotlib ``Figure`` objects directly (no pyplot), which render with Agg and never open a window.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xfeat import __version__

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xfeat.evaluate import ConfigurationResult
    from xfeat.screening import ScreeningOutcome

WIDTH = 100  # console columns a table must fit (6 methods)
BEST = "*"
ONE_CLASS = "†"
MISSING = "–"
BANNER = "RANDOM WEIGHTS: not ImageNet features"
ONE_CLASS_NOTE = (f"{ONE_CLASS} one class in this bundle: the rate shown is TNR (normal only) / "
                  "TPR (abnormal only)")
PREDICTION_COLUMNS = ("backbone", "method", "clf", "layer", "path", "bundle", "label", "score", "decision")
DPI = 100


# ---------------------------------------------------------------- the table model (text and HTML share it)

@dataclass
class Cell:
    text: str
    value: float = math.nan  # what "best" compares: the displayed (rounded) number
    single_class: str = ""  # "normal only" / "abnormal only" marks a one-class bundle
    best: bool = False

    @property
    def marks(self) -> str:
        return (ONE_CLASS if self.single_class else "") + (BEST if self.best else "")


@dataclass
class Row:
    label: str
    cells: list[Cell]
    n: int | None = None  # images in the bundle (HTML only)
    abnormal: int | None = None
    rule_above: bool = False
    marked: bool = True  # False: cells never carry marks and may use the mark space (the CI row)


@dataclass
class Table:
    backbone: str
    clf: str
    layer: str
    size: str
    weights: str
    random_weights: bool
    methods: list[str]
    rows: list[Row] = field(default_factory=list)

    @property
    def has_one_class(self) -> bool:
        return any(c.single_class for r in self.rows for c in r.cells)


def _group(results: Sequence[ConfigurationResult]) -> dict[tuple[str, str, str, str], list[ConfigurationResult]]:
    """Results by (backbone, clf, layer, size) in order of appearance: one table each, methods as columns."""
    groups: dict[tuple[str, str, str, str], list] = {}
    for r in results:
        c = r.config
        groups.setdefault((c.backbone, c.clf, c.layer, c.size), []).append(r)
    return groups


def _percent_cell(value: float, single_class: str = "") -> Cell:
    if math.isnan(value):
        return Cell(MISSING)
    text = f"{100 * value:.1f}"
    return Cell(text, float(text), single_class)


def _mark_best(cells: list[Cell]) -> None:
    """Mark the highest displayed value; ties at the shown precision are all marked."""
    values = [c.value for c in cells if not math.isnan(c.value)]
    if values:
        top = max(values)
        for c in cells:
            c.best = c.value == top


def _input_size(r: ConfigurationResult) -> str:
    s = r.features.settings
    return f"{s.input_height}x{s.input_width}"


def build_table(group: Sequence[ConfigurationResult]) -> Table:
    """The paper's Table 1 for results sharing backbone, classifier and layer: bundles x methods."""
    first = group[0]
    bundles = list(dict.fromkeys(b for r in group for b in r.bundles))
    table = Table(first.config.backbone, first.config.clf, first.config.layer, _input_size(first),
                  ", ".join(dict.fromkeys(r.features.settings.weights_name for r in group)),
                  any(r.features.random_weights for r in group), [r.config.method for r in group])
    for bundle in bundles:
        cells = [_percent_cell(r.counts[bundle].balanced_accuracy, r.counts[bundle].single_class)
                 if bundle in r.counts else Cell(MISSING) for r in group]
        counts = next(r.counts[bundle] for r in group if bundle in r.counts)
        table.rows.append(Row(bundle, cells, counts.n, counts.tp + counts.fn))
    overall = [r.overall for r in group]
    table.rows.append(Row("Overall", [_percent_cell(c.balanced_accuracy, c.single_class) for c in overall],
                          overall[0].n, overall[0].tp + overall[0].fn, rule_above=True))
    aurocs = [r.overall_auroc for r in group]
    table.rows.append(Row("AUROC", [Cell(MISSING) if math.isnan(a) else Cell(f"{a:.3f}", round(a, 3))
                                    for a in aurocs]))
    for row in table.rows:
        _mark_best(row.cells)
    intervals = [r.interval() for r in group]
    table.rows.append(Row("95% CI", [Cell(MISSING) if math.isnan(lo) else Cell(f"{100 * lo:.1f}–{100 * hi:.1f}")
                                     for lo, hi in intervals], marked=False))
    return table


# ---------------------------------------------------------------- console

def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def render_text(table: Table, width: int = WIDTH) -> str:
    """A fixed-width table: numbers right-aligned, marks hanging to their right so decimals line up."""
    columns = []
    for j, method in enumerate(table.methods):
        marked = [row.cells[j] for row in table.rows if row.marked]
        vw = max(len(c.text) for c in marked)
        mw = max(len(c.marks) for c in marked)
        cw = max(len(method), vw + mw, *(len(row.cells[j].text) for row in table.rows))
        cells = [row.cells[j].text.rjust(vw) + row.cells[j].marks.ljust(mw) if row.marked else row.cells[j].text
                 for row in table.rows]
        columns.append([c.rjust(cw) for c in cells] + [method.rjust(vw).ljust(vw + mw).rjust(cw)])
    used = sum(len(col[0]) + 2 for col in columns)
    lw = min(max(len("bundle"), *(len(r.label) for r in table.rows)), max(width - used, 8))
    header = _clip("bundle", lw).ljust(lw) + "".join("  " + col[-1] for col in columns)
    body = [_clip(row.label, lw).ljust(lw) + "".join("  " + col[i] for col in columns)
            for i, row in enumerate(table.rows)]
    rule = "-" * len(header)
    lines = [_title(table),
             "Balanced accuracy (%) per held-out bundle, leave-one-bundle-out; positive = abnormal"]
    if table.random_weights:
        lines.append(f"!!! {BANNER}: a baseline, not a result !!!")
    lines += [rule, header, rule]
    for row, line in zip(table.rows, body):
        if row.rule_above:
            lines.append(rule)
        lines.append(line)
    lines += [rule, f"{BEST} best in row (ties all marked). Overall: TP/FP/TN/FN summed over folds.",
              "AUROC: pooled out-of-fold scores. 95% CI: bootstrap resampling whole bundles."]
    if table.has_one_class:
        lines.append(ONE_CLASS_NOTE)
    return "\n".join(line.rstrip() for line in lines)


def _title(table: Table) -> str:
    random = " (RANDOM)" if table.random_weights else ""
    return (f"{table.backbone} / {table.clf}: layer {table.layer}, input {table.size}, "
            f"weights {table.weights}{random}")


def format_table(results: Sequence[ConfigurationResult], backbone: str, clf: str) -> str:
    """Table 1 for one backbone and classifier (one table per layer/size if several were run)."""
    groups = [g for (b, c, _, _), g in _group(results).items() if b == backbone and c == clf]
    if not groups:
        raise ValueError(f"no results for backbone {backbone!r} and classifier {clf!r}")
    return "\n\n".join(render_text(build_table(g)) for g in groups)


def format_tables(results: Sequence[ConfigurationResult]) -> str:
    """Every table, one per (backbone, classifier), in the order the results came."""
    pairs = dict.fromkeys((r.config.backbone, r.config.clf) for r in results)
    return "\n\n".join(format_table(results, b, c) for b, c in pairs)


# ---------------------------------------------------------------- files

def plain(value):
    """A JSON/CSV-friendly Python value, also inside dicts, lists and tuples: numpy scalars unwrapped, NaN
    (a rate a single-class bundle does not define) as None."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if (v := plain(row.get(k))) is None else v for k in columns})
    return buffer.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(text.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def records(results: Sequence[ConfigurationResult]) -> list[dict]:
    """All records of all configurations, NaN as None: what results.csv and results.json hold."""
    return [{k: plain(v) for k, v in rec.items()} for r in results for rec in r.records()]


def write_results(results: Sequence[ConfigurationResult], out_dir: str | os.PathLike[str], *,
                  screening: ScreeningOutcome | None = None) -> dict[str, Path]:
    """Write results.csv, results.json, predictions.csv and report.html into ``out_dir`` (and screening.json
    with a screening outcome: a trained model's threshold on the out-of-fold scores); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = records(results)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    header = {"xfeat_version": __version__, "created": created, "positive_class": "abnormal",
              "configurations": len(results)}
    predictions = [p for r in results for p in r.predictions()]
    texts = {
        "results.csv": _csv_text(rows, columns),
        "results.json": json.dumps({"header": header, "records": rows}, indent=1, allow_nan=False) + "\n",
        "predictions.csv": _csv_text(predictions, PREDICTION_COLUMNS),
        "report.html": render_html(results, created=created, screening=screening),
    }
    if screening is not None:
        texts["screening.json"] = json.dumps(plain(screening.to_dict()), indent=1, allow_nan=False) + "\n"
    paths = {}
    for name, text in texts.items():
        paths[name] = out / name
        _write_atomic(paths[name], text)
    return paths


# ---------------------------------------------------------------- plots

def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # imported here: the console path never pays for matplotlib

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig: Figure) -> str:
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
    ax.set_title(_mpl_text(_title(table)), fontsize=9)
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
    from sklearn.metrics import roc_curve

    fig = _figure(4.6, 4.2)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    for r, color in zip(group, _colors(len(group))):
        y = np.asarray(r.features.y)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, r.scores)
        ax.plot(fpr, tpr, color=color, label=_mpl_text(f"{r.config.method} (AUROC {r.overall_auroc:.3f})"))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - TNR)")
    ax.set_ylabel("true positive rate (abnormal recall)")
    ax.set_title(_mpl_text(f"{group[0].config.backbone} / {group[0].config.clf}"), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    return fig


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { padding: 0.2em 0.7em; text-align: right; } th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #444; } tr.rule td { border-top: 1px solid #444; }
td.count { color: #777; } sup { color: #b45309; }
.banner { background: #b91c1c; color: white; padding: 0.7em 1em; font-weight: bold; font-size: 1.1em; }
.warn { color: #b91c1c; font-weight: bold; } .note { color: #555; font-size: 0.85em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
"""

EXPLANATION = """
<ul>
<li>Leave-one-bundle-out: every image is scored by a model trained on the other bundles only.
Positive class = <b>abnormal</b>; TPR = abnormal images caught, TNR = normal images cleared.</li>
<li>Balanced accuracy = (TPR + TNR) / 2. <b>Overall</b> is computed from the TP/FP/TN/FN summed over all folds
(the fuel-cell paper's definition), not averaged over bundles.</li>
<li>A bundle holding one class has one defined rate: it is shown with <sup>†</sup> (TNR when normal only,
TPR when abnormal only), never as 50.</li>
<li>AUROC uses the pooled out-of-fold scores. The 95% interval is a percentile bootstrap that resamples whole
bundles (a new bundle is a new coating mixture, so bundles are the independent units).</li>
</ul>
"""


def _html_cell(cell: Cell) -> str:
    text = html.escape(cell.text)
    if cell.best:
        text = f"<b>{text}</b>"
    if cell.single_class:
        text += f'<sup title="{html.escape(cell.single_class)}">{ONE_CLASS}</sup>'
    return f"<td>{text}</td>"


def render_html_table(table: Table) -> str:
    """Table 1 as HTML: best per row in bold, one-class bundles marked, bundle size beside each row."""
    e = html.escape
    head = "".join(f"<th>{e(m)}</th>" for m in table.methods)
    lines = [f"<table><thead><tr><th>bundle</th><th>images</th><th>abnormal</th>{head}</tr></thead><tbody>"]
    for row in table.rows:
        counts = ("" if row.n is None else str(row.n), "" if row.abnormal is None else str(row.abnormal))
        lines.append(f'<tr{" class=rule" if row.rule_above else ""}><td>{e(row.label)}</td>'
                     f'<td class=count>{counts[0]}</td><td class=count>{counts[1]}</td>'
                     + "".join(_html_cell(c) for c in row.cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _img(fig: Figure, alt: str) -> str:
    return f'<img src="data:image/png;base64,{_png(fig)}" alt="{html.escape(alt)}">'


def _section(group: Sequence[ConfigurationResult]) -> str:
    table = build_table(group)
    e = html.escape
    parts = [f"<h2>{e(_title(table))}</h2>"]
    if table.random_weights:
        parts.append(f'<p class=warn>{BANNER}: the backbone had random weights; a baseline, not a result.</p>')
    parts += ["<p>Balanced accuracy (%) per held-out bundle; <b>bold</b> = best in row.</p>",
              render_html_table(table)]
    if table.has_one_class:
        parts.append(f"<p class=note>{e(ONE_CLASS_NOTE)}</p>")
    parts += [f"<p class=warn>{e(note)}</p>" for note in filter(None, (r.constant_note() for r in group))]
    parts += ["<h3>Per bundle</h3>", _img(bundle_bars(table), f"balanced accuracy per bundle, {_title(table)}"),
              "<h3>Overall confusion matrices (summed over folds)</h3>",
              _img(confusion_matrices(group), f"confusion matrices, {_title(table)}"),
              "<h3>ROC, pooled out-of-fold scores</h3>", _img(roc_curves(group), f"ROC curves, {_title(table)}")]
    return "\n".join(parts)


def screening_text(outcome: ScreeningOutcome) -> str:
    """The screening outcome in words a QC engineer reads: what is flagged, what is cleared, what it costs."""
    target = f" (target {outcome.target_recall:.1%})" if outcome.target_recall is not None else ""
    return (f"threshold {outcome.threshold:.6g} (abnormal when score > threshold), on the leave-one-bundle-out "
            f"scores: {outcome.recall:.1%} of {outcome.n_abnormal} abnormal electrodes flagged{target}, 95% "
            f"interval over bundles {_span(outcome.recall_interval)}; {outcome.cleared:.1%} of {outcome.n_normal} "
            f"normal electrodes cleared without a look ({_span(outcome.cleared_interval)}); a person looks at "
            f"{outcome.flagged:.1%} of all electrodes")


def _span(interval: tuple[float, float]) -> str:
    low, high = interval
    return "n/a" if math.isnan(low) else f"{low:.1%}-{high:.1%}"


def render_html(results: Sequence[ConfigurationResult], *, created: str | None = None,
                screening: ScreeningOutcome | None = None) -> str:
    """One self-contained page: tables and plots (base64 PNG); no external files, CSS or scripts."""
    created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>xfeat evaluation report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>xfeat evaluation report</h1>",
             f"<p class=note>xfeat {html.escape(__version__)}, {html.escape(created)}, "
             f"{len(results)} configuration(s).</p>"]
    if any(r.features.random_weights for r in results):
        parts.append(f'<div class="banner">{BANNER}. Some configurations used a backbone with random weights '
                     "(<code>--weights none</code>); their numbers are a baseline, not a result.</div>")
    if screening is not None:
        parts += ["<h2>Screening at the model's threshold</h2>",
                  f"<p>{html.escape(screening_text(screening))}.</p>"]
    parts.append(EXPLANATION)
    parts += [_section(group) for group in _group(results).values()]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
