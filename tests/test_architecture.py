"""The shape of the code: the layer contract holds, and the lower layers stay light to import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """setup.cfg's import-linter contracts: each layer imports only from those below it; no cli imports."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--config", str(ROOT / "setup.cfg"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def imported_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_importing_xfeat_loads_no_numerical_stack():
    """``xfeat --version`` and ``import xfeat`` stay instant: load_features is resolved on first use."""
    modules = imported_by("import xfeat, xfeat.errors")
    assert not {"torch", "h5py", "sklearn"} & modules


def test_evaluation_does_not_load_extraction_engines():
    """A worker that scores cached arrays needs neither torchvision, timm nor torch.distributed's launcher."""
    modules = imported_by("import xfeat.learn")
    assert not {"torchvision", "timm", "distributed", "xfeat.features.extract", "xfeat.scale.torchrun"} & modules


def test_decoding_workers_do_not_load_torch():
    """Extraction's decoding workers import this module only: they start in a fraction of a second."""
    modules = imported_by("import xfeat.features.decoding")
    assert not {"torch", "torchvision", "timm", "h5py"} & modules
