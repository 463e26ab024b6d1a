"""The command line as a user runs it: the installed ``xfeat`` script, real files, real worker processes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

import xfeat
from conftest import write_feature_cache
from xfeat_cli.main import main
from xfeat.convert.methods import METHODS


def xfeat_cli(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["xfeat", *map(str, args)], capture_output=True, text=True, check=check)


def test_version_and_help_on_every_subcommand():
    assert xfeat_cli("--version").stdout.strip() == f"xfeat {xfeat.__version__}"
    for command in ("synth", "convert", "extract", "info", "evaluate"):
        help_text = xfeat_cli(command, "--help").stdout
        assert help_text.startswith(f"usage: xfeat {command}") and len(help_text.splitlines()) < 50  # one screen


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run([sys.executable, "-m", "xfeat", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"xfeat {xfeat.__version__}"


def test_usage_error_exits_2():
    result = xfeat_cli("convert", check=False)
    assert result.returncode == 2 and "--out" in result.stderr


def test_synth_then_convert_m2_mirrors_the_tree(tmp_path):
    data, out = tmp_path / "s", tmp_path / "c"
    synth = xfeat_cli("synth", data, "--size", "256x128", "--seed", "1", "--images", "24", "--bundles", "3")
    assert "wrote 24 images" in synth.stderr
    result = xfeat_cli("convert", data, "--method", "m2", "--out", out)
    sources = sorted(p.relative_to(data).with_suffix(".png") for p in data.rglob("*.tif"))
    written = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert written == sources and len(written) == 24
    stats = json.loads((out / "stats.json").read_text())
    assert stats["g_min"] % 100 == 0 and stats["g_max"] % 100 == 0 and stats["n_images"] == 24
    assert f"G_min={stats['g_min']} G_max={stats['g_max']}" in result.stderr
    assert "converted 24 images with m2" in result.stderr
    image = cv2.imread(str(out / written[0]), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8 and image.shape == (256, 128)


def test_convert_m4_writes_three_channels_in_m1_m2_m3_order(tmp_path, small_dataset):
    out = tmp_path / "c"
    assert main(["convert", str(small_dataset), "--method", "m4", "--out", str(out), "-q", "--jobs", "2"]) == 0
    m4 = cv2.imread(str(out / "B1/normal/img0.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    assert main(["convert", str(small_dataset), "--method", "m1", "--out", str(tmp_path / "m1"), "-q"]) == 0
    m1 = cv2.imread(str(tmp_path / "m1/B1/normal/img0.png"), cv2.IMREAD_UNCHANGED)
    assert m4.shape[2] == 3 and np.array_equal(m4[:, :, 0], m1)


def test_saved_statistics_are_reused_on_new_images(tmp_path, small_dataset):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["convert", str(small_dataset), "--method", "m2", "--out", str(first), "-q", "--no-round"]) == 0
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"path,bundle,label\n{small_dataset / 'B2/normal/img1.tif'},new,normal\n")
    assert main(["convert", str(manifest), "--method", "m2", "--out", str(second), "-q",
                 "--stats", str(first / "stats.json")]) == 0
    assert (first / "stats.json").read_text() == (second / "stats.json").read_text()
    reused = cv2.imread(str(second / "data/B2/normal/img1.png"), cv2.IMREAD_UNCHANGED)  # mirrors from the CSV's folder
    original = cv2.imread(str(first / "B2/normal/img1.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(reused, original)


def test_results_do_not_depend_on_the_number_of_jobs(tmp_path, small_dataset):
    for jobs in (1, 2):
        assert main(["convert", str(small_dataset), "--method", "equalize", "--out", str(tmp_path / f"j{jobs}"),
                     "-q", "--jobs", str(jobs)]) == 0
    for path in (tmp_path / "j1").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "j2" / path.relative_to(tmp_path / "j1")).read_bytes()


def test_preview_panel_shows_every_method(tmp_path, small_dataset, capsys):
    out = tmp_path / "panel.png"
    assert main(["convert", "--preview", str(small_dataset / "B1/normal/img0.tif"), "--out", str(out)]) == 0
    panel = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert panel.ndim == 3 and panel.shape[0] == 512 + 32
    assert panel.shape[1] > len(METHODS) * 100
    err = capsys.readouterr().err
    assert all(m in err for m in METHODS)


def test_convert_without_data_is_a_one_line_error(tmp_path, capsys):
    assert main(["convert", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("xfeat: error: convert needs DATA")


def test_skipped_report_is_csv_with_every_skipped_file(tmp_path, small_dataset):
    (small_dataset / "B1/normal/x.tif").write_bytes(b"II*\x00broken")
    (small_dataset / "B1/normal/y.png").write_text("nope")
    out = tmp_path / "c"
    assert main(["convert", str(small_dataset), "--method", "m2", "--out", str(out), "-q", "--skip-bad"]) == 0
    with open(out / "skipped.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == ["x.tif", "y.png"]
    assert json.loads((out / "stats.json").read_text())["n_images"] == 8


@pytest.mark.parametrize("argv", [
    ["evaluate", "c.h5", "--epochs", "-3"], ["evaluate", "c.h5", "--epochs", "0"], ["evaluate", "c.h5", "--jobs", "0"],
    ["train", "c.h5", "--out", "m.xfeat", "--epochs", "0"], ["extract", "d", "--cache", "c.h5", "--batch-size", "0"],
    ["extract", "d", "--cache", "c.h5", "--workers", "-1"], ["predict", "m.xfeat", "a.tif", "--out", "p.csv",
                                                              "--workers", "-1"],
    ["convert", "d", "--out", "o", "--jobs", "-1"], ["synth", "o", "--bundles", "0"], ["synth", "o", "--images", "-5"],
    ["synth", "o", "--seed", "-1"], ["evaluate", "c.h5", "--epochs", "two"],
])
def test_a_count_below_its_minimum_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    option = argv[-2]
    assert f"argument {option}: " in capsys.readouterr().err


def test_output_piped_into_a_reader_that_stops_is_no_error(tmp_path):
    """``xfeat info c.h5 | head -1``: the reader leaves before xfeat writes; xfeat stops quietly, as cat would."""
    cache = write_feature_cache(tmp_path / "c.h5", np.zeros((4, 1, 3)), [0, 1, 0, 1], ["B1", "B1", "B2", "B2"])
    child = subprocess.Popen(["xfeat", "info", str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    stderr = child.stderr.read().decode()
    assert child.wait() == 141 and stderr == "", stderr
    assert xfeat_cli("info", cache).stdout  # the cache is untouched and still reads
