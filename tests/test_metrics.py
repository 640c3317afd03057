"""Size-wise COCO AP with ignored regions (so_det_ultra.metrics), hand-built answers and the stock CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import BIN, FAST, run, yolo

from so_det_ultra.metrics.evaluate import evaluate, evaluate_dataset
from so_det_ultra.metrics.hooks import _extend_results_row
from so_det_ultra.metrics.ignore import covered_fraction, in_ignored
from so_det_ultra.metrics.protocol import PROTOCOLS, protocol_from_data
from so_det_ultra.metrics.truth import ImageTruth

VD, SODA = PROTOCOLS["visdrone"], PROTOCOLS["soda-d"]
NAMES = ["a", "b", "c"]


def img(name, boxes, cls=None, ignore=(), size=(1000, 1000)):
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    cls = np.zeros(len(boxes), int) if cls is None else np.asarray(cls, int)
    return ImageTruth(Path(f"{name}.jpg"), size[0], size[1], boxes, cls, np.asarray(ignore, float).reshape(-1, 4))


def det(name, box, score=0.9, cls=0):
    x1, y1, x2, y2 = box
    return {"image_id": name, "category_id": cls + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def square(x, y, side):
    return [x, y, x + side, y + side]


# ------------------------------------------------------------------------------------------ known answers


def test_perfect_detections_give_one_everywhere():
    # VisDrone bins: small 10^2, medium 50^2, large 150^2; three classes over two images
    vd = [
        img("i0", [square(0, 0, 10), square(100, 100, 50), square(300, 300, 150)], [0, 1, 2]),
        img("i1", [square(5, 5, 20), square(500, 500, 60)], [2, 0]),
    ]
    preds = [det(t.file.stem, b, 0.5 + 0.01 * k, int(c)) for t in vd for k, (b, c) in enumerate(zip(t.boxes, t.cls))]
    r = evaluate(vd, preds, VD, NAMES)
    assert r.metrics == {k: 1.0 for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")}
    assert r.per_class == {"a": 1.0, "b": 1.0, "c": 1.0}
    # SODA-D bins: eS 8^2, rS 16^2, gS 25^2, N 35x40 (<= 40*50)
    soda = [img("s0", [square(0, 0, 8), square(50, 50, 16), square(100, 100, 25), [200, 200, 235, 240]])]
    r = evaluate(soda, [det("s0", b) for b in soda[0].boxes], SODA, NAMES)
    assert r.metrics == {k: 1.0 for k in ("AP", "AP50", "AP75", "AP_eS", "AP_rS", "AP_gS", "AP_N")}


def test_shifted_box_counts_below_its_iou_only():
    # 100x100 box shifted 20 px: IoU = 80*100 / (2*100*100 - 80*100) = 2/3 -> TP at 0.50, 0.55, 0.60, 0.65 only
    t = [img("i", [square(0, 0, 100)])]
    r = evaluate(t, [det("i", square(20, 0, 100))], VD, NAMES)
    assert r.metrics["AP50"] == 1.0 and r.metrics["AP75"] == 0.0
    assert r.metrics["AP"] == pytest.approx(0.4)  # 4 of 10 thresholds
    # just above 0.75: shift 14 px -> IoU = 86/114 = 0.754 -> counts at 0.75, not at 0.80
    r = evaluate(t, [det("i", square(14, 0, 100))], VD, NAMES)
    assert r.metrics["AP75"] == 1.0 and r.metrics["AP"] == pytest.approx(0.6)


def test_each_size_bin_sees_only_its_objects():
    t = [img("i", [square(0, 0, 10), square(100, 100, 50), square(300, 300, 150)])]  # small, medium, large
    r = evaluate(t, [det("i", t[0].boxes[0])], VD, NAMES)  # only the small one found
    assert (r.metrics["AP_small"], r.metrics["AP_medium"], r.metrics["AP_large"]) == (1.0, 0.0, 0.0)
    assert r.counts["gt_per_bin"] == {"small": 1, "medium": 1, "large": 1}
    # a confident false positive of medium size lowers AP_medium's precision but not AP_small
    r = evaluate(
        t, [det("i", t[0].boxes[0], 0.5), det("i", t[0].boxes[1], 0.4), det("i", square(700, 0, 50), 0.9)], VD, NAMES
    )
    assert r.metrics["AP_small"] == 1.0 and r.metrics["AP_large"] == 0.0
    assert r.metrics["AP_medium"] == pytest.approx(0.5)  # precision 1/2 at the only recall level
    # a bin without ground truth is None (COCO's -1), not 0
    r = evaluate([img("i", [square(0, 0, 10)])], [det("i", square(0, 0, 10))], VD, NAMES)
    assert r.metrics["AP_small"] == 1.0 and r.metrics["AP_medium"] is None and r.metrics["AP_large"] is None
    # SODA-D: AP is over the 0-32^2 range, so a missed 35x40 object lowers AP_N but not AP
    t = [img("s", [square(0, 0, 8), [200, 200, 235, 240]])]
    r = evaluate(t, [det("s", t[0].boxes[0])], SODA, NAMES)
    assert r.metrics["AP"] == 1.0 and r.metrics["AP_eS"] == 1.0 and r.metrics["AP_N"] == 0.0
    assert r.metrics["AP_rS"] is None


def test_detection_inside_ignored_region_is_not_a_false_positive():
    region = [500, 500, 700, 700]
    t = [img("i", [square(0, 0, 20), square(550, 550, 20)], ignore=[region])]  # 2nd object lies in the region
    preds = [det("i", square(600, 600, 30), 0.99), det("i", square(0, 0, 20), 0.5)]  # confident det in the region
    r = evaluate(t, preds, VD, NAMES)
    assert r.metrics["AP"] == 1.0  # the region's detection is dropped and its undetected object is not a miss
    assert (r.counts["gt_ignored"], r.counts["det_ignored"], r.counts["gt"], r.counts["det"]) == (1, 1, 1, 1)
    # without the filter (SODA-mmdetection's own rule) the same detection is a false positive and the object a miss
    from dataclasses import replace

    r = evaluate(t, preds, replace(VD, drop_ignored=False), NAMES)
    assert r.metrics["AP"] == pytest.approx(0.5 * 51 / 101)  # precision 1/2 up to recall 1/2 (51 of 101 points)
    # a detection only partly (< 50 %) in the region stays and is a false positive
    r = evaluate(t, [det("i", [480, 0, 520, 1000], 0.99), det("i", square(0, 0, 20), 0.5)], VD, NAMES)
    assert r.metrics["AP"] == pytest.approx(0.5)


def test_covered_fraction_union_and_threshold():
    regions = [[0, 0, 10, 10], [5, 0, 15, 10]]  # overlapping: union 15x10, not 200
    assert covered_fraction([[0, 0, 20, 10]], regions)[0] == pytest.approx(0.75)
    assert covered_fraction([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 0, 5]], regions).tolist() == [1.0, 0.0, 0.0]
    half = [[-10, 0, 10, 10]]  # exactly half inside [0, 0, 10, 10] -> dropped (toolkit keeps only < 0.5)
    assert in_ignored(half, [[0, 0, 10, 10]]).tolist() == [True]
    assert in_ignored([[-10.2, 0, 9.8, 10]], [[0, 0, 10, 10]]).tolist() == [False]
    assert in_ignored([[0, 0, 1, 1]], np.zeros((0, 4))).tolist() == [False]


def test_more_than_300_objects_all_scored():
    boxes = [square(10 * i, 10 * j, 8) for i in range(20) for j in range(20)]  # 400 objects in one image
    t = [img("dense", boxes, size=(200, 200))]
    preds = [det("dense", b, 0.9 - k * 1e-4) for k, b in enumerate(boxes)]
    assert evaluate(t, preds, VD, NAMES).metrics["AP"] == 1.0  # VisDrone maxDets 500
    from dataclasses import replace

    r = evaluate(t, preds, replace(VD, max_det=300), NAMES)  # Ultralytics' default cap: recall stops at 0.75
    assert r.metrics["AP"] == pytest.approx(76 / 101) and r.counts["det_over_max_det"] == 100


# -------------------------------------------------------------------------------- agreement with Ultralytics


def _ultralytics_map(truth, preds, nc, save_dir):
    """Ultralytics' own matching (DetectionValidator.match_predictions) and AP (DetMetrics) on the same boxes."""
    import torch
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils.metrics import DetMetrics, box_iou

    v = DetectionValidator(save_dir=save_dir)
    m = DetMetrics(names={i: str(i) for i in range(nc)})
    for t in truth:
        rows = sorted((p for p in preds if p["image_id"] == t.file.stem), key=lambda p: -p["score"])
        pb = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in rows)]).reshape(-1, 4)
        pc = torch.tensor([p["category_id"] - 1 for p in rows], dtype=torch.float32)
        tc = torch.tensor(t.cls, dtype=torch.float32)
        tp = np.zeros((len(rows), 10), bool)
        if len(rows) and len(t.cls):
            tp = v.match_predictions(pc, tc, box_iou(torch.tensor(t.boxes, dtype=torch.float32), pb)).numpy()
        m.update_stats(
            {
                "tp": tp,
                "conf": np.array([p["score"] for p in rows]),
                "pred_cls": pc.numpy(),
                "target_cls": t.cls,
                "target_img": np.unique(t.cls),
                "im_name": t.file.name,
            }
        )
    m.process()
    return float(m.box.map), int(m.nt_per_class.min())


def test_ap_agrees_with_ultralytics_map(tmp_path):
    """Same detections, same matching rule; only the AP integral differs.

    COCO averages the precision envelope sampled at 101 recall points as a step function (first recall >= r);
    Ultralytics integrates the same envelope linearly interpolated, with the trapezoid rule on the same 101 points.
    For one class and IoU threshold the two differ by at most the largest recall step (the linear ramp vs the step,
    1/n_gt for n_gt objects of the class) plus the trapezoid's half-weight end points (1/101). Averaging keeps that
    bound, so |ours - theirs| <= 1/min(n_gt) + 1/101; with >= 80 objects per class that is ~0.022.
    """
    rng = np.random.default_rng(0)
    truth, preds = [], []
    for i in range(30):
        n = int(rng.integers(5, 15))
        xy = rng.uniform(0, 900, (n, 2))
        wh = rng.uniform(6, 120, (n, 2))
        boxes, cls = np.concatenate([xy, xy + wh], 1), rng.integers(0, 3, n)
        truth.append(img(f"r{i}", boxes, cls))
        for b, c in zip(boxes, cls):
            if rng.random() < 0.85:  # found, with localisation noise; worse boxes tend to score lower
                s = rng.uniform(0.0, 0.15)
                w, h = b[2] - b[0], b[3] - b[1]
                noise = rng.normal(0, s, 4) * np.array([w, h, w, h])
                score = float(np.clip(1.0 - 3 * s + rng.normal(0, 0.1), 0.01, 1.0))
                preds.append(det(f"r{i}", (b + noise).tolist(), score, int(c)))
        for _ in range(int(rng.integers(0, 5))):  # false positives
            x, y = rng.uniform(0, 900, 2)
            preds.append(det(f"r{i}", [x, y, x + 30, y + 30], float(rng.uniform(0.0, 0.7)), int(rng.integers(0, 3))))
    ours = evaluate(truth, preds, VD, NAMES).metrics["AP"]
    theirs, min_gt = _ultralytics_map(truth, preds, 3, tmp_path)
    tol = 1 / min_gt + 1 / 101
    print(f"ours {ours:.4f}  ultralytics {theirs:.4f}  diff {ours - theirs:+.4f}  tolerance {tol:.4f}")
    assert 0.2 < ours < 0.9  # a non-trivial case
    assert abs(ours - theirs) <= tol


# ------------------------------------------------------------------------------------- inputs and errors


def test_protocol_from_data():
    assert protocol_from_data({"names": {0: "x"}}) is None
    p = protocol_from_data({"so_det": {"eval": "visdrone", "sidecars": "sidecars", "max_det": 700}})
    assert p.max_det == 700 and p.drop_ignored and [b[0] for b in p.bins] == ["small", "medium", "large"]
    assert protocol_from_data({"so_det": {"eval": "soda-d", "ignore": False}}).drop_ignored is False
    with pytest.raises(ValueError, match="known protocol"):
        protocol_from_data({"so_det": {"eval": "coco"}})
    with pytest.raises(ValueError, match="max_det"):
        protocol_from_data({"so_det": {"eval": "visdrone", "max_det": 0}})


def test_prediction_errors_are_explained():
    t = [img("i", [square(0, 0, 10)])]
    with pytest.raises(ValueError, match="not in this split"):
        evaluate(t, [det("other", square(0, 0, 10))], VD, NAMES)
    with pytest.raises(ValueError, match="class index \\+ 1"):
        evaluate(t, [{"image_id": "i", "category_id": 0, "bbox": [0, 0, 10, 10], "score": 1.0}], VD, NAMES)


def _write_dataset(root: Path, images: dict, so_det: dict | None) -> Path:
    """Hand-built YOLO dataset: ``images`` = {stem: (w, h, [(cls, x1, y1, x2, y2)...], ignore)}; sidecars per
    the data contract; returns data.yaml."""
    for stem, (w, h, objects, ignore) in images.items():
        for d in ("images", "labels", "sidecars"):
            (root / d / "val").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / "val" / f"{stem}.png"), np.zeros((h, w, 3), np.uint8))
        rows = [
            f"{c} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}"
            for c, x1, y1, x2, y2 in objects
        ]
        (root / "labels" / "val" / f"{stem}.txt").write_text("\n".join(rows))
        side = {
            "image": f"{stem}.png",
            "width": w,
            "height": h,
            "ignore": ignore,
            "objects": [
                {"cls": c, "box": [x1, y1, x2, y2], "truncation": 0, "occlusion": 0} for c, x1, y1, x2, y2 in objects
            ],
        }
        (root / "sidecars" / "val" / f"{stem}.json").write_text(json.dumps(side))
    data = {"path": str(root), "train": "images/val", "val": "images/val", "names": {0: "a", 1: "b"}}
    if so_det:
        data["so_det"] = so_det
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


def test_ground_truth_from_labels_and_sidecars(tmp_path):
    """Labels are read against the sidecar's size, ignore regions come from the sidecar, numeric stems match
    Ultralytics' int image_id."""
    from ultralytics.data.utils import check_det_dataset

    path = _write_dataset(
        tmp_path,
        {
            "0007": (200, 100, [(0, 10, 10, 30, 30), (1, 100, 20, 160, 90)], [[150, 0, 200, 100]]),
            "scene_b": (120, 80, [(1, 5, 5, 15, 15)], []),
        },
        {"eval": "visdrone", "sidecars": "sidecars"},
    )
    data = check_det_dataset(str(path))
    preds = [
        {"image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},  # Ultralytics: int("0007")
        {"image_id": "scene_b", "category_id": 2, "bbox": [5, 5, 10, 10], "score": 0.8},
    ]
    r = evaluate_dataset(data, "val", preds)
    # the second object of 0007 is 60x70 with 10 of its 60 columns in the region -> kept, and missed
    assert r.counts["gt"] == 3 and r.counts["gt_ignored"] == 0 and r.metrics["AP_small"] == 1.0
    assert r.metrics["AP_medium"] == 0.0
    preds.append({"image_id": 7, "category_id": 2, "bbox": [100, 20, 60, 70], "score": 0.7})
    assert evaluate_dataset(data, "val", preds).metrics["AP"] == 1.0


def test_results_csv_row_extension(tmp_path):
    f = tmp_path / "results.csv"
    f.write_text("epoch,time,metrics/mAP50(B)\n1,2.5,0.1\n2,5.0,0.2\n")
    assert not _extend_results_row(f, 1, {"so_det/AP": 0.5})  # not the last row: untouched
    assert _extend_results_row(f, 2, {"so_det/AP": 0.5, "so_det/AP_large": None})
    assert f.read_text() == "epoch,time,metrics/mAP50(B),so_det/AP,so_det/AP_large\n1,2.5,0.1\n2,5.0,0.2,0.5,\n"
    import polars as pl  # how Ultralytics reads it back (short earlier rows -> null)

    assert pl.read_csv(f.read_bytes())["so_det/AP"].to_list() == [None, 0.5]


def test_on_val_start_only_for_so_det_data():
    from types import SimpleNamespace

    from so_det_ultra.metrics.hooks import on_val_start

    def validator(data, max_det=300):
        args = SimpleNamespace(task="detect", max_det=max_det, save_json=False)
        return SimpleNamespace(args=args, data=data, pred_to_json=None)

    v = validator({"names": {0: "a"}})  # no so_det key: untouched
    on_val_start(v)
    assert (v.args.max_det, v.args.save_json) == (300, False)
    v = validator({"names": {0: "a"}, "so_det": {"eval": "visdrone"}})  # default max_det raised, JSON collected
    on_val_start(v)
    assert (v.args.max_det, v.args.save_json) == (500, True)
    v = validator({"names": {0: "a"}, "so_det": {"eval": "soda-d"}}, max_det=200)  # the user's value wins
    on_val_start(v)
    assert v.args.max_det == 200


# ------------------------------------------------------------------------------------------ stock CLI


def test_stock_cli_train_val_and_so_det_eval(tmp_path, workdir):
    """yolo train / yolo val on a data YAML with so_det: print and save the size-wise APs; so-det eval on the
    predictions.json gives the same numbers; the same data without the key is untouched."""
    from so_det_ultra.data.synthetic import make_dataset

    plain = make_dataset(
        tmp_path / "ds", n_train=8, n_val=4, imgsz=64, nc=3, objects=(2, 6), size_range=(3.0, 14.0), seed=0
    )
    data = yaml.safe_load(plain.read_text())
    data["so_det"] = {"eval": "visdrone", "sidecars": "sidecars", "max_det": 500}
    ours = plain.with_name("so_det.yaml")
    ours.write_text(yaml.safe_dump(data, sort_keys=False))
    for split in ("train", "val"):
        (tmp_path / "ds" / "sidecars" / split).mkdir(parents=True)
        for k, im in enumerate(sorted((tmp_path / "ds" / "images" / split).iterdir())):
            side = {
                "image": im.name,
                "width": 64,
                "height": 64,
                "ignore": [[0, 0, 24, 24]] if k < 2 else [],
                "objects": [],
            }
            (tmp_path / "ds" / "sidecars" / split / f"{im.stem}.json").write_text(json.dumps(side))
    proj = tmp_path / "runs"

    out = yolo("train", "model=so-det-n.yaml", f"data={ours}", *FAST, f"project={proj}", "name=t", cwd=workdir)
    log = out.stdout + out.stderr
    assert "so-det visdrone AP" in log and "AP_small" in log
    header = (proj / "t" / "results.csv").read_text().splitlines()[0].split(",")
    assert {"so_det/AP", "so_det/AP_small", "so_det/AP_large"} <= set(header)
    assert (proj / "t" / "so_det_metrics.csv").read_text().startswith("epoch,split,AP,AP50,AP75,AP_small")
    best = proj / "t" / "weights" / "best.pt"

    out = yolo(
        "val",
        f"model={best}",
        f"data={ours}",
        "imgsz=64",
        "batch=4",
        "device=cpu",
        "save_json=True",
        "plots=True",
        f"project={proj}",
        "name=v",
        "exist_ok=True",
        cwd=workdir,
    )
    log = out.stdout + out.stderr
    assert "max_det=500" in log and "so-det visdrone AP" in log
    run_dir = proj / "v"
    hook = json.loads((run_dir / "so_det_metrics.json").read_text())
    assert (run_dir / "so_det_ap.png").stat().st_size > 0
    assert hook["counts"]["gt_ignored"] > 0 and hook["counts"]["det"] > 0  # the sidecars' regions were applied
    assert all(hook[k] is None or 0.0 <= hook[k] <= 1.0 for k in ("AP", "AP50", "AP75", "AP_small"))

    cli = tmp_path / "eval.json"
    so_det = BIN / "so-det"
    out = run(
        [so_det, "eval", "--data", ours, "--split", "val", "--pred", run_dir / "predictions.json", "--json", cli],
        cwd=workdir,
    )
    assert "AP_small" in out.stdout
    mine = json.loads(cli.read_text())
    for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "per_class", "counts"):
        assert mine[k] == hook[k], k

    out = yolo(
        "val",
        f"model={best}",
        f"data={plain}",
        "imgsz=64",
        "batch=4",
        "device=cpu",
        "plots=False",
        f"project={proj}",
        "name=plain",
        "exist_ok=True",
        cwd=workdir,
    )
    log = out.stdout + out.stderr
    assert "so-det visdrone AP" not in log and "max_det=500" not in log
    assert sorted(p.name for p in (proj / "plain").iterdir()) == []  # no predictions.json, no so_det files
