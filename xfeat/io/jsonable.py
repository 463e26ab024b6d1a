"""Values for JSON and CSV files: what results, reports and model metadata are written as."""

from __future__ import annotations

import math

import numpy as np


def plain(value):
    """A JSON/CSV-friendly Python value, also inside dicts, lists and tuples: numpy scalars unwrapped, NaN
    (a rate a single-class bundle does not define) as None."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
