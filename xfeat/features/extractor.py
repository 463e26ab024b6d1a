"""The frozen feature extractor: a backbone with its weights, its classifier cut off and kept, its input handled.

The feature is the input of the classifier's final ``nn.Linear`` (for timm models, what
``model.forward_head(model.forward_features(x), pre_logits=True)`` gives). That Linear is replaced by Identity
and kept as ``fc_weight`` / ``fc_bias``, so the ImageNet logits (``fc1000``) are one matrix product away and need
not be computed per image. A backbone whose classifier is not a Linear with 1000 outputs is refused.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from xfeat.errors import XfeatError
from xfeat.features.backbones import NUM_CLASSES, BackboneSpec, find_classifier, get_spec
from xfeat.features.weights import WeightsInfo, resolve_weights


class FeatureExtractor(torch.nn.Module):
    """uint8 images [B, C, H, W] (C = 1 gray or 3) -> pooled trunk features [B, D] float32 (or the compute dtype).

    Scaling to [0, 1], gray-to-RGB and the backbone's normalisation happen inside, so callers hand over the
    8-bit images the conversion methods produce and every backbone sees the input its weights expect.
    ``fc_weight`` / ``fc_bias`` are the classifier's own final Linear (float32, on the CPU, not moved by ``.to``):
    ``fc1000 = features @ fc_weight.T + fc_bias``. Casting the module to a lower precision casts the
    normalisation buffers too; the trunk then runs in that dtype.
    """

    def __init__(self, name: str, trunk: nn.Module, fc: nn.Linear, mean, std, weights: WeightsInfo) -> None:
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.weights = weights
        self.feature_dim = fc.in_features
        self.fc_weight = fc.weight.detach().float().cpu().clone()
        bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features)  # maxvit's has no bias
        self.fc_bias = bias.detach().float().cpu().clone()
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            got = f"{images.dtype} {tuple(images.shape)}"
            raise XfeatError(f"{self.name}: expected uint8 images [B, 1|3, H, W], got {got}")
        x = images.float() / 255
        if x.shape[1] == 1:  # before normalising: the three channels have different means
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.pixel_mean) / self.pixel_std
        return self.trunk(x.to(self.pixel_mean.dtype))

    def fc1000(self, features: torch.Tensor) -> torch.Tensor:
        """The ImageNet logits from pooled features (the layer the ResNet-50 paper used)."""
        return nn.functional.linear(features.float().cpu(), self.fc_weight, self.fc_bias)


def build_extractor(name: str, weights: str | os.PathLike[str] = "imagenet") -> FeatureExtractor:
    """The frozen feature extractor of a backbone: eval mode (BatchNorm uses its running statistics, which is
    what "frozen" must mean), no gradients anywhere. ``weights``: "imagenet", a state dict file, or "none"."""
    spec = get_spec(name)
    state, info = resolve_weights(spec, weights)  # before building: a missing file fails before any work
    return extractor_from_state(name, state, info)


def extractor_from_state(name: str, state: dict[str, torch.Tensor] | None, info: WeightsInfo) -> FeatureExtractor:
    """``build_extractor`` with weights already in memory (e.g. bundled in a model file); None: random (seed 0)."""
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # "none" is the same random model in every process; never touches the caller's RNG
        model = spec.build()
    if state is not None:
        if spec.state_map is not None:  # efficientnet_lite0: the PyPI file's keys in timm's
            state = spec.state_map(state)
        _load_into(model, state, info.path or info.name)
    fc = _cut_classifier(model, spec)
    extractor = FeatureExtractor(name, model, fc, spec.mean, spec.std, info)
    extractor.requires_grad_(False)
    return extractor.eval()


def _cut_classifier(model: nn.Module, spec: BackboneSpec) -> nn.Linear:
    """Replace the model's classifier (the Linear giving the 1000 logits) by Identity and return it."""
    path, fc = find_classifier(model, spec)
    if not isinstance(fc, nn.Linear) or fc.out_features != NUM_CLASSES:
        found = "none" if fc is None else f"{type(fc).__name__} {path}"
        raise XfeatError(
            f"{spec.name}: no final Linear classifier with {NUM_CLASSES} outputs to tap (found: {found}); "
            "use another backbone"
        )
    parent, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent), attribute, nn.Identity())
    return fc


# torchvision's old DenseNet files name layers 'norm.1', which its builder renames on load; so do we.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a whole-model state dict strictly; a mismatch is one line naming the first offending keys."""
    state = {_DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}
    expected = model.state_dict()
    for key, value in expected.items():  # files saved before PyTorch 0.4 lack BatchNorm's batch counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{what} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''} ({len(keys)})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]
    if problems:
        raise XfeatError(f"{source}: not weights of this architecture: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
