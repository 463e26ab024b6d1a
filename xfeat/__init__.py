"""xfeat: visual quality control with pretrained CNN features."""

__version__ = "0.1.0"

from xfeat.features import FeatureSet, load_features  # noqa: E402  (the analysis entry point)

__all__ = ["FeatureSet", "load_features", "__version__"]
