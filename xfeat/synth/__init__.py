"""Synthetic data sets for demos, tests and benchmarks: 16-bit electrode X-rays shaped like the fuel-cell paper's,
and colour product photos shaped like the ResNet-50 + linear-SVM paper's."""

from xfeat.synth.anomalies import ANOMALY_TYPES, SMALL_ANOMALIES
from xfeat.synth.electrode import render_electrode
from xfeat.synth.products import PRODUCT_ANOMALIES, make_product_dataset, render_product
from xfeat.synth.plan import SIZE_RANGE_H, SIZE_RANGE_W, BundleStyle, ImagePlan, plan_dataset
from xfeat.synth.writer import MANIFEST_HEADER, SynthSummary, make_dataset

__all__ = [
    "ANOMALY_TYPES",
    "MANIFEST_HEADER",
    "PRODUCT_ANOMALIES",
    "SIZE_RANGE_H",
    "SIZE_RANGE_W",
    "SMALL_ANOMALIES",
    "BundleStyle",
    "ImagePlan",
    "SynthSummary",
    "make_dataset",
    "make_product_dataset",
    "plan_dataset",
    "render_electrode",
    "render_product",
]
