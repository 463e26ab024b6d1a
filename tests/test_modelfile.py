"""The model file: a round trip of metadata, arrays and members; every classifier saved by its learned
parameters and rebuilt to score bit-for-bit alike; any edited byte, truncation, future format or foreign file
refused with a one-line DataError; and no code path that unpickles.
"""

from __future__ import annotations

import _pickle
import hashlib
import io
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from xfeat import __version__
from xfeat.learn.classifiers import CLASSIFIERS, make_classifier
from xfeat.errors import DataError
from xfeat.screening.estimator_state import estimator_from_state, estimator_state
from xfeat.screening.model_file import FORMAT_VERSION, ModelFile, read_model_file, write_model_file


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "classifier/coefs/0": rng.normal(size=(6, 4)).astype(np.float32),
        "classifier/fortran": np.asfortranarray(rng.normal(size=(3, 5))),
        "counts": np.arange(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "pixels": rng.integers(0, 256, size=(2, 3, 4), dtype=np.uint8),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3), np.float32),
        "special": np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324]),
    }


def write_sample(path: Path) -> Path:
    write_model_file(path, {"backbone": "resnet34", "metrics": {"auroc": 0.97}, "bundles": ["B1", "B2"]},
                     sample_arrays(), {"weights/resnet34.safetensors": b"\x00weights\xff" * 50, "notes.txt": b"hi"})
    return path


def reseal(source: Path, target: Path, edit) -> Path:
    """Rewrite a model file's members through ``edit(members)`` and seal it as the format says (independently
    of xfeat's writer): the zip comment is the SHA-256 of every byte before it."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    edit(members)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.comment = b"0" * 64
    data = buffer.getvalue()
    target.write_bytes(data[:-64] + hashlib.sha256(data[:-64]).hexdigest().encode())
    return target


def refusal(path) -> str:
    with pytest.raises(DataError) as error:
        read_model_file(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return error.value.problem


# --- round trip -----------------------------------------------------------------------------------------------

def test_round_trip_keeps_metadata_arrays_and_members_exactly(tmp_path):
    path = write_sample(tmp_path / "model.xfm")
    model = read_model_file(path)
    assert isinstance(model, ModelFile)
    assert model.metadata == {"backbone": "resnet34", "metrics": {"auroc": 0.97}, "bundles": ["B1", "B2"],
                              "format": "xfeat-model", "format_version": FORMAT_VERSION, "xfeat_version": __version__}
    expected = sample_arrays()
    assert model.arrays.keys() == expected.keys()
    for key, array in expected.items():
        loaded = model.arrays[key]
        assert loaded.dtype == array.dtype and loaded.shape == array.shape, key
        assert loaded.tobytes() == array.tobytes(order="C"), key  # bitwise, NaNs included
        assert loaded.flags.writeable
    assert model.files == {"weights/resnet34.safetensors": b"\x00weights\xff" * 50, "notes.txt": b"hi"}


def test_the_file_is_a_valid_zip_sealed_with_its_digest_and_written_reproducibly(tmp_path):
    path = write_sample(tmp_path / "model.xfm")
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert archive.comment == hashlib.sha256(data[:-64]).hexdigest().encode()
        assert {"model.json", "arrays.safetensors", "weights/resnet34.safetensors"} <= set(archive.namelist())
        assert json.loads(archive.read("model.json"))["format"] == "xfeat-model"
    assert write_sample(tmp_path / "again.xfm").read_bytes() == data  # same content, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.xfm", "model.xfm"]  # no temporary left behind


def test_no_member_files_and_no_arrays(tmp_path):
    write_model_file(tmp_path / "m.xfm", {}, {})
    model = read_model_file(tmp_path / "m.xfm")
    assert model.arrays == {} and model.files == {} and model.metadata["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("metadata, arrays, files, match", [
    ({"format_version": 7}, {}, None, "format_version"),
    ({"format": "other"}, {}, None, "format"),
    ({"x": object()}, {}, None, "JSON"),
    ({}, {"names": np.array(["a", "b"], dtype=object)}, None, "safetensors"),
    ({}, {"list": [1, 2]}, None, "not a numpy array"),
    ({}, {}, {"model.json": b"{}"}, "member name"),
    ({}, {}, {"../escape.bin": b""}, "member name"),
    ({}, {}, {"/abs.bin": b""}, "member name"),
    ({}, {}, {"text.txt": "not bytes"}, "not bytes"),
])
def test_writer_refuses_what_it_cannot_store(tmp_path, metadata, arrays, files, match):
    with pytest.raises(ValueError, match=match):
        write_model_file(tmp_path / "m.xfm", metadata, arrays, files)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_previous_model_and_no_temporary(tmp_path, monkeypatch):
    path = write_sample(tmp_path / "model.xfm")
    before = path.read_bytes()

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(DataError, match="No space left"):
        write_model_file(path, {"other": 1}, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.xfm"]


# --- every classifier, stored by its learned parameters -------------------------------------------------------

def toy(n: int, d: int = 6, seed: int = 0, labels=(0, 1)):
    rng = np.random.default_rng(seed)
    y01 = (rng.random(n) < 0.35).astype(int)
    X = rng.normal(5.0, 1.0, size=(n, d))
    X[y01 == 1, :2] += 2.0
    return X.astype(np.float32), np.asarray(labels)[y01]


VARIANTS = {
    "fc": [{"epochs": 2}, {"epochs": 2, "optimizer": "adam", "class_weight": {0: 1.0, 1: 3.0}, "seed": 4},
           {"epochs": 2, "flips": True, "variants": 4, "pretrained": True}],
    "svm": [{}, {"class_weight": "balanced", "alpha": 1e-3}],
    "logreg": [{}, {"C": 0.3, "class_weight": {0: 1, 1: 2}}],
    "knn": [{}, {"scaling": "l2", "n_neighbors": 3}, {"scaling": "none"}],
    "mahalanobis": [{}, {"n_components": 3}],
    "patchcore": [{}, {"coreset": 0.5, "max_bank": 20}],
}


def as_input(name: str, X: np.ndarray) -> np.ndarray:
    """A patch scorer takes patch maps: each row's 6 values as 3 patches of 2."""
    return X.reshape(len(X), 3, 2) if name == "patchcore" else X
CASES = [pytest.param(name, params, id=f"{name}-{i}")
         for name in CLASSIFIERS for i, params in enumerate(VARIANTS[name])]


def test_the_cases_cover_every_classifier():
    assert VARIANTS.keys() == CLASSIFIERS.keys()


def fitted(name: str, params: dict, labels=(0, 1)):
    params = dict(params)
    variants, pretrained = params.pop("variants", None), params.pop("pretrained", False)
    X, y = toy(48, labels=labels)
    if pretrained:
        rng = np.random.default_rng(1)
        params.update(fc_weight=rng.normal(0, 0.05, (1000, X.shape[1])).astype(np.float32),
                      fc_bias=rng.normal(0, 0.05, 1000).astype(np.float32))
    if variants:  # the fc head's [N, F, D] flip variants
        X = np.stack([X + 0.01 * k for k in range(variants)], axis=1)
    return make_classifier(name, **params).fit(as_input(name, X), y)


def saved_and_rebuilt(tmp_path: Path, name: str, estimator):
    params, arrays = estimator_state(name, estimator)
    write_model_file(tmp_path / "model.xfm", {"classifier": {"name": name, "state": params}},
                     {f"classifier/{key}": value for key, value in arrays.items()})
    model = read_model_file(tmp_path / "model.xfm")
    stored = {key.removeprefix("classifier/"): value for key, value in model.arrays.items()}
    return estimator_from_state(model.metadata["classifier"]["name"], model.metadata["classifier"]["state"], stored)


def assert_same_scores(original, rebuilt, X) -> None:
    methods = [m for m in ("decision_function", "predict", "predict_proba") if hasattr(original, m)]
    assert "predict" in methods and len(methods) >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. scikit-learn's "Pipeline is not fitted yet"
        for method in methods:
            expected, got = getattr(original, method)(X), getattr(rebuilt, method)(X)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), method


@pytest.mark.parametrize("name, params", CASES)
def test_every_classifier_scores_identically_after_a_round_trip(tmp_path, name, params):
    original = fitted(name, params)
    rebuilt = saved_and_rebuilt(tmp_path, name, original)
    assert type(rebuilt) is type(original) and rebuilt is not original
    assert rebuilt.get_params().keys() == original.get_params().keys()
    fresh, _ = toy(25, seed=9)
    assert_same_scores(original, rebuilt, as_input(name, fresh))
    if params.get("variants"):
        assert_same_scores(original, rebuilt, np.stack([fresh] * params["variants"], axis=1))
    # and the rebuilt estimator holds exactly the same state
    (params1, arrays1), (params2, arrays2) = estimator_state(name, original), estimator_state(name, rebuilt)
    assert json.dumps(params1, sort_keys=True) == json.dumps(params2, sort_keys=True)
    assert arrays1.keys() == arrays2.keys()
    assert all(np.array_equal(arrays1[k], arrays2[k]) and arrays1[k].dtype == arrays2[k].dtype for k in arrays1)


def test_learned_scalars_and_classes_are_readable_json():
    params, arrays = estimator_state("knn", fitted("knn", {}))
    json.dumps(params)
    assert params["classifier"] == "knn" and params["params"]["n_neighbors"] == 5
    assert isinstance(params["fitted"]["threshold_"], float)
    assert params["fitted"]["classes_"]["$values"] == [0, 1]
    assert all(isinstance(v, np.ndarray) for v in arrays.values())


@pytest.mark.parametrize("name", ["logreg", "mahalanobis"])
def test_text_labels_round_trip(tmp_path, name):
    original = fitted(name, {}, labels=("good", "bad"))
    rebuilt = saved_and_rebuilt(tmp_path, name, original)
    assert rebuilt.classes_.dtype == original.classes_.dtype and rebuilt.classes_.tolist() == ["bad", "good"]
    assert_same_scores(original, rebuilt, toy(10, seed=5)[0])


def test_state_errors_are_clear_value_errors():
    params, arrays = estimator_state("svm", fitted("svm", {}))
    with pytest.raises(ValueError, match="unknown classifier 'forest'"):
        estimator_from_state("forest", params, arrays)
    with pytest.raises(ValueError, match="unknown classifier 'forest'"):
        estimator_state("forest", fitted("svm", {}))
    with pytest.raises(ValueError, match="not that of a 'logreg'"):
        estimator_from_state("logreg", params, arrays)
    missing = next(iter(arrays))
    with pytest.raises(ValueError, match=f"missing array '{missing}'"):
        estimator_from_state("svm", params, {k: v for k, v in arrays.items() if k != missing})
    with pytest.raises(ValueError, match="not fitted"):
        estimator_state("svm", make_classifier("svm"))
    with pytest.raises(ValueError, match="LogReg"):
        estimator_state("svm", fitted("logreg", {}))
    broken = json.loads(json.dumps(params))
    broken["fitted"]["model_"]["$object"]["class"] = "os.system"
    with pytest.raises(ValueError, match="malformed"):
        estimator_from_state("svm", broken, arrays)
    broken["fitted"] = {"__class__": 1}
    with pytest.raises(ValueError, match="malformed"):
        estimator_from_state("svm", broken, arrays)


# --- refusals -------------------------------------------------------------------------------------------------

def central_directory(data: bytes) -> tuple[int, int]:
    """(offset, size) of the zip central directory, from the end record just before the 64-byte comment."""
    end = data[-64 - 22:-64]
    return int.from_bytes(end[16:20], "little"), int.from_bytes(end[12:16], "little")


def test_any_edited_byte_is_refused(tmp_path):
    path = write_sample(tmp_path / "model.xfm")
    data = path.read_bytes()
    cd_offset, cd_size = central_directory(data)
    positions = set(np.linspace(0, len(data) - 1, 24).astype(int).tolist())
    positions |= {0, 1, 4, len(data) - 1, len(data) - 64, len(data) - 65, len(data) - 66, len(data) - 86}
    positions |= set(np.linspace(cd_offset, cd_offset + cd_size - 1, 8).astype(int).tolist())
    assert len(positions) >= 38
    edited = tmp_path / "edited.xfm"
    for position in sorted(positions):
        for change in (0x01, 0xFF):
            corrupt = bytearray(data)
            corrupt[position] ^= change
            edited.write_bytes(bytes(corrupt))
            assert refusal(edited) == "truncated or modified since it was written (checksum mismatch)", position


def test_truncated_files_are_refused(tmp_path):
    data = write_sample(tmp_path / "model.xfm").read_bytes()
    cut = tmp_path / "cut.xfm"
    for length in (1, 4, 30, len(data) // 2, len(data) - 100, len(data) - 86, len(data) - 64, len(data) - 1):
        cut.write_bytes(data[:length])
        problem = refusal(cut)
        assert "truncated or modified" in problem, length


def test_a_newer_format_is_refused_with_both_versions(tmp_path):
    def future(members):
        metadata = json.loads(members["model.json"])
        members["model.json"] = json.dumps({**metadata, "format_version": FORMAT_VERSION + 1}).encode()

    path = reseal(write_sample(tmp_path / "model.xfm"), tmp_path / "future.xfm", future)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    problem = refusal(path)
    assert "newer xfeat" in problem and f"{FORMAT_VERSION + 1} > {FORMAT_VERSION}" in problem and "upgrade" in problem


def test_the_resealing_helper_writes_files_the_reader_accepts(tmp_path):
    path = reseal(write_sample(tmp_path / "model.xfm"), tmp_path / "same.xfm", lambda members: None)
    assert read_model_file(path).files["notes.txt"] == b"hi"


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update({"model.json": json.dumps({"format": "other", "format_version": 1}).encode()}),
     "not an xfeat model file"),
    (lambda m: m.pop("model.json"), "not an xfeat model file (no model.json)"),
    (lambda m: m.update({"model.json": b"{not json"}), "not an xfeat model file (model.json is not valid JSON"),
    (lambda m: m.update({"model.json": json.dumps({"format": "xfeat-model", "format_version": "1"}).encode()}),
     "invalid format_version"),
    (lambda m: m.update({"model.json": json.dumps({"format": "xfeat-model", "format_version": 1}).encode()}),
     "missing xfeat_version"),
    (lambda m: m.pop("arrays.safetensors"), "missing member arrays.safetensors"),
    (lambda m: m.update({"arrays.safetensors": b"\xff" * 40}), "damaged arrays.safetensors"),
])
def test_well_sealed_but_wrong_contents_are_refused(tmp_path, edit, expected):
    path = reseal(write_sample(tmp_path / "model.xfm"), tmp_path / "wrong.xfm", edit)
    assert refusal(path).startswith(expected)


def test_foreign_empty_missing_and_folder_paths_are_refused(tmp_path):
    random_bytes = tmp_path / "random.bin"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert refusal(random_bytes) == "not an xfeat model file"
    empty = tmp_path / "empty.xfm"
    empty.write_bytes(b"")
    assert "empty file" in refusal(empty)
    assert refusal(tmp_path / "missing.xfm") == "no such file"
    assert "folder" in refusal(tmp_path)
    plain_zip = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("model.json", "{}")
    assert "zip archive without an xfeat checksum" in refusal(plain_zip)
    for junk in (b"PK\x03\x04" + bytes(200), b"PK\x05\x06" + bytes(18) + b"\x40\x00" + b"a" * 64):
        random_bytes.write_bytes(junk)
        refusal(random_bytes)


# --- no unpickling --------------------------------------------------------------------------------------------

def test_reading_and_rebuilding_never_unpickles(tmp_path, monkeypatch):
    saved = {}
    for name in CLASSIFIERS:
        params, arrays = estimator_state(name, fitted(name, VARIANTS[name][-1]))
        saved[name] = params
        saved.update({f"{name}/{key}": value for key, value in arrays.items()})
    states = {name: saved.pop(name) for name in CLASSIFIERS}
    write_model_file(tmp_path / "all.xfm", {"states": states}, saved, {"weights/w.safetensors": b"w"})

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for module in (pickle, _pickle):
        for attribute in ("loads", "load", "Unpickler"):
            monkeypatch.setattr(module, attribute, forbidden)
    model = read_model_file(tmp_path / "all.xfm")
    fresh, _ = toy(12, seed=3)
    for name in CLASSIFIERS:
        arrays = {key.removeprefix(f"{name}/"): v for key, v in model.arrays.items() if key.startswith(f"{name}/")}
        rebuilt = estimator_from_state(name, model.metadata["states"][name], arrays)
        assert rebuilt.predict(as_input(name, fresh)).shape == (12,)
