"""Tiling: the backbone runs on tiles of the image at native resolution instead of on the whole image shrunk.

``--tiles RxC`` with ``--size HxW`` (the tile, a multiple of 32) resizes the image to the area R x C tiles
cover, overlapping by ``overlap`` of a tile (rounded so tiles start on a multiple of 32 pixels, the backbones'
coarsest stride), and runs every tile as one input. The pooled tap combines the tiles' vectors (``mean``,
``max``, or ``both`` side by side: [2D]); the local map is stitched from the tiles' maps onto one grid of the
whole image (overlaps averaged), so local statistics and patch maps treat a tiled image as one image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from xfeat.errors import XfeatError

COMBINES = ("mean", "max", "both")
ALIGN = 32  # tiles start on multiples of this: every stage's grid (stride <= 32) lines up across tiles


@dataclass(frozen=True)
class Tiling:
    """R x C tiles of ``tile`` (H, W) pixels overlapping by ``overlap`` of a tile."""

    rows: int
    cols: int
    tile: tuple[int, int]
    overlap: float = 0.125
    combine: str = "mean"

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise XfeatError(f"--tiles must be at least 1x1, not {self.rows}x{self.cols}")
        if not 0 <= self.overlap < 1:
            raise XfeatError(f"--tile-overlap must be in [0, 1), not {self.overlap}")
        if self.combine not in COMBINES:
            raise XfeatError(f"--tile-combine must be one of {', '.join(COMBINES)}, not {self.combine!r}")
        if self.tile[0] % ALIGN or self.tile[1] % ALIGN:
            raise XfeatError(f"with --tiles the tile size (--size) must be a multiple of {ALIGN}, not "
                             f"{self.tile[0]}x{self.tile[1]}")

    @property
    def count(self) -> int:
        return self.rows * self.cols

    @property
    def steps(self) -> tuple[int, int]:
        """Pixels from one tile's start to the next's (a multiple of ALIGN, at least ALIGN)."""
        return tuple(max(ALIGN, round(t * (1 - self.overlap) / ALIGN) * ALIGN) for t in self.tile)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the whole image is resized to."""
        (th, tw), (sy, sx) = self.tile, self.steps
        return th + (self.rows - 1) * sy, tw + (self.cols - 1) * sx

    def origins(self) -> list[tuple[int, int]]:
        """Each tile's top-left corner in the resized image, row by row."""
        sy, sx = self.steps
        return [(r * sy, c * sx) for r in range(self.rows) for c in range(self.cols)]

    def token(self) -> str:
        """How the cache's group names a tiled geometry: ``512x512_t4x2``."""
        return f"{self.tile[0]}x{self.tile[1]}_t{self.rows}x{self.cols}"

    def describe(self) -> str:
        return f"{self.rows}x{self.cols} overlap {self.overlap:g} combine {self.combine}"

    def split(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] (H, W = image_size) -> [B * tiles, C, tile H, tile W], image-major."""
        th, tw = self.tile
        tiles = [images[:, :, y:y + th, x:x + tw] for y, x in self.origins()]
        return torch.stack(tiles, dim=1).flatten(0, 1)

    def combine_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B * tiles, D] -> [B, D] (mean or max over tiles) or [B, 2D] (both)."""
        per_image = pooled.reshape(-1, self.count, pooled.shape[-1])
        if self.combine == "mean":
            return per_image.mean(dim=1)
        if self.combine == "max":
            return per_image.amax(dim=1)
        return torch.cat([per_image.mean(dim=1), per_image.amax(dim=1)], dim=1)

    def stitch(self, maps: torch.Tensor, stride: int) -> torch.Tensor:
        """[B * tiles, C, h, w] maps at ``stride`` -> [B, C, H / stride, W / stride], overlaps averaged."""
        c, h, w = maps.shape[1:]
        per_image = maps.reshape(-1, self.count, c, h, w)
        height, width = (s // stride for s in self.image_size)
        canvas = maps.new_zeros((per_image.shape[0], c, height, width))
        weight = maps.new_zeros((1, 1, height, width))
        for i, (y, x) in enumerate(self.origins()):
            y, x = y // stride, x // stride
            canvas[:, :, y:y + h, x:x + w] += per_image[:, i]
            weight[:, :, y:y + h, x:x + w] += 1
        return canvas / weight


def parse_tiles(text: str, tile: tuple[int, int], overlap: float = 0.125, combine: str = "mean") -> Tiling:
    """``--tiles RxC`` (e.g. 4x2) with the tile size -> a Tiling; a malformed value is a one-line error."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not match:
        raise XfeatError(f"--tiles must look like 4x2 (rows x columns), not {text!r}")
    return Tiling(int(match[1]), int(match[2]), tile, overlap, combine)
