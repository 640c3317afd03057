"""``so-det demo``: the first command of the README, run end to end at a reduced size (docs/demo.md)."""

from __future__ import annotations

import re

import cv2
import pytest
from conftest import BIN, run

from so_det_ultra.cli import main
from so_det_ultra.demo.pipeline import DemoError, fresh_dir
from so_det_ultra.demo.recall import FALLBACK_CONF, describe, f1_threshold, match


def test_demo_runs_end_to_end_reduced(workdir):
    out = workdir / "demo"
    proc = run(
        [BIN / "so-det", "demo", "--out", out, "--epochs", "1", "--imgsz", "64", "--images", "8", "--batch", "4"],
        cwd=workdir,
        timeout=600,
    )
    text = proc.stdout
    stages = re.findall(r"^\[(\d)/6\] (\w+):", text, re.M)
    assert stages == [(str(k), s) for k, s in enumerate(["data", "train", "validate", "predict", "export", "done"], 1)]
    assert re.search(r"^\[4/6\] predict: 4 validation images at score >= [\d.]+ \(F1 [\d.]+\)", text, re.M), text
    assert re.search(r"F1-optimal on validation\): recall .*all \d+/\d+ \([\d.]+\); \d+ boxes matched no object", text)
    diff = float(re.search(r"max \|ONNX - PyTorch\| = (\S+) \(tolerance 0.001\): OK", text).group(1))
    assert 0 <= diff <= 1e-3
    table = dict(re.findall(r"^ {6}(\S.*?\S)  +(/\S+)$", text, re.M))  # label -> path, printed at the end
    assert set(table) >= {"data YAML", "weights", "training curves", "AP by size chart", "ONNX model"}
    assert all(p.startswith(str(out.resolve())) for p in table.values())
    for label in ("training curves", "AP by size chart"):
        img = cv2.imread(table[label])
        assert img is not None and min(img.shape[:2]) > 200, label  # a real picture, not an empty file
    drawn = sorted((out / "predictions").glob("*.png"))
    assert len(drawn) == 4
    panel = cv2.imread(str(drawn[0]))
    assert panel.shape[:2] == (64 * 4, 64 * 4 * 2 + 4)  # truth | predictions, enlarged 4x
    assert (out / "train" / "weights" / "best.onnx").stat().st_size > 10_000
    assert "(missing)" not in text


def test_demo_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"so-det demo: error: {tmp_path} exists and is not an empty folder; pass --exist-ok" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # untouched


@pytest.mark.parametrize(
    "args,words", [(["--imgsz", "100"], "multiple of 32"), (["--epochs", "0"], "--epochs must be a positive")]
)
def test_demo_rejects_bad_sizes_before_doing_anything(tmp_path, capsys, args, words):
    assert main(["demo", "--out", str(tmp_path / "d"), *args]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_default_folder_is_fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fresh_dir() == fresh_dir(None) and str(fresh_dir()) == "so-det-demo"
    (tmp_path / "so-det-demo").mkdir()
    assert str(fresh_dir()) == "so-det-demo"  # empty: reused
    (tmp_path / "so-det-demo" / "x").write_text("")
    assert str(fresh_dir()) == "so-det-demo-2"
    with pytest.raises(DemoError, match="--exist-ok"):
        fresh_dir(tmp_path / "so-det-demo")
    assert fresh_dir(tmp_path / "so-det-demo", exist_ok=True) == tmp_path / "so-det-demo"


def test_f1_threshold_is_the_argmax_of_the_class_mean_curve():
    from types import SimpleNamespace

    import numpy as np

    px = np.linspace(0, 1, 1000)
    curve = np.stack([np.exp(-((px - 0.3) ** 2) / 0.1), np.exp(-((px - 0.5) ** 2) / 0.1)])  # class peaks 0.3, 0.5
    conf, f1 = f1_threshold(SimpleNamespace(px=px, f1_curve=curve))
    assert conf == pytest.approx(0.4, abs=2e-3) and 0 < f1 < 1  # the mean curve peaks between the two
    assert f1_threshold(SimpleNamespace(px=px, f1_curve=np.zeros((2, 1000)))) == (FALLBACK_CONF, 0.0)


def test_match_counts_a_duplicate_box_as_extra_and_keeps_classes_apart():
    import torch

    gt_cls, gt = torch.tensor([0.0, 1.0]), torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30]], dtype=torch.float32)
    hit, extra = match(gt_cls, gt, torch.tensor([0.0, 0.0, 0.0]), boxes, torch.tensor([0.9, 0.8, 0.7]))
    assert hit.tolist() == [True, False] and extra == 2  # duplicate of object 0; right box, wrong class for object 1
    assert describe({"eS": (1, 2), "all": (1, 2), "extra boxes": 2}) == (
        "recall eS 1/2 (0.50)  all 1/2 (0.50); 2 boxes matched no object"
    )
