"""Synthetic 16-bit electrode X-ray data sets shaped like the fuel-cell paper's, for demos, tests and benchmarks."""

from xfeat.synth.anomalies import ANOMALY_TYPES, SMALL_ANOMALIES
from xfeat.synth.electrode import render_electrode
from xfeat.synth.plan import SIZE_RANGE_H, SIZE_RANGE_W, BundleStyle, ImagePlan, plan_dataset
from xfeat.synth.writer import MANIFEST_HEADER, SynthSummary, make_dataset

__all__ = [
    "ANOMALY_TYPES",
    "MANIFEST_HEADER",
    "SIZE_RANGE_H",
    "SIZE_RANGE_W",
    "SMALL_ANOMALIES",
    "BundleStyle",
    "ImagePlan",
    "SynthSummary",
    "make_dataset",
    "plan_dataset",
    "render_electrode",
]
