"""Where and how a frozen trunk runs: device choice, numeric precision, and CPU/GPU speed-ups.

Speed-ups here never change what is computed beyond float rounding: channels-last memory layout and
BatchNorm folded into the preceding convolution (exact in real arithmetic, since the trunk is frozen and
BatchNorm is in eval mode). Reduced precision (bf16 on CPU, fp16 on CUDA) is a recorded setting, never
a silent one: the cache stores it with the features.
"""

from __future__ import annotations

import contextlib
import copy
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

    torch.fx's conv-bn fusion where the module traces. timm's TensorFlow-style models do not (their "SAME"
    padding depends on the input size), so there each BatchNorm registered right after a convolution of its
    width is folded into it, and the result is kept only if a random input gives the same output.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module)
    except Exception:  # untraceable control flow
        return _fold_adjacent(module)


def _fold_adjacent(module: nn.Module) -> nn.Module:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module)
    pairs = 0
    for parent in folded.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats
                    and conv.out_channels == norm.num_features):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, _after_normalising(norm))
                pairs += 1
    return folded if pairs and _same_output(module, folded) else module


def _after_normalising(norm: nn.BatchNorm2d) -> nn.Module:
    """What a BatchNorm module does after normalising: nothing, or timm's BatchNormAct2d's dropout and activation."""
    rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _same_output(module: nn.Module, folded: nn.Module) -> bool:
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expected, got = module(x), folded(x)
    except Exception:  # a model with a fixed input size (ViT): keep it as it is
        return False
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())))


def prepare_model(model: nn.Module, device: torch.device, *, fold: bool = True,
                  keep_modules: bool = False) -> nn.Module:
    """Move a frozen model to ``device`` in eval mode, channels-last, BatchNorm folded into convolutions.

    ``keep_modules``: fold without torch.fx (which calls the leaf modules directly, so hooks on a stage would
    never fire): what catching intermediate stages needs."""
    model = model.eval()
    trunk = getattr(model, "trunk", None)
    if fold and isinstance(trunk, nn.Module):
        model.trunk = _fold_adjacent(trunk) if keep_modules else fold_batchnorm(trunk)
    model = model.to(device)
    if device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def runner(model: nn.Module, device: torch.device, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function uint8 batch (on the host) -> float32 features (on the host), with the right copies; a model
    giving a tuple of tensors gives a tuple."""
    non_blocking = device.type == "cuda"
    memory_format = torch.channels_last if device.type != "mps" else torch.contiguous_format

    def run(batch: torch.Tensor) -> torch.Tensor:
        if non_blocking:  # a page-locked copy of the final batch (flips, padding): the copy to the GPU is DMA
            batch = batch.pin_memory()
        x = batch.to(device, non_blocking=non_blocking).contiguous(memory_format=memory_format)
        with torch.inference_mode(), autocast(device, precision):
            features = model(x)
        if isinstance(features, tuple):
            return tuple(f.float().cpu() for f in features)
        return features.float().cpu()

    return run
