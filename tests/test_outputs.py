"""Nothing lost, nothing stuck, nothing silent: outputs never overwrite inputs, a failed write is one line and
keeps the previous file, SIGTERM and Ctrl-C stop with one line and keep finished work."""

from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xfeat_cli.main import main
from xfeat.errors import XfeatError
from xfeat.features.extract import ExtractConfig, extract
from xfeat.features.reading import describe_cache
from xfeat.synth import make_dataset

EXTRACT = ("--backbone", "resnet18", "--methods", "m2", "--size", "64x32", "--flips", "1", "--weights", "none",
           "--device", "cpu", "--workers", "0", "--jobs", "1", "-q")
# Tiny networks: one thread is faster, much faster on shared cores, and gives the same bits.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    """A synthetic dataset (24 images, 3 bundles), its feature cache, a model and saved statistics."""
    root = tmp_path_factory.mktemp("outputs")
    make_dataset(root / "d", images=24, bundles=3, size=(64, 32), seed=1, jobs=1)
    extract(root / "d", root / "c.h5", ExtractConfig(backbones=("resnet18",), methods=("m2",), size=(64, 32),
                                                      flips=1, weights="none", device="cpu", workers=0, jobs=1))
    assert main(["train", str(root / "c.h5"), "--backbone", "resnet18", "--clf", "logreg",
                 "--out", str(root / "m.xfeat"), "-q"]) == 0
    assert main(["convert", str(root / "d"), "--method", "m2", "--out", str(root / "conv"), "-q", "--jobs", "1"]) == 0
    return {"root": root, "data": root / "d", "manifest": root / "d/manifest.csv", "cache": root / "c.h5",
            "model": root / "m.xfeat", "stats": root / "conv/stats.json",
            "image": next(iter(sorted((root / "d").rglob("*.tif"))))}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its size and modification time: what "nothing touched" means."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the command; it must stop with exit 1 and one line naming the problem."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("xfeat: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- an output is none of the command's inputs ---------------------------------------------------------------

CLASHES = {  # command line (with {placeholders} from `world`), what the refusal says
    "train --out CACHE": ("train {cache} --out {cache} --clf logreg", "--out is the feature cache this command reads"),
    "train --report onto CACHE": ("train {root}/rep/results.csv --out {root}/new.xfeat --report {root}/rep",
                                  "would overwrite the feature cache this command reads with its results.csv"),
    "evaluate --report onto CACHE": ("evaluate {root}/rep/results.csv --report {root}/rep",
                                     "would overwrite the feature cache this command reads"),
    "predict --out MODEL": ("predict {model} {image} --out {model}", "--out is the model file this command reads"),
    "predict --out IMAGE": ("predict {model} {image} --out {image}", "--out is an image this command scores"),
    "predict --out an image of a folder": ("predict {model} {data} --out {image}", "an image this command scores"),
    "predict --out MANIFEST": ("predict {model} {manifest} --out {manifest}", "--out is a manifest this command reads"),
    "predict --out --cache": ("predict {model} {image} --cache {cache} --out {cache}",
                              "--out is the feature cache this command reads"),
    "extract --cache MANIFEST": ("extract {manifest} --cache {manifest}", "--cache is the dataset manifest"),
    "extract --cache --stats": ("extract {data} --cache {stats} --stats {stats}",
                                "--cache is the statistics file this command reads"),
    "extract --cache IMAGE": ("extract {data} --cache {image}", "--cache is inside the dataset folder"),
    "convert --out onto --stats": ("convert {data} --stats {stats} --out {root}/conv",
                                   "would overwrite the statistics file this command reads"),
    "convert --preview --out IMAGE": ("convert --preview {image} --out {image}",
                                      "--out is the image this command previews"),
}


@pytest.mark.parametrize("case", CLASHES)
def test_an_output_that_is_an_input_is_refused_before_any_work(world, capsys, case):
    command, message = CLASHES[case]
    rep = world["root"] / "rep"
    rep.mkdir(exist_ok=True)
    (rep / "results.csv").write_bytes(world["cache"].read_bytes())  # a cache where a report file would go
    argv = command.format(**world).split()
    if argv[0] == "extract":
        argv += EXTRACT
    before = snapshot(world["root"])
    refused(capsys, argv, message)
    assert snapshot(world["root"]) == before  # nothing written, nothing replaced


def test_a_symbolic_link_to_an_input_is_the_input(world, tmp_path, capsys):
    (tmp_path / "link.h5").symlink_to(world["cache"])
    (tmp_path / "folder").symlink_to(world["root"])  # a folder link: the same cache under another name
    (tmp_path / "hard.h5").hardlink_to(world["cache"])
    before = snapshot(world["root"])
    for out in ("link.h5", "folder/c.h5", "hard.h5"):
        refused(capsys, ["train", str(world["cache"]), "--clf", "logreg", "--out", str(tmp_path / out)],
                f"{tmp_path / out}: --out is the feature cache this command reads ({world['cache']})")
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("out, problem", [
    ("d", "is the dataset folder itself"),
    ("d/B01", "is inside the dataset folder"),
    ("link/new", "is inside the dataset folder"),  # not there yet, but its folder is a link into the data
    (".", "holds the dataset folder"),
])
def test_convert_into_or_around_the_dataset_is_refused(world, capsys, out, problem):
    root = world["root"]
    if not (root / "link").exists():
        (root / "link").symlink_to(root / "d")
    before = snapshot(world["data"])
    refused(capsys, ["convert", str(world["data"]), "--method", "m2", "--out", str(root / out)], problem)
    assert snapshot(world["data"]) == before and not (root / "d/new").exists()


def test_convert_from_a_manifest_into_its_images_folders_is_refused(world, capsys):
    refused(capsys, ["convert", str(world["manifest"]), "--method", "m2", "--out", str(world["data"])],
            "holds the dataset folder")


def test_a_cache_inside_the_dataset_is_refused(world, capsys):
    cache = world["data"] / "c.h5"
    err = refused(capsys, ["extract", str(world["data"]), "--cache", str(cache), *EXTRACT],
                  f"{cache}: --cache is inside the dataset folder {world['data'].resolve()}")
    assert "read back as data" in err
    assert not cache.exists() and not Path(f"{cache}.journal").exists() and not Path(f"{cache}.lock").exists()


def test_predictions_into_a_folder_being_scored_are_refused(world, capsys):
    """A CSV written into a folder of images would be read back (and refused) as an image next time."""
    out = world["data"] / "B01" / "normal" / "predictions.csv"
    refused(capsys, ["predict", str(world["model"]), str(world["data"]), "--out", str(out)],
            f"{out}: --out is inside the dataset folder {world['data'].resolve()}")
    assert not out.exists()


def test_evaluate_report_onto_a_file_fails_before_evaluating(world, tmp_path, capsys, monkeypatch):
    import xfeat.learn.evaluation

    def evaluate(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output was checked")

    monkeypatch.setattr(xfeat.learn.evaluation, "evaluate", evaluate)
    report = tmp_path / "report.html"
    report.write_text("a file of the user's")
    refused(capsys, ["evaluate", str(world["cache"]), "--clf", "logreg", "--report", str(report)],
            f"{report}: --report is an existing file, not a folder")
    assert report.read_text() == "a file of the user's"


def test_a_read_only_output_folder_is_refused_before_the_work(world, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("permissions do not apply (running as root)")
        refused(capsys, ["train", str(world["cache"]), "--clf", "logreg", "--out", str(folder / "m.xfeat")],
                "cannot write here", "not writable")
        refused(capsys, ["evaluate", str(world["cache"]), "--clf", "logreg", "--report", str(folder / "r")],
                "cannot write here", "not writable")
    finally:
        folder.chmod(0o755)


# --- a failed write: one line, the previous file intact, no temporary left ------------------------------------

def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["train", "predict", "preview"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_file(world, tmp_path, capsys, monkeypatch, command):
    out = tmp_path / {"train": "m.xfeat", "predict": "p.csv", "preview": "panel.png"}[command]
    out.write_bytes(b"the previous output")
    argv = {"train": ["train", str(world["cache"]), "--clf", "logreg", "--out", str(out), "-q"],
            "predict": ["predict", str(world["model"]), str(world["image"]), "--out", str(out), "--workers", "0",
                        "-q"],
            "preview": ["convert", "--preview", str(world["image"]), "--out", str(out), "-q"]}[command]
    monkeypatch.setattr(os, "replace", _disk_full)  # the rename that would put the new file in place
    refused(capsys, argv, f"xfeat: error: {out}: cannot write (No space left on device)")
    assert out.read_bytes() == b"the previous output"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind


def test_an_os_error_nobody_worded_is_still_one_line(world, tmp_path, capsys, monkeypatch):
    import xfeat_cli.convert

    def broken(path, image):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(xfeat_cli.convert, "write_png", broken)
    out = tmp_path / "panel.png"
    refused(capsys, ["convert", "--preview", str(world["image"]), "--out", str(out)],
            f"xfeat: error: {out}: Input/output error")


# --- lines, not tracebacks ------------------------------------------------------------------------------------

def test_a_model_file_given_as_weights_is_named(world):
    from xfeat.features.weights import read_state_dict

    with pytest.raises(XfeatError, match=f"{world['model']}: an xfeat model file, not backbone weights"):
        read_state_dict(world["model"])


def test_an_unreachable_scheduler_leaves_no_client_behind(world, capsys):
    distributed = pytest.importorskip("distributed")
    refused(capsys, ["evaluate", str(world["cache"]), "--clf", "logreg", "--scheduler", "notanaddress"],
            "cannot reach the Dask scheduler at notanaddress")
    # a half-built client left to the interpreter's exit waits 60 s there and prints a second traceback
    assert not [o for o in gc.get_objects() if type(o) is distributed.Client]


# --- signals --------------------------------------------------------------------------------------------------

def _start(argv: list[str], **kwargs) -> subprocess.Popen:
    """``xfeat`` in its own process group, with Ctrl-C at its default even when the tests run in the background
    (a shell starts background jobs with SIGINT ignored, and children inherit that)."""
    return subprocess.Popen([sys.executable, "-m", "xfeat", *argv], stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kwargs)


def _wait_until(condition, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_stops_extract_with_one_line_keeping_the_finished_batches(world, tmp_path, capsys):
    cache, journal = tmp_path / "c.h5", tmp_path / "c.h5.journal"
    argv = ["extract", str(world["data"]), "--cache", str(cache), "--backbone", "resnet18", "--methods", "m1,m2",
            "--size", "64x32", "--flips", "1", "--weights", "none", "--device", "cpu", "--workers", "0",
            "--batch-size", "1", "-q"]
    process = _start(argv, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_until(lambda: journal.is_dir() and any(journal.glob("*.npz")), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and err.splitlines() == ["xfeat: terminated"], err
    kept = describe_cache(cache)
    assert kept.pending_batches == 0 and 1 <= kept.groups[0].n_images < 24  # committed on the way out
    assert main(argv[:-3]) == 0  # the rerun (in batches of the default size, and not quiet) computes the rest
    assert "already cached" in "".join(capsys.readouterr())
    assert all(g.n_images == 24 for g in describe_cache(cache).groups)


def test_ctrl_c_to_the_process_group_while_workers_start_is_one_line(tmp_path):
    psutil = pytest.importorskip("psutil")
    process = _start(["synth", str(tmp_path / "s"), "--images", "300", "--bundles", "3", "--size", "512x256", "-q",
                      "--jobs", "2"])
    parent = psutil.Process(process.pid)
    _wait_until(lambda: len(parent.children()) >= 2, process)  # the workers are starting: importing for a while
    time.sleep(0.2)  # past the moment of their creation, when a Ctrl-C may be lost (xfeat.io.processes)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.splitlines() == ["xfeat: interrupted"], err
