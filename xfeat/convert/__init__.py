"""16-bit to 8-bit: the conversion methods, the window statistics they need, the dataset scan, exporting images."""

from xfeat.convert.export import preview_panel, write_converted, write_png, write_skipped_report
from xfeat.convert.methods import COLOUR_METHODS, METHODS, NEEDS_STATS, check_method, convert, luminance, to_rgb
from xfeat.convert.scan import Scan, scan_dataset
from xfeat.convert.stats import WindowStats, pixel_histogram, window_stats

__all__ = ["preview_panel", "write_converted", "write_png", "write_skipped_report", "COLOUR_METHODS", "METHODS",
           "NEEDS_STATS", "luminance",
           "check_method", "convert", "to_rgb", "Scan", "scan_dataset", "WindowStats", "pixel_histogram",
           "window_stats"]
