"""Local features: what a small defect leaves in the backbone's mid-level stages before global pooling averages it away.

The *local map* of an image joins the outputs of the backbone's stages at stride 8 and 16 (ResNet layer2 and
layer3; EfficientNet's stride-8 and stride-16 blocks; any backbone's deepest stage at each stride), each averaged
over its 3 x 3 neighbourhood (a location then describes a patch around it, as in PatchCore), the stride-16 map
resized (bilinear) onto the stride-8 grid, the two joined along channels: C = 384 for ResNet-34, 1536 for
ResNet-50, 152 for EfficientNet-Lite0. Two taps are built from it:

* ``local``: per-image statistics of every channel over all locations, [3C]: the mean, the max, and the
  generalised mean (GeM) ``(mean(max(x, 1e-6) ** p)) ** (1 / p)`` with p = ``GEM_P`` = 3, which lets a few strong
  locations count without one location deciding. Stored like the pooled tap: one row per image and flip.
* ``patches``: the map itself, small enough to keep: channels reduced to ``PATCH_DIM`` by a fixed random
  projection (``projection``: orthonormal columns drawn from seed 0, so every run and every reader get the same
  one), locations averaged in k x k blocks with the smallest k that keeps one image's map within
  ``PATCH_BYTES`` in float16. Unflipped images only. What the patch scorer (PatchCore) and anomaly maps use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from xfeat.errors import XfeatError

TAPS = ("pool", "local", "patches")
LOCAL_STRIDES = (8, 16)
NEIGHBOURHOOD = 3
GEM_P = 3.0
GEM_EPS = 1e-6
STATISTICS = ("mean", "max", "gem")
PATCH_DIM = 128
PATCH_BYTES = 1 << 20  # one image's patch map, float16
PROJECTION_SEED = 0


def check_taps(taps: Sequence[str]) -> tuple[str, ...]:
    """The taps in canonical order; an unknown one is a one-line error."""
    unknown = [t for t in taps if t not in TAPS]
    if unknown or not taps:
        raise XfeatError(f"unknown tap {', '.join(unknown) or '(none)'}; use pool, local (and --patch-maps for patches)")
    return tuple(t for t in TAPS if t in taps)


def local_stages(spec) -> tuple:
    """The backbone's stages at stride 8 and 16 (``backbones.Stage``), which local features are built on."""
    by_stride = {s.stride: s for s in spec.stages}
    missing = [s for s in LOCAL_STRIDES if s not in by_stride]
    if missing:
        raise XfeatError(f"{spec.name}: no feature map at stride {' and '.join(map(str, missing))} to build local "
                         "features on; use --taps pool, or a convolutional backbone")
    return tuple(by_stride[s] for s in LOCAL_STRIDES)


def local_params(spec) -> dict:
    """What the local tap is, as the cache records it (a group's ``tap_params``)."""
    stages = local_stages(spec)
    return {"stages": [s.module for s in stages], "strides": [s.stride for s in stages],
            "channels": sum(s.channels for s in stages), "neighbourhood": NEIGHBOURHOOD,
            "statistics": list(STATISTICS), "gem_p": GEM_P}


def patch_params(spec, map_size: tuple[int, int]) -> dict:
    """What the patches tap is for a local map of ``map_size`` (rows, columns at stride 8): its grid and width."""
    channels = sum(s.channels for s in local_stages(spec))
    dim = min(channels, PATCH_DIM)
    block = patch_block(map_size, dim)
    grid = [math.ceil(map_size[0] / block), math.ceil(map_size[1] / block)]
    return {**local_params(spec), "dim": dim, "projection_seed": PROJECTION_SEED, "block": block, "grid": grid,
            "stride": LOCAL_STRIDES[0] * block}


def patch_block(map_size: tuple[int, int], dim: int) -> int:
    """The smallest k whose k x k blocks keep a map of ``map_size`` within PATCH_BYTES in float16."""
    k = 1
    while math.ceil(map_size[0] / k) * math.ceil(map_size[1] / k) * dim * 2 > PATCH_BYTES:
        k += 1
    return k


@lru_cache(maxsize=8)
def projection(channels: int, dim: int, seed: int = PROJECTION_SEED) -> np.ndarray:
    """[channels, dim] float32 with orthonormal columns (identity when no reduction is needed): the same for
    every run, so patch maps of one group are comparable."""
    if dim >= channels:
        return np.eye(channels, dtype=np.float32)
    gaussian = np.random.default_rng(seed).standard_normal((channels, dim))
    q, r = np.linalg.qr(gaussian)
    return (q * np.sign(np.diag(r))).astype(np.float32)  # signs fixed: QR's are up to the LAPACK build


class Tapped(nn.Module):
    """A prepared extractor whose forward gives (pooled [B, D], local map [B, C, H/8, W/8]) from one pass.

    The stage outputs are caught by forward hooks, so the extractor's module paths must be intact
    (``prepare_model(..., keep_modules=True)``)."""

    def __init__(self, extractor: nn.Module, stage_modules: Sequence[str]) -> None:
        super().__init__()
        self.extractor = extractor
        self.stage_modules = tuple(stage_modules)
        self._caught: dict[str, torch.Tensor] = {}
        for name in self.stage_modules:
            extractor.trunk.get_submodule(name).register_forward_hook(self._catcher(name))

    def _catcher(self, name: str):
        def catch(module, args, output) -> None:
            self._caught[name] = output
        return catch

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.extractor(images)
        maps = [self._caught.pop(name) for name in self.stage_modules]
        return pooled, joined_map(maps)


def joined_map(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stage outputs (shallow first) -> each 3 x 3-averaged, resized to the first one's grid, joined: [B, C, h, w]."""
    size = maps[0].shape[-2:]
    parts = []
    for m in maps:
        m = nn.functional.avg_pool2d(m.float(), NEIGHBOURHOOD, stride=1, padding=NEIGHBOURHOOD // 2,
                                     count_include_pad=False)
        if m.shape[-2:] != size:
            m = nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
        parts.append(m)
    return torch.cat(parts, dim=1)


def local_statistics(local_map: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, 3C]: per channel the mean, the max and GeM over all locations."""
    flat = local_map.float().flatten(2)
    gem = flat.clamp(min=GEM_EPS).pow(GEM_P).mean(dim=2).pow(1.0 / GEM_P)
    return torch.cat([flat.mean(dim=2), flat.amax(dim=2), gem], dim=1)


def patch_maps(local_map: torch.Tensor, params: dict) -> np.ndarray:
    """[B, C, h, w] -> [B, grid rows, grid columns, dim] float16: projected, then block-averaged."""
    block, dim = int(params["block"]), int(params["dim"])
    m = local_map.float()
    if block > 1:
        m = nn.functional.avg_pool2d(m, block, stride=block, ceil_mode=True, count_include_pad=False)
    proj = torch.from_numpy(projection(m.shape[1], dim))
    out = torch.einsum("bchw,cd->bhwd", m, proj)
    return out.numpy().astype(np.float16)


def map_grid(spec, size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the local map of an input of ``size`` (H, W), found by a forward pass on the meta
    device (no memory, no arithmetic): padding conventions differ between backbones."""
    stage = local_stages(spec)[0].module
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                model = spec.build().eval()
        except Exception:  # a builder computing on tensors (torchvision's RegNets): build, then drop the data
            model = spec.build().to("meta").eval()
    found: list[tuple[int, int]] = []
    model.get_submodule(stage).register_forward_hook(lambda m, a, output: found.append(tuple(output.shape[-2:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, *size, device="meta"))
    return found[0]
