"""The paper's Table 1: one model of cells and rows, so the console text and the HTML report show the same
numbers and the same best/one-class marks. This module builds the model and renders it as fixed-width text;
``xfeat.report.html`` renders it as HTML.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xfeat.learn.evaluation import ConfigurationResult
    from xfeat.learn.operating import OperatingPoint

WIDTH = 100  # console columns a table must fit (6 methods)
BEST = "*"
ONE_CLASS = "†"
MISSING = "–"
BANNER = "RANDOM WEIGHTS: not ImageNet features"
HELD_OUT_NOTE = ("cleared@R: % of normal images cleared without a look when each held-out bundle's threshold is\n"
                 "chosen for recall R on the other bundles alone (nested); recall@R: the recall achieved there;\n"
                 "(low–high): 95% interval, resampling bundles.")
ONE_CLASS_NOTE = (f"{ONE_CLASS} one class in this bundle: the rate shown is TNR (normal only) / "
                  "TPR (abnormal only)")


# ---------------------------------------------------------------- the table model

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


def group_results(results: Sequence[ConfigurationResult]
                  ) -> dict[tuple[str, str, str, str], list[ConfigurationResult]]:
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
    intervals = [r.interval() for r in group]
    table.rows.append(Row("95% CI", [Cell(MISSING) if math.isnan(lo) else Cell(f"{100 * lo:.1f}–{100 * hi:.1f}")
                                     for lo, hi in intervals], marked=False))
    for target in dict.fromkeys(p.target for r in group for p in r.operating):
        points = [r.operating_point(target) for r in group]
        key = f"{100 * target:g}"
        table.rows.append(Row(f"cleared@{key}", [_held_out_cell(p, "cleared", "tnr") for p in points],
                              rule_above=True))
        table.rows.append(Row(f"recall@{key}", [_held_out_cell(p, "recall", "tpr") for p in points], marked=False))
    aurocs = [r.overall_auroc for r in group]
    table.rows.append(Row("AUROC", [_auroc_cell(a) for a in aurocs], rule_above=True))
    table.rows.append(Row("AUROC/bundle", [_auroc_cell(r.mean_bundle_auroc) for r in group]))
    for row in table.rows:
        if row.marked:
            _mark_best(row.cells)
    return table


def _auroc_cell(value: float) -> Cell:
    return Cell(MISSING) if math.isnan(value) else Cell(f"{value:.3f}", round(value, 3))


def _held_out_cell(point: OperatingPoint | None, name: str, statistic: str) -> Cell:
    """A nested held-out share with its bundle-bootstrap interval: "41.2 (33–50)"."""
    value = math.nan if point is None else getattr(point, name)
    if math.isnan(value):
        return Cell(MISSING)
    low, high = point.interval(statistic)
    text = f"{100 * value:.1f}"
    return Cell(f"{text} ({100 * low:.0f}–{100 * high:.0f})", float(text))


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
    lines = [table_title(table),
             "Balanced accuracy (%) per held-out bundle, leave-one-bundle-out; positive = abnormal"]
    if table.random_weights:
        lines.append(f"!!! {BANNER}: a baseline, not a result !!!")
    lines += [rule, header, rule]
    for row, line in zip(table.rows, body):
        if row.rule_above:
            lines.append(rule)
        lines.append(line)
    lines += [rule, f"{BEST} best in row (ties all marked). Overall: TP/FP/TN/FN summed over folds.",
              "95% CI: bootstrap resampling whole bundles. AUROC: pooled out-of-fold scores; AUROC/bundle: mean",
              "over the bundles holding both classes."]
    if any(row.label.startswith("cleared@") for row in table.rows):
        lines.append(HELD_OUT_NOTE)
    if table.has_one_class:
        lines.append(ONE_CLASS_NOTE)
    return "\n".join(line.rstrip() for line in lines)


def table_title(table: Table) -> str:
    """What a table shows, in one line: its heading on the console and in the report."""
    random = " (RANDOM)" if table.random_weights else ""
    return (f"{table.backbone} / {table.clf}: layer {table.layer}, input {table.size}, "
            f"weights {table.weights}{random}")


def format_table(results: Sequence[ConfigurationResult], backbone: str, clf: str) -> str:
    """Table 1 for one backbone and classifier (one table per layer/size if several were run)."""
    groups = [g for (b, c, _, _), g in group_results(results).items() if b == backbone and c == clf]
    if not groups:
        raise ValueError(f"no results for backbone {backbone!r} and classifier {clf!r}")
    return "\n\n".join(render_text(build_table(g)) for g in groups)


def format_tables(results: Sequence[ConfigurationResult]) -> str:
    """Every table, one per (backbone, classifier), in the order the results came."""
    pairs = dict.fromkeys((r.config.backbone, r.config.clf) for r in results)
    return "\n\n".join(format_table(results, b, c) for b, c in pairs)

__all__ = ["BANNER", "ONE_CLASS", "ONE_CLASS_NOTE", "Cell", "Row", "Table", "build_table", "format_table",
           "format_tables", "group_results", "render_text", "table_title"]
