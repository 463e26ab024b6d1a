"""Features: backbones and their weights, inference, extraction into the HDF5 cache, and reading it back.

Names are imported on first use: reading a cache (``load_features``) must not load the extraction engines
(torchvision, timm, the extractor), which a process that only scores cached arrays never needs.
"""

from importlib import import_module

_HOMES = {
    "BackboneSpec": "backbones", "get_spec": "backbones", "list_backbones": "backbones",
    "WeightsInfo": "weights", "read_state_dict": "weights", "weights_file_for": "weights",
    "FeatureExtractor": "extractor", "build_extractor": "extractor", "extractor_from_state": "extractor",
    "prepare_model": "inference", "resolve_precision": "inference", "select_device": "inference",
    "ExtractConfig": "extract", "ExtractSummary": "extract",  # the function: xfeat.features.extract.extract
    "FLIPS": "cache", "CacheError": "cache", "GroupSettings": "cache", "open_cache": "cache",
    "CacheWriter": "writer", "compact": "writer", "copy_cache": "writer",
    "FeatureSet": "reading", "describe_cache": "reading", "fc1000": "reading", "list_groups": "reading",
    "load_features": "reading",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'xfeat.features' has no attribute {name!r}")
    return getattr(import_module(f"xfeat.features.{_HOMES[name]}"), name)
