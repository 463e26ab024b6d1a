"""What every benchmark prints beside its figures: the CPU they were measured on (run as python benchmarks/X.py,
so the scripts import this as ``machine``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_description() -> str:
    """The CPU model and its vector ISA flags (avx2, avx512*, amx*): what every figure here depends on."""
    import torch

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    flags = [f for f in info.get("flags", "").split() if f == "avx2" or f.startswith(("avx512", "amx"))]
    isa = " ".join(flags) if flags else ("none of avx2/avx512/amx" if "flags" in info else "flags unknown")
    return (f"CPU: {info.get('model name') or platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} logical cores, ISA: {isa} (torch dispatch {torch.backends.cpu.get_cpu_capability()})")
