"""``--precision auto`` on a CPU: bf16 only where it proves itself on the run's own images.

bf16 is 4-8x fp32 on a CPU with matrix units (AMX) and 1.6-2x with avx512_bf16, but with real pretrained
weights it can move features far (docs/extract.md, Precision). So ``auto`` decides per run, and only for new
groups (a cache keeps the precision its groups were computed in):

1. a CPU without bf16 units (neither ``amx_bf16`` nor ``avx512_bf16`` in its flags) would emulate bf16, 5-50x
   slower: fp32, without running anything;
2. otherwise the first images of the run go through the network in fp32 and in bf16, every tap; bf16 is kept
   only if every image passes on every tap: cosine >= ``COSINE_MIN`` and relative L2 (``|bf16 - fp32| /
   |fp32|``) <= ``REL_L2_MAX``.

The decision, its figures and the CPU's flags are stored with the groups it created (``precision_check``,
JSON) and shown by ``xfeat info``; ``--precision fp32|bf16`` forces either without a check.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

COSINE_MIN = 0.9995
REL_L2_MAX = 0.03
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the CPU (from ``/proc/cpuinfo``, or the text given); empty where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@dataclass(frozen=True)
class PrecisionCheck:
    """What ``auto`` chose and why."""

    precision: str
    reason: str
    isa: str  # the CPU's flags that matter here
    images: int = 0  # images compared (0: decided from the flags alone)
    worst_cosine: float | None = None
    worst_rel_l2: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def agreement(reference, candidate) -> tuple[float, float]:
    """(worst cosine, worst relative L2) over the images of a batch and every output (tap) of the network."""
    pairs = zip(reference, candidate) if isinstance(reference, tuple) else [(reference, candidate)]
    worst_cos, worst_rel = 1.0, 0.0
    for ref, cand in pairs:
        r = ref.double().flatten(1).numpy()
        c = cand.double().flatten(1).numpy()
        norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
        cos = np.where(norms > 0, (r * c).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
        rel = np.linalg.norm(c - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-300)
        worst_cos, worst_rel = min(worst_cos, float(cos.min())), max(worst_rel, float(rel.max()))
    return worst_cos, worst_rel


def choose_precision(run_fp32: Callable, run_bf16: Callable, batch: torch.Tensor | None,
                     flags: set[str] | None = None) -> PrecisionCheck:
    """fp32 or bf16 for a CPU run (``batch``: its first images as the network takes them; None when the run has
    no image to compute)."""
    flags = cpu_flags() if flags is None else flags
    isa = " ".join(f for f in SHOWN_FLAGS if f in flags) or "unknown"
    if not any(f in flags for f in BF16_FLAGS):
        return PrecisionCheck("fp32", "no bf16 units on this CPU (neither AMX nor avx512_bf16): bf16 would be "
                                      "emulated, slower than fp32", isa)
    if batch is None or not len(batch):
        return PrecisionCheck("fp32", "no images to check bf16 on", isa)
    cos, rel = agreement(run_fp32(batch), run_bf16(batch))
    passed = cos >= COSINE_MIN and rel <= REL_L2_MAX
    figures = f"worst cosine {cos:.5f}, worst relative L2 {rel:.4f} on {len(batch)} images"
    reason = (f"bf16 matched fp32 ({figures}; needed >= {COSINE_MIN} and <= {REL_L2_MAX})" if passed else
              f"bf16 moved the features ({figures}; needs cosine >= {COSINE_MIN} and relative L2 <= {REL_L2_MAX})")
    return PrecisionCheck("bf16" if passed else "fp32", reason, isa, len(batch), cos, rel)
