"""Tables, records and the HTML report, on hand-made results with known counts."""

from __future__ import annotations

import base64
import csv
import json
import math

import numpy as np
import pytest

from xfeat.features.cache import GroupSettings
from xfeat.learn.evaluation import Configuration, ConfigurationResult
from xfeat.features.reading import FeatureSet
from xfeat.learn.metrics import Counts, auroc
from xfeat.report import BANNER, format_table, format_tables, write_results

# Per method, per bundle: (tp, fp, tn, fn). Bundle C holds normal images only.
CASE = {
    "m1": {"A": (3, 1, 5, 1), "B": (2, 0, 4, 0), "C": (0, 0, 4, 0)},  # A 79.2, B 100, C TNR 100; overall 88.1
    "m2": {"A": (4, 2, 4, 0), "B": (2, 0, 4, 0), "C": (0, 1, 3, 0)},  # A 83.3, B 100, C TNR 75;  overall 89.3
}


def settings(method: str, weights_kind: str = "imagenet") -> GroupSettings:
    name = "none" if weights_kind == "none" else "IMAGENET1K_V1"
    return GroupSettings("resnet34", method, 64, 32, "none", 2, weights_kind, name, "", (0.5,) * 3, (0.2,) * 3,
                         "bilinear", "float32")


def make_result(method: str, per_bundle: dict[str, tuple[int, int, int, int]], *, clf: str = "svm",
                weights_kind: str = "imagenet") -> ConfigurationResult:
    """A result whose out-of-fold decisions give exactly the requested counts per bundle."""
    y, decisions, groups = [], [], []
    for bundle, (tp, fp, tn, fn) in per_bundle.items():
        for label, decision, n in ((1, 1, tp), (0, 1, fp), (0, 0, tn), (1, 0, fn)):
            y += [label] * n
            decisions += [decision] * n
            groups += [bundle] * n
    y, decisions, groups = np.array(y), np.array(decisions), np.array(groups)
    scores = decisions + np.linspace(-0.4, 0.4, len(y))
    n = len(y)
    fs = FeatureSet(X=np.zeros((n, 2), np.float32), y=y, groups=groups,
                    paths=np.array([f"{g}/img{i}.tif" for i, g in enumerate(groups)]), sha256=np.array([""] * n),
                    layer="pool", flips=("none",), settings=settings(method, weights_kind),
                    fc_weight=np.zeros((1000, 2), np.float32), fc_bias=np.zeros(1000, np.float32))
    result = ConfigurationResult(Configuration("resnet34", method, clf, "pool", ""), fs, scores, decisions,
                                 bundles=sorted(per_bundle))
    for bundle in result.bundles:
        mask = groups == bundle
        result.counts[bundle] = Counts.of(y[mask], decisions[mask])
        result.aurocs[bundle] = auroc(y[mask], scores[mask])
        assert result.counts[bundle] == Counts(*per_bundle[bundle])
    return result


@pytest.fixture
def results() -> list[ConfigurationResult]:
    return [make_result(m, counts) for m, counts in CASE.items()]


def row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(label + " "))
    return line[len(label):].split()


def test_table_numbers_and_best_marks(results):
    table = format_table(results, "resnet34", "svm")
    assert row(table, "bundle") == ["m1", "m2"]
    assert row(table, "A") == ["79.2", "83.3*"]
    assert row(table, "B") == ["100.0*", "100.0*"]  # ties all marked
    assert row(table, "Overall") == ["88.1", "89.3*"]  # from counts summed over bundles
    assert len(row(table, "AUROC")) == 2 and len(row(table, "95% CI")) == 2
    assert "resnet34 / svm" in table and "layer pool" in table
    assert BANNER not in table


def test_one_class_bundle_shows_its_rate_and_is_marked(results):
    table = format_table(results, "resnet34", "svm")
    assert row(table, "C") == ["100.0†*", "75.0†"]
    assert "50.0" not in table
    assert "† one class in this bundle" in table


def test_random_weights_are_loud_and_tables_fit_100_columns():
    counts = CASE["m1"]
    results = [make_result(f"m{i}", counts, weights_kind="none") for i in range(1, 7)]
    text = format_tables(results)
    assert BANNER in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_format_tables_one_per_backbone_and_classifier(results):
    both = results + [make_result(m, counts, clf="knn") for m, counts in CASE.items()]
    text = format_tables(both)
    assert text.count("resnet34 / svm") == 1 and text.count("resnet34 / knn") == 1
    with pytest.raises(ValueError):
        format_table(both, "resnet50", "svm")


def test_results_csv_and_json(results, tmp_path):
    paths = write_results(results, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(paths) == [
        "predictions.csv", "report.html", "results.csv", "results.json"]
    with paths["results.csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    data = json.loads(paths["results.json"].read_text(), parse_constant=pytest.fail)  # no NaN tokens
    assert data["header"]["xfeat_version"] and data["header"]["created"]
    records = data["records"]
    assert len(rows) == len(records) == 2 * (3 + 1)
    for field in ("backbone", "method", "clf", "layer", "bundle", "n", "tp", "fp", "tn", "fn",
                  "balanced_accuracy", "auroc", "weights", "single_class", "ci_low", "ci_high"):
        assert field in rows[0] and field in records[0]
    for method, per_bundle in CASE.items():
        summed = np.sum(list(per_bundle.values()), axis=0).tolist()
        overall = next(r for r in records if r["method"] == method and r["bundle"] == "overall")
        assert [overall[k] for k in ("tp", "fp", "tn", "fn")] == summed
        assert overall["balanced_accuracy"] == pytest.approx(Counts(*summed).balanced_accuracy)
        assert overall["ci_low"] <= overall["balanced_accuracy"] <= overall["ci_high"]
        csv_overall = next(r for r in rows if r["method"] == method and r["bundle"] == "overall")
        assert [int(csv_overall[k]) for k in ("tp", "fp", "tn", "fn")] == summed
    # bundle C has no abnormal image: its AUROC and TPR are undefined -> null in JSON, empty in CSV
    c_json = next(r for r in records if r["bundle"] == "C")
    c_csv = next(r for r in rows if r["bundle"] == "C")
    assert c_json["auroc"] is None and c_json["tpr"] is None and c_json["single_class"] == "normal only"
    assert c_csv["auroc"] == "" and c_csv["tpr"] == "" and c_csv["ci_low"] == ""
    assert math.isclose(float(c_csv["balanced_accuracy"]), 1.0)


def test_predictions_csv(results, tmp_path):
    path = write_results(results, tmp_path)["predictions.csv"]
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["backbone", "method", "clf", "layer", "path", "bundle", "label", "score",
                                 "decision", "screening_score"]
    assert len(rows) == sum(len(r.features.y) for r in results)
    first = results[0]
    assert [int(r["decision"]) for r in rows[:len(first.decisions)]] == first.decisions.tolist()


def test_report_html_is_one_self_contained_page(tmp_path):
    tricky = {"<b>x</b>": (1, 1, 2, 1), "B": (2, 0, 4, 0)}
    results = [make_result("m1", tricky), make_result("m2", tricky, weights_kind="none")]
    page = write_results(results, tmp_path)["report.html"].read_text(encoding="utf-8")
    assert page.count('<img src="data:image/png;base64,') == 3  # bars, confusion matrices, ROC
    encoded = page.split('<img src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(encoded).startswith(b"\x89PNG")
    assert "<table>" in page and "<b>100.0</b>" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert BANNER in page and 'class="banner"' in page
    assert "<script" not in page and "<link" not in page and "http" not in page


def test_report_html_without_random_weights_has_no_banner(results, tmp_path):
    page = write_results(results, tmp_path)["report.html"].read_text(encoding="utf-8")
    assert 'class="banner"' not in page and "<sup" in page  # the one-class bundle C is marked
