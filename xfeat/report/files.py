"""The result files: results.csv and results.json (one record per configuration and bundle), predictions.csv
(one row per image) and, beside them, report.html with its thumbnails in thumbnails/. Each is written atomically
(``xfeat.io.atomic``), so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from xfeat import __version__
from xfeat.io.atomic import write_text
from xfeat.io.jsonable import plain
from xfeat.report.gallery import THUMBNAILS, write_gallery
from xfeat.report.html import render_html

if TYPE_CHECKING:
    from xfeat.learn.evaluation import ConfigurationResult
    from xfeat.screening.threshold import ScreeningOutcome

PREDICTION_COLUMNS = ("backbone", "method", "clf", "layer", "path", "bundle", "label", "score", "decision",
                      "screening_score")  # then flagged_<R> per recall target
# every file write_results may put in its folder: a command checks none of its inputs is there (xfeat.io.outputs)
REPORT_FILES = ("results.csv", "results.json", "predictions.csv", "report.html", "screening.json",
                "near_duplicates.csv", THUMBNAILS)
DUPLICATE_COLUMNS = ("features", "path_a", "bundle_a", "path_b", "bundle_b", "distance", "ratio")


def _csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if (v := plain(row.get(k))) is None else v for k in columns})
    return buffer.getvalue()


def records(results: Sequence[ConfigurationResult]) -> list[dict]:
    """All records of all configurations, NaN as None: what results.csv and results.json hold."""
    return [{k: plain(v) for k, v in rec.items()} for r in results for rec in r.records()]


def write_results(results: Sequence[ConfigurationResult], out_dir: str | os.PathLike[str], *,
                  screening: ScreeningOutcome | None = None, heldout: dict | None = None,
                  near_duplicates: Sequence[dict] | None = None) -> dict[str, Path]:
    """Write results.csv, results.json, predictions.csv and report.html (its thumbnails in thumbnails/) into
    ``out_dir`` (and screening.json with a screening outcome: a trained model's threshold on the out-of-fold
    scores); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = records(results)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    header = {"xfeat_version": __version__, "created": created, "positive_class": "abnormal",
              "configurations": len(results)}
    predictions = [p for r in results for p in r.predictions()]
    gallery = write_gallery(results, out)
    texts = {
        "results.csv": _csv_text(rows, columns),
        "results.json": json.dumps({"header": header, "records": rows}, indent=1, allow_nan=False) + "\n",
        "predictions.csv": _csv_text(predictions, list(dict.fromkeys([*PREDICTION_COLUMNS,
                                                                    *(k for p in predictions for k in p)]))),
        "report.html": render_html(results, created=created, screening=screening, heldout=heldout,
                                   near_duplicates=near_duplicates, gallery=gallery),
    }
    if near_duplicates is not None:
        texts["near_duplicates.csv"] = _csv_text(near_duplicates, DUPLICATE_COLUMNS)
    if screening is not None:
        content = {**screening.to_dict(), "heldout": heldout}
        texts["screening.json"] = json.dumps(plain(content), indent=1, allow_nan=False) + "\n"
    paths = {}
    for name, text in texts.items():
        paths[name] = out / name
        write_text(paths[name], text)
    return paths


__all__ = ["PREDICTION_COLUMNS", "REPORT_FILES", "records", "write_results"]
