"""report.html: one page (tables, plots as base64 PNG, inline CSS) that opens anywhere, offline; the thumbnails of
the images each model caught, missed or flagged wrongly (``xfeat.report.gallery``) are small PNGs beside it.

It also words the screening outcome (``screening_text``): the same sentence is on the page and on the console.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from xfeat import __version__
from xfeat.report.gallery import Gallery, gallery_section
from xfeat.report.plots import bundle_bars, cleared_curves, confusion_matrices, png_base64, roc_curves
from xfeat.report.tables import (BANNER, HELD_OUT_NOTE, ONE_CLASS, ONE_CLASS_NOTE, Cell, Table, build_table,
                                 group_results, table_title)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xfeat.learn.evaluation import ConfigurationResult
    from xfeat.screening.threshold import ScreeningOutcome

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
h4 { margin: 1.2em 0 0.3em; } p.kind { margin: 0.6em 0 0.2em; font-size: 0.9em; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.5em; align-items: flex-start; }
figure { margin: 0; font-size: 0.75em; color: #555; max-width: 192px; overflow-wrap: anywhere; }
figure img { margin: 0 0 0.15em; border: 1px solid #bbb; }
figure.missing { width: 110px; min-height: 4em; border: 1px dashed #bbb; padding: 0.3em; }
figure.legend { max-width: none; margin: 0.3em 0 0.8em; }
"""

EXPLANATION = """
<ul>
<li>Leave-one-bundle-out: every image is scored by a model trained on the other bundles only.
Positive class = <b>abnormal</b>; TPR = abnormal images caught, TNR = normal images cleared.</li>
<li>Balanced accuracy = (TPR + TNR) / 2. <b>Overall</b> is computed from the TP/FP/TN/FN summed over all folds
(the fuel-cell paper's definition), not averaged over bundles.</li>
<li>A bundle holding one class has one defined rate: it is shown with <sup>†</sup> (TNR when normal only,
TPR when abnormal only), never as 50.</li>
<li><b>cleared@95</b>: the share of normal electrodes nobody has to look at when the line runs at a 95 %
recall target, measured on bundles the model never saw: for each held-out bundle the threshold is chosen on
the other bundles' own leave-one-bundle-out scores (nested), as <code>xfeat train --target-recall</code> chooses
it, then applied to the held-out bundle; <b>recall@95</b> is the recall that achieved. Pooled over bundles,
with 95% intervals from resampling bundles.</li>
<li>AUROC uses the pooled out-of-fold scores; AUROC/bundle is the mean over bundles holding both classes. The
95% interval is a percentile bootstrap that resamples whole
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
    return f'<img src="data:image/png;base64,{png_base64(fig)}" alt="{html.escape(alt)}">'


def _section(group: Sequence[ConfigurationResult], gallery: Gallery | None = None) -> str:
    table = build_table(group)
    e = html.escape
    parts = [f"<h2>{e(table_title(table))}</h2>"]
    if table.random_weights:
        parts.append(f'<p class=warn>{BANNER}: the backbone had random weights; a baseline, not a result.</p>')
    parts += ["<p>Balanced accuracy (%) per held-out bundle; <b>bold</b> = best in row.</p>",
              render_html_table(table)]
    if table.has_one_class:
        parts.append(f"<p class=note>{e(ONE_CLASS_NOTE)}</p>")
    if any(r.operating for r in group):
        parts.append(f"<p class=note>{e(HELD_OUT_NOTE)}</p>")
    parts += [f"<p class=warn>{e(note)}</p>" for note in filter(None, (r.constant_note() for r in group))]
    parts += ["<h3>Per bundle</h3>", _img(bundle_bars(table), f"balanced accuracy per bundle, {table_title(table)}"),
              "<h3>Overall confusion matrices (summed over folds)</h3>",
              _img(confusion_matrices(group), f"confusion matrices, {table_title(table)}"),
              "<h3>ROC, pooled out-of-fold scores</h3>", _img(roc_curves(group), f"ROC curves, {table_title(table)}")]
    if any(r.operating for r in group):
        parts += ["<h3>Normal cleared against recall</h3>",
                  "<p class=note>Curves: pooled out-of-fold scores. Markers: the nested held-out operating points "
                  "(what a threshold chosen for the target on other bundles did), bars their 95% intervals.</p>",
                  _img(cleared_curves(group), f"normal cleared against recall, {table_title(table)}")]
    parts.append(gallery_section(group, gallery))
    return "\n".join(parts)


def _duplicates_section(pairs: Sequence[dict], shown: int = 50) -> str:
    """The near-duplicate pairs across bundles: the same part in two bundles inflates every figure below."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(p['features'])}</td><td>{e(p['path_a'])}</td><td>{e(p['bundle_a'])}</td>"
                   f"<td>{e(p['path_b'])}</td><td>{e(p['bundle_b'])}</td><td>{p['ratio']:.3f}</td></tr>"
                   for p in pairs[:shown])
    more = f"<p class=note>{len(pairs) - shown} more in near_duplicates.csv.</p>" if len(pairs) > shown else ""
    return (f"<h2 class=warn>{len(pairs)} near-duplicate pair(s) across bundles</h2>"
            "<p>These images of different bundles are far closer to each other than images usually are to their "
            "nearest image in another bundle (ratio: their distance over that typical distance): possibly the "
            "same part imaged twice. Leave-one-bundle-out then tests on a part it trained on, and every figure "
            "below may be too good. Rule: xfeat.learn.duplicates.</p>"
            "<table><thead><tr><th>features</th><th>image</th><th>bundle</th><th>image</th><th>bundle</th>"
            f"<th>ratio</th></tr></thead><tbody>{rows}</tbody></table>{more}")


def screening_text(outcome: ScreeningOutcome, heldout: dict | None = None) -> str:
    """The screening outcome in words a QC engineer reads: what is flagged, what is cleared, what it costs, and
    (``heldout``: a model's nested estimate) what to expect on a new bundle."""
    target = f" (target {outcome.target_recall:.1%})" if outcome.target_recall is not None else ""
    text = (f"threshold {outcome.threshold:.6g} (abnormal when score > threshold), on the leave-one-bundle-out "
            f"scores: {outcome.recall:.1%} of {outcome.n_abnormal} abnormal electrodes flagged{target}, 95% "
            f"interval over bundles {_span(outcome.recall_interval)}; {outcome.cleared:.1%} of {outcome.n_normal} "
            f"normal electrodes cleared without a look ({_span(outcome.cleared_interval)}); a person looks at "
            f"{outcome.flagged:.1%} of all electrodes")
    if heldout:
        text += "; " + expected_text(heldout)
    return text


def expected_text(heldout: dict) -> str:
    """What a recall target achieves on a new bundle, from the nested estimate a model file records."""
    recall, cleared = heldout.get("recall"), heldout.get("cleared")
    if recall is None or cleared is None:
        return "on a new bundle: no nested estimate (a held-out bundle had no threshold: too few abnormal bundles)"
    span = lambda key: _span(tuple(math.nan if v is None else v for v in heldout[key]))  # noqa: E731
    return (f"on a new bundle expect {recall:.1%} of abnormal electrodes flagged ({span('recall_interval')}) and "
            f"{cleared:.1%} of normal ones cleared ({span('cleared_interval')}): nested leave-one-bundle-out, each "
            "bundle judged by a threshold chosen without it")


def _span(interval: tuple[float, float]) -> str:
    low, high = interval
    return "n/a" if math.isnan(low) else f"{low:.1%}-{high:.1%}"


def render_html(results: Sequence[ConfigurationResult], *, created: str | None = None,
                screening: ScreeningOutcome | None = None, heldout: dict | None = None,
                near_duplicates: Sequence[dict] | None = None, gallery: Gallery | None = None) -> str:
    """One page: tables and plots (base64 PNG), no external CSS or scripts; with a ``gallery`` (``write_gallery``
    into the same folder), the thumbnails of each configuration's images, as links to its files."""
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
                  f"<p>{html.escape(screening_text(screening, heldout))}.</p>"]
    parts.append(EXPLANATION)
    if near_duplicates:
        parts.append(_duplicates_section(near_duplicates))
    parts += [_section(group, gallery) for group in group_results(results).values()]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


__all__ = ["expected_text", "render_html", "render_html_table", "screening_text"]
