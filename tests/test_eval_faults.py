"""``so-det eval`` on bad predictions files: each fault is a clear error (exit 2) or a documented rule, no traceback.

The rules are in docs/metrics.md ("Predictions file rules") and
:func:`so_det_ultra.metrics.predictions.load_predictions`.
"""

from __future__ import annotations

import importlib
import json

import pytest
import yaml

from so_det_ultra.cli import main

GOOD = {"image_id": "val_00000", "category_id": 1, "bbox": [10.0, 12.0, 6.0, 5.0], "score": 0.9}

# (id, file text, words the error must contain); exit code 2, message on stderr naming the file
ERRORS = [
    ("malformed-json", '[{"image_id": "val_00000", "category_id": 1,', "not valid JSON"),
    ("zero-bytes", "", "the file is empty"),
    ("not-a-list", json.dumps({"annotations": [GOOD]}), "expected a JSON list"),
    ("missing-key", json.dumps([{k: v for k, v in GOOD.items() if k != "score"}]), "expected a JSON list"),
    ("nan-box", json.dumps([{**GOOD, "bbox": [float("nan"), 1, 2, 3]}]), "4 finite numbers"),
    ("inf-score", json.dumps([{**GOOD, "score": float("inf")}]), "finite number"),
    ("negative-size", json.dumps([GOOD, {**GOOD, "bbox": [5, 5, -3, 4]}]), "w, h >= 0"),
    ("three-numbers", json.dumps([{**GOOD, "bbox": [5, 5, 3]}]), "4 finite numbers"),
    ("string-coordinate", json.dumps([{**GOOD, "bbox": ["5", 5, 3, 3]}]), "4 finite numbers"),
    ("unknown-image", json.dumps([GOOD, {**GOOD, "image_id": "no_such_image"}]), "not in this split"),
    ("unknown-category", json.dumps([{**GOOD, "category_id": 99}]), "category_id outside 1..3"),
    ("category-zero", json.dumps([{**GOOD, "category_id": 0}]), "category_id outside 1..3"),
]


@pytest.fixture(scope="module")
def data_yaml(tiny_data, tmp_path_factory):
    """The tiny synthetic set with a ``so_det:`` key (SODA-D bins)."""
    data = yaml.safe_load(tiny_data.read_text())
    data["so_det"] = {"eval": "soda-d", "max_det": 100}
    path = tmp_path_factory.mktemp("eval") / "data.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _eval(data_yaml, tmp_path, text, capsys):
    pred = tmp_path / "predictions.json"
    pred.write_text(text)
    rc = main(["eval", "--data", str(data_yaml), "--pred", str(pred), "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr()
    return rc, out.out, out.err, pred


@pytest.mark.parametrize("text,words", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_bad_predictions_file_is_a_clear_error(data_yaml, tmp_path, capsys, text, words):
    rc, _, err, pred = _eval(data_yaml, tmp_path, text, capsys)
    assert rc == 2, err
    assert err.startswith("so-det eval: error: ") and words in err, err
    assert "Traceback" not in err and "numpy" not in err
    if "split" not in words and "category" not in words:
        assert str(pred) in err  # file-level faults name the file
    assert not (tmp_path / "out.json").exists()


def test_empty_list_means_no_detections(data_yaml, tmp_path, capsys):
    """Documented rule: ``[]`` is a valid file with no detections: AP 0 wherever there is ground truth."""
    rc, out, err, _ = _eval(data_yaml, tmp_path, "[]", capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["AP"] == 0.0 and result["counts"]["det"] == 0 and result["counts"]["gt"] > 0


def test_zero_size_box_is_a_detection_that_matches_nothing(data_yaml, tmp_path, capsys):
    """Documented rule: ``w == 0`` or ``h == 0`` is allowed (some exporters write it) and matches no object."""
    rows = [{**GOOD, "bbox": [10, 12, 0, 5]}, {**GOOD, "bbox": [10, 12, 6, 0], "score": 0.5}]
    rc, _, err, _ = _eval(data_yaml, tmp_path, json.dumps(rows), capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["counts"]["det"] == 2 and result["AP"] == 0.0


def test_missing_and_binary_files_are_clear_errors(data_yaml, tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["eval", "--data", str(data_yaml), "--pred", str(missing)]) == 2
    assert f"predictions file not found: {missing}" in capsys.readouterr().err
    binary = tmp_path / "predictions.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert main(["eval", "--data", str(data_yaml), "--pred", str(binary)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and str(binary) in err and "Traceback" not in err


def test_json_folder_is_refused_before_computing(data_yaml, tmp_path, capsys, monkeypatch):
    """``--json DIR`` is an error naming the option, given before any evaluation runs (no table is printed)."""
    evaluate = importlib.import_module("so_det_ultra.metrics.evaluate")  # the package exports a function of that name

    pred = tmp_path / "predictions.json"
    pred.write_text(json.dumps([GOOD]))
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setattr(evaluate, "evaluate_dataset", lambda *a, **k: pytest.fail("evaluated before refusing"))
    rc = main(["eval", "--data", str(data_yaml), "--pred", str(pred), "--json", str(folder)])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    assert (
        out.err.strip()
        == f"so-det eval: error: --json {folder} is a folder; give a file name, e.g. {folder / 'ap.json'}"
    )
    assert list(folder.iterdir()) == []


def test_plot_name_without_suffix_reports_the_file_written(data_yaml, tmp_path, capsys, monkeypatch):
    """``--plot adir`` writes ``adir.png`` and says so; ``--plot DIR`` is refused before computing."""
    monkeypatch.chdir(tmp_path)
    pred = tmp_path / "predictions.json"
    pred.write_text(json.dumps([GOOD]))
    assert main(["eval", "--data", str(data_yaml), "--pred", str(pred), "--plot", "adir"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "adir.png").is_file() and not (tmp_path / "adir").exists()
    assert out.strip().endswith("wrote adir.png"), out[-300:]
    (tmp_path / "plots").mkdir()
    assert main(["eval", "--data", str(data_yaml), "--pred", str(pred), "--plot", "plots"]) == 2
    assert "--plot plots is a folder" in capsys.readouterr().err
