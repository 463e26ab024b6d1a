"""Evaluation results for people: Table 1 on the console (tables), result files (files), report.html (html, plots)
with thumbnails of the images each model caught, missed and flagged (gallery, maps)."""

from xfeat.report.files import PREDICTION_COLUMNS, records, write_results
from xfeat.report.gallery import write_gallery
from xfeat.report.html import render_html, render_html_table, screening_text
from xfeat.report.plots import bundle_bars, confusion_matrices, roc_curves
from xfeat.report.tables import BANNER, Cell, Row, Table, build_table, format_table, format_tables, render_text

__all__ = ["BANNER", "PREDICTION_COLUMNS", "Cell", "Row", "Table", "build_table", "bundle_bars", "confusion_matrices",
           "format_table", "format_tables", "records", "render_html", "render_html_table", "render_text", "roc_curves",
           "screening_text", "write_gallery", "write_results"]
