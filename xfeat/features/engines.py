"""Which runtime runs the frozen network: torch, or OpenVINO, the CPU inference runtime of the field.

Both take the same prepared module (uint8 batch in, float32 features out, taps included) and give the same
features: OpenVINO at fp32 within a relative 1e-5 of torch's (tested for every backbone family xfeat builds:
torchvision ResNets, EfficientNet-Lite, timm models). On a CPU OpenVINO is the faster one (measured on 2 AMD
EPYC cores without AVX-512: EfficientNet-Lite0 at 224 x 224 about 5x torch, ResNet-34 1.4-1.8x;
``benchmarks/extract.py``). Torch stays the engine on GPUs.

OpenVINO converts a model once per (weights, structure, input shape): the converted model is kept in a
per-user cache directory (``$XFEAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/xfeat``, else ``~/.cache/xfeat``, under
``openvino/``), named by a digest of the weights, the module's structure, the input shape and the versions of
torch and OpenVINO, so a second run loads it instead of converting again (seconds to tens of seconds saved).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xfeat.errors import XfeatError

ENGINES = ("auto", "torch", "openvino")
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_engine(engine: str, device: torch.device, recorded: str | None = None) -> str:
    """``auto``: the engine features already cached with these settings were computed with (``recorded``), else
    OpenVINO on a CPU where it is installed, else torch. An explicit engine is checked against the device."""
    if engine not in ENGINES:
        raise XfeatError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if engine == "auto":
        if recorded:
            engine = recorded
        else:
            return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if engine == "openvino":
        if device.type != "cpu":
            raise XfeatError(f"the OpenVINO engine runs on the CPU; on {device} use --engine torch")
        if not openvino_available():
            raise XfeatError("the OpenVINO engine needs the openvino package (pip install openvino)")
    return engine


def cache_dir() -> Path:
    """Where converted models are kept, per user."""
    root = os.environ.get("XFEAT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "xfeat")
    return Path(root) / "openvino"


def model_digest(model: nn.Module) -> str:
    """A digest of a module's weights and structure: what decides its converted form."""
    h = hashlib.sha256(repr(model).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def openvino_runner(model: nn.Module, precision: str = "fp32", folder: Path | None = None
                    ) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]:
    """A function uint8 batch [N, C, H, W] -> float32 features (a tuple for a model with several outputs), run
    by OpenVINO on the CPU: the model is converted (or loaded from ``folder``) for each input shape it meets."""
    import openvino as ov

    if precision not in _OV_PRECISION:
        raise XfeatError(f"the OpenVINO engine runs fp32 or bf16, not {precision}")
    core = ov.Core()
    digest = model_digest(model)
    folder = folder or cache_dir()
    compiled: dict[tuple[int, ...], tuple] = {}  # input shape -> (compiled model, its infer request)
    config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}

    def run(batch: torch.Tensor):
        shape = tuple(batch.shape[1:])
        if shape not in compiled:  # one compiled model and one request per input shape, made once
            net = core.compile_model(core.read_model(converted_model(model, shape, digest, folder)), "CPU", config)
            compiled[shape] = (net, net.create_infer_request())
        net, request = compiled[shape]
        results = request.infer({0: np.ascontiguousarray(batch.numpy())})
        outputs = tuple(torch.from_numpy(np.array(results[out], dtype=np.float32)) for out in net.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    return run


def converted_model(model: nn.Module, shape: tuple[int, ...], digest: str, folder: Path) -> Path:
    """The OpenVINO IR of ``model`` for uint8 inputs [any, *shape]: from ``folder`` when converted before,
    else converted now and saved there (aside, then renamed: concurrent runs never see half a file)."""
    import openvino as ov

    key = hashlib.sha256(f"{digest} {shape} torch {torch.__version__} openvino {ov.__version__}".encode())
    target = folder / key.hexdigest()[:32]
    xml = target / "model.xml"
    if xml.exists() and (target / "model.bin").exists():
        return xml
    shutil.rmtree(target, ignore_errors=True)  # a conversion left half-done by an older xfeat or a full disk
    example = torch.zeros((1, *shape), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # the checks on the input's shape become constants of the trace: right, since one shape is one model
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # OpenVINO traces with torch.jit, which torch deprecates
        try:
            converted = ov.convert_model(model, example_input=example, input=[ov.PartialShape([-1, *shape])])
        except Exception as e:  # an operation OpenVINO's frontend does not know: torch still runs the model
            lines = [line.strip(" -") for line in str(e).splitlines() if line.strip(" -")]
            unknown = [line for line in lines if line.startswith("No conversion rule")]
            reason = (unknown or lines[-1:] or [type(e).__name__])[0][:200]
            raise XfeatError(f"OpenVINO cannot convert {getattr(model, 'name', type(model).__name__)} "
                             f"({reason}); use --engine torch") from e
    folder.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder))
    try:
        ov.save_model(converted, aside / "model.xml", compress_to_fp16=False)  # fp16 weights would move features
        try:
            aside.rename(target)
        except OSError:  # another run put it in place first: theirs is the same model
            pass
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return xml
