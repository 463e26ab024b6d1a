"""Where and how a frozen trunk runs: device choice, numeric precision, and CPU/GPU speed-ups.

Speed-ups here never change what is computed beyond float rounding: channels-last memory layout and
BatchNorm folded into the preceding convolution (exact in real arithmetic, since the trunk is frozen and
BatchNorm is in eval mode). Reduced precision (bf16 on CPU, fp16 on CUDA) is a recorded setting, never
a silent one: the cache stores it with the features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from xfeat.errors import XfeatError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; explicit names are checked, not trusted."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise XfeatError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise XfeatError(f"device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise XfeatError(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise XfeatError(f"device {spec}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise XfeatError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 autocast on CUDA (what GPUs are fast at), fp32 elsewhere (see docs/extract.md)."""
    if precision not in PRECISIONS:
        raise XfeatError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise XfeatError("fp16 is slow and inexact on the CPU; use fp32 or bf16")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast region for a reduced precision; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution that feeds it, where the graph allows.

    Uses torch.fx's conv-bn fusion; a module that cannot be traced is returned unchanged.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module)
    except Exception:  # untraceable control flow: keep the plain module, it is only slower
        return module


def prepare_model(model: nn.Module, device: torch.device, *, fold: bool = True) -> nn.Module:
    """Move a frozen model to ``device`` in eval mode, channels-last, BatchNorm folded into convolutions."""
    model = model.eval()
    trunk = getattr(model, "trunk", None)
    if fold and isinstance(trunk, nn.Module):
        model.trunk = fold_batchnorm(trunk)
    model = model.to(device)
    if device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def runner(model: nn.Module, device: torch.device, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function uint8 batch (on the host) -> float32 features (on the host), with the right copies."""
    non_blocking = device.type == "cuda"
    memory_format = torch.channels_last if device.type != "mps" else torch.contiguous_format

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device, non_blocking=non_blocking).contiguous(memory_format=memory_format)
        with torch.inference_mode(), autocast(device, precision):
            features = model(x)
        return features.float().cpu()

    return run
