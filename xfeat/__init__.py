"""xfeat: visual quality control with pretrained CNN features.

The layers, lowest first (docs/architecture.md): ``xfeat.io``, ``xfeat.convert`` / ``xfeat.synth``,
``xfeat.features``, ``xfeat.learn``, ``xfeat.screening``, ``xfeat.report`` / ``xfeat.scale``; the command line
is the separate package ``xfeat_cli``. Analysis scripts start with ``from xfeat import load_features``.
"""

__version__ = "0.1.0"

__all__ = ["FeatureSet", "load_features", "__version__"]


def __getattr__(name: str):
    """``load_features`` and ``FeatureSet`` on first use, so that importing any part of xfeat (or asking the
    command line for its version) does not load the feature cache's dependencies."""
    if name in ("FeatureSet", "load_features"):
        from xfeat.features import reading

        return getattr(reading, name)
    raise AttributeError(f"module 'xfeat' has no attribute {name!r}")
