"""The official SODA-D evaluation protocol (so_det_ultra.metrics, soda-d), checked against an independent
numpy reference of github.com/shaunyuan22/SODA-mmdetection's ``SODADDataset.merge_dets`` + ``SODADeval``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import yaml

from so_det_ultra.data import contract, soda, tiling
from so_det_ultra.metrics.evaluate import evaluate, evaluate_split
from so_det_ultra.metrics.protocol import PROTOCOLS, protocol_from_data
from so_det_ultra.metrics.truth import EvalTruth, ImageTruth, load_eval_truth

OFFICIAL, FULLFRAME = PROTOCOLS["soda-d"], PROTOCOLS["soda-d-fullframe"]
KEYS = ("AP", "AP50", "AP75", "AP_eS", "AP_rS", "AP_gS", "AP_N")
AREAS = {"AP": (0, 32**2), "AP_eS": (0, 12**2), "AP_rS": (12**2, 20**2), "AP_gS": (20**2, 32**2), "AP_N": (32**2, 2000)}


# ------------------------------------------------------------------------------------- the independent reference
def iou(a, b):
    """(N, M) IoU of xyxy boxes (COCO's box IoU, no +1)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def ref_merge(dets, thr):
    """Greedy class-wise NMS in float32: sort by score, drop boxes with IoU > thr to a kept one (mmcv's rule)."""
    out = []
    for c in sorted({d[5] for d in dets}):
        a = np.asarray([d[:5] for d in dets if d[5] == c], np.float32)
        a = a[np.argsort(-a[:, 4], kind="stable")]
        alive = np.ones(len(a), bool)
        for i in range(len(a)):
            if alive[i]:
                alive[i + 1 :] &= iou(a[i, :4], a[i + 1 :, :4])[0] <= thr
        out += [(*map(float, r), c) for r in a[alive]]
    return out


def ref_class_ap(gts, dts, area, thr, max_det):
    """COCO AP of one class at one IoU threshold: gts[i] (G, 4), dts[i] list of (box, score) of image i."""
    lo, hi = area
    scores, tp, fp, npig = [], [], [], 0
    for g, d in zip(gts, dts):
        ga = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
        g_ign = (ga < lo) | (ga > hi)
        order = np.argsort(g_ign, kind="stable")
        g, g_ign = g[order], g_ign[order]
        npig += int((~g_ign).sum())
        d = sorted(d, key=lambda x: -x[1])[:max_det]  # the cap: per image *and* class
        ious = iou([b for b, _ in d], g) if len(d) and len(g) else np.zeros((len(d), len(g)))
        taken = np.zeros(len(g), bool)
        for k, (box, s) in enumerate(d):
            best, m = min(thr, 1 - 1e-10), -1
            for j in range(len(g)):
                if taken[j]:
                    continue
                if m > -1 and not g_ign[m] and g_ign[j]:
                    break
                if ious[k, j] < best:
                    continue
                best, m = ious[k, j], j
            if m > -1:
                taken[m] = True
                ignored = g_ign[m]
                matched = True
            else:
                da = (box[2] - box[0]) * (box[3] - box[1])
                ignored, matched = da < lo or da > hi, False
            if not ignored:
                scores.append(s)
                tp.append(matched)
                fp.append(not matched)
    if npig == 0:
        return None
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    tps, fps = np.cumsum(np.asarray(tp, float)[order]), np.cumsum(np.asarray(fp, float)[order])
    rc, pr = tps / npig, tps / (tps + fps + np.spacing(1))
    pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr  # the precision envelope
    idx = np.searchsorted(rc, np.linspace(0, 1, 101), side="left")
    return float(np.mean([pr[i] if i < len(pr) else 0.0 for i in idx]))


def reference(parents, tile_dets, nc, max_det=100, merge_iou=0.5):
    """The official protocol: translate tile detections, merge per class, COCO AP at maxDets 100 per image and class.

    parents: [(boxes (G, 4), cls (G,))]; tile_dets: [(parent index, x0, y0, [(x1, y1, x2, y2, score, cls)])].
    """
    per_parent = [[] for _ in parents]
    for i, x0, y0, dets in tile_dets:
        per_parent[i] += [(x1 + x0, y1 + y0, x2 + x0, y2 + y0, s, c) for x1, y1, x2, y2, s, c in dets]
    merged = [ref_merge(d, merge_iou) if d else [] for d in per_parent]
    out = {}
    thresholds = np.linspace(0.5, 0.95, 10)
    for key in KEYS:
        area, ts = AREAS.get(key, AREAS["AP"]), {"AP50": [0.5], "AP75": [0.75]}.get(key, thresholds)
        vals = []
        for c in range(nc):
            gts = [b[k == c] for b, k in parents]
            dts = [[(np.asarray(d[:4]), d[4]) for d in m if d[5] == c] for m in merged]
            aps = [ref_class_ap(gts, dts, area, t, max_det) for t in ts]
            vals += [a for a in aps if a is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


# --------------------------------------------------------------------------------------------- ours, in memory
def ours(parents, tile_dets, nc, protocol=OFFICIAL):
    """so_det_ultra on the same case: tiles named ``p<i>__<x>_<y>``, rows as ``yolo val save_json`` writes them."""
    truth = EvalTruth(
        images=[ImageTruth(Path(f"p{i}.jpg"), 1700, 900, b, c) for i, (b, c) in enumerate(parents)],
        n_tiles=len({(i, x, y) for i, x, y, _ in tile_dets}),
    )
    rows = []
    for i, x0, y0, dets in tile_dets:
        stem = f"p{i}__{x0}_{y0}"
        truth.tiles[stem] = (i, x0, y0)
        rows += [
            {"image_id": stem, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            for x1, y1, x2, y2, s, c in dets
        ]
    return evaluate_split(truth, rows, protocol, [str(k) for k in range(nc)])


def tile_case(boxes_scores, windows=None):
    """Perfect-ish detections of frame boxes ``(x1, y1, x2, y2, score, cls)`` in every tile that holds them whole."""
    windows = windows or tiling.tile_windows(900, 1700)
    out = []
    for wx0, wy0, wx1, wy1 in windows:
        dets = [
            (x1 - wx0, y1 - wy0, x2 - wx0, y2 - wy0, s, c)
            for x1, y1, x2, y2, s, c in boxes_scores
            if x1 >= wx0 and y1 >= wy0 and x2 <= wx1 and y2 <= wy1
        ]
        out.append((0, wx0, wy0, dets))
    return out


def random_case(seed, n_parents=2, nc=3):
    """Parents 1700x900 with objects of every SODA-D size, detections per tile with noise, duplicates on seams,
    false positives (some inside what would be ignored regions), and one class dense enough to hit the cap."""
    rng = np.random.default_rng(seed)
    windows = tiling.tile_windows(900, 1700)
    parents, tile_dets = [], []
    for i in range(n_parents):
        n = int(rng.integers(30, 60))
        side = rng.choice([6, 10, 14, 18, 24, 30, 38, 44, 60], n)
        xy = rng.uniform(0, [1700 - 60, 900 - 60], (n, 2))
        boxes = np.concatenate([xy, xy + np.stack([side, side * rng.uniform(0.7, 1.3, n)], 1)], 1)
        cls = rng.integers(0, nc, n)
        if i == 0:  # 130 objects of class 0 in a grid that spans the seams at x=650..800, y=100..800
            g = np.array([[600 + 14 * a, 60 + 14 * b] for a in range(13) for b in range(10)], float)
            boxes, cls = np.concatenate([boxes, np.c_[g, g + 8]]), np.concatenate([cls, np.zeros(len(g), int)])
        parents.append((boxes, cls))
        for wx0, wy0, wx1, wy1 in windows:
            dets = []
            for b, c in zip(boxes, cls):
                if b[0] >= wx0 and b[1] >= wy0 and b[2] <= wx1 and b[3] <= wy1 and rng.random() < 0.9:
                    w, h = b[2] - b[0], b[3] - b[1]
                    nb = b + rng.normal(0, 0.06, 4) * [w, h, w, h] - [wx0, wy0, wx0, wy0]
                    wrong = rng.random() < 0.05
                    dets.append((*nb, float(rng.uniform(0.05, 1)), int((c + 1) % nc if wrong else c)))
            for _ in range(int(rng.integers(2, 8))):  # false positives
                x, y, s = rng.uniform(0, wx1 - wx0 - 50), rng.uniform(0, wy1 - wy0 - 50), rng.uniform(5, 45)
                dets.append((x, y, x + s, y + s, float(rng.uniform(0, 0.8)), int(rng.integers(nc))))
            tile_dets.append((i, wx0, wy0, [tuple(float(v) for v in d[:5]) + (d[5],) for d in dets]))
    return parents, tile_dets


# ------------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_protocol_matches_reference(seed):
    parents, tile_dets = random_case(seed)
    want, got = reference(parents, tile_dets, 3), ours(parents, tile_dets, 3)
    print(seed, {k: round(v, 4) for k, v in want.items() if v is not None})
    assert got.counts["det_merged"] > 0 and got.counts["tiles"] == 12  # seams were merged
    assert 0.2 < want["AP"] < 0.95  # a non-trivial case
    for k in KEYS:
        assert got.metrics[k] == pytest.approx(want[k], abs=1e-9), k


def test_seam_duplicate_is_merged():
    # A lies in the overlap x 650..800 of tiles (0, 0) and (650, 0): seen twice, the two boxes merge into one.
    a, b = (700, 300, 716, 316), (100, 300, 116, 316)
    parents = [(np.array([a, b], float), np.array([0, 0]))]
    tile_dets = [(0, 0, 0, [(*a, 0.9, 0), (*b, 0.5, 0)]), (0, 650, 0, [(50, 300, 66, 316, 0.8, 0)])]
    r = ours(parents, tile_dets, 1)
    assert r.metrics["AP"] == 1.0 == reference(parents, tile_dets, 1)["AP"]
    assert (r.counts["det_tiles"], r.counts["det_merged"], r.counts["det"]) == (3, 1, 2)
    # unmerged, the seam copy (0.8) is a false positive ranked above b (0.5): precision 2/3 at recall 1
    unmerged = reference(parents, tile_dets, 1, merge_iou=1.0)["AP"]
    assert unmerged == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert ours(parents, tile_dets, 1, replace(OFFICIAL, merge_iou=1.0)).metrics["AP"] == pytest.approx(unmerged)


def test_detection_in_ignored_region_is_a_false_positive():
    # the official ground truth drops ignore boxes (val_wo_ignore.json) and keeps every detection
    region = [300, 300, 500, 500]
    t = [ImageTruth(Path("p.jpg"), 1700, 900, np.array([[10.0, 10, 20, 20]]), np.array([0]), np.array([region]))]
    rows = [
        {"image_id": "p", "category_id": 1, "bbox": [350, 350, 20, 20], "score": 0.99},  # inside the region
        {"image_id": "p", "category_id": 1, "bbox": [10, 10, 10, 10], "score": 0.5},
    ]
    official = evaluate(t, rows, OFFICIAL).metrics["AP"]
    assert official == pytest.approx(0.5)  # precision 1/2 at every recall point
    case = [(0, 0, 0, [(350, 350, 370, 370, 0.99, 0), (10, 10, 20, 20, 0.5, 0)])]
    assert official == reference([(t[0].boxes, t[0].cls)], case, 1)["AP"]
    assert evaluate(t, rows, FULLFRAME).metrics["AP"] == 1.0  # the full-frame protocol drops it


def test_cap_is_per_image_and_class():
    # class 0: 130 objects, class 1: 60 objects, perfect detections; class 1 scores higher
    grid = [(20 * a, 20 * b, 20 * a + 10, 20 * b + 10) for a in range(13) for b in range(10)]
    more = [(400 + 20 * a, 20 * b, 400 + 20 * a + 10, 20 * b + 10) for a in range(6) for b in range(10)]
    boxes = np.array(grid + more, float)
    cls = np.array([0] * 130 + [1] * 60)
    scores = [0.5 - k * 1e-3 for k in range(130)] + [0.9 - k * 1e-3 for k in range(60)]
    case = tile_case([(*b, s, c) for b, s, c in zip(boxes, scores, cls)], windows=[(0, 0, 800, 800)])
    want = (77 / 101 + 1.0) / 2  # class 0 stops at recall 100/130 (0.769 -> 77 of 101 points), class 1 complete
    got = ours([(boxes, cls)], case, 2)
    assert got.metrics["AP"] == pytest.approx(want) == reference([(boxes, cls)], case, 2)["AP"]
    assert got.counts["det_over_max_det"] == 0  # below the largest cap, 1000
    # a cap of 100 per image over all classes keeps class 1's 60 and only 40 of class 0
    image = replace(OFFICIAL, max_det=100, max_det_scope="image")
    assert ours([(boxes, cls)], case, 2, image).metrics["AP"] == pytest.approx((31 / 101 + 1.0) / 2)  # 40/130


def test_protocol_options():
    p = protocol_from_data({"so_det": {"eval": "soda-d"}})
    assert (p.coco_max_dets, p.report_max_det, p.max_det_scope, p.drop_ignored, p.tiles) == (
        [100, 300, 1000], 100, "category", False, True
    )  # fmt: skip
    assert (p.tile, p.overlap, p.imgsz, p.merge_iou) == (800, 150, 1200, 0.5)
    f = protocol_from_data({"so_det": {"eval": "soda-d-fullframe"}})
    assert (f.coco_max_dets, f.report_max_det, f.max_det_scope, f.drop_ignored, f.tiles) == (
        [1000], 1000, "image", True, False
    )  # fmt: skip
    o = protocol_from_data({"so_det": {"eval": "soda-d", "tiles": False, "ignore": True, "max_det_scope": "image"}})
    assert (o.tiles, o.drop_ignored, o.coco_max_dets) == (False, True, [1000])
    assert protocol_from_data({"so_det": {"eval": "soda-d", "merge_iou": 0.6, "overlap": 0}}).overlap == 0
    for bad, msg in (
        ({"max_det_scope": "class"}, "max_det_scope"),
        ({"tiles": "yes"}, "tiles"),
        ({"merge_iou": 1.5}, "merge_iou"),
        ({"max_dets": [100, 0]}, "max_dets"),
        ({"tile_size": 800}, "unknown key"),
    ):
        with pytest.raises(ValueError, match=msg):
            protocol_from_data({"so_det": {"eval": "soda-d", **bad}})


# ------------------------------------------------------------------------ converter -> so-det eval / yolo val hook
def make_source(root: Path, seed: int = 0):
    """A SODA-D-like release: 2 images 1700x900, official category ids 1..9 + ignore 10, objects near the seams."""
    rng = np.random.default_rng(seed)
    (root / "Images").mkdir(parents=True)
    (root / "Annotations").mkdir()
    cats = [{"id": k + 1, "name": n} for k, n in soda.NAMES.items()] + [{"id": 10, "name": "ignore"}]
    images, anns = [], []
    for i in range(2):
        cv2.imwrite(str(root / "Images" / f"{i:05d}.jpg"), rng.integers(0, 255, (900, 1700, 3), dtype=np.uint8))
        images.append({"id": i + 1, "file_name": f"{i:05d}.jpg", "width": 1700, "height": 900})
        for _ in range(25):
            s = float(rng.choice([6, 11, 16, 22, 30, 40]))
            x, y = float(rng.uniform(560, 900)), float(rng.uniform(0, 860))  # around the x seams 650..800
            anns.append({"image_id": i + 1, "category_id": int(rng.integers(1, 4)), "bbox": [x, y, s, s]})
        anns.append({"image_id": i + 1, "category_id": 10, "bbox": [1200, 100, 200, 200]})
    for k, a in enumerate(anns):
        a.update(id=k, area=a["bbox"][2] * a["bbox"][3], iscrowd=0)
    coco = {"images": images, "annotations": anns, "categories": cats}
    (root / "Annotations" / "val.json").write_text(json.dumps(coco))
    return coco


def tile_predictions(root: Path, coco: dict, rng):
    """Detections per val tile, in tile pixels: the full boxes of objects lying whole in the tile (noisy, random
    scores, so seam objects are seen twice), false positives, one confident detection in the ignore region."""
    rows, cases = [], []
    for side in sorted((root / "sidecars" / "val").glob("*__*.json")):
        t = json.loads(side.read_text())
        x0, y0, w, h = t["tile"]["x"], t["tile"]["y"], t["width"], t["height"]
        i = int(Path(t["tile"]["source"]).stem)
        dets = []
        for a in coco["annotations"]:
            bx, by, bw, bh = a["bbox"]
            if a["image_id"] == i + 1 and a["category_id"] != 10 and bx >= x0 and by >= y0:
                if bx + bw <= x0 + w and by + bh <= y0 + h:
                    b = np.array([bx - x0, by - y0, bx + bw - x0, by + bh - y0]) + rng.normal(0, 0.05 * bw, 4)
                    dets.append((*b.round(3), round(float(rng.uniform(0.1, 1)), 5), a["category_id"] - 1))
        if (x0, y0) == (900, 0):
            dets.append((350.0, 150.0, 366.0, 166.0, 0.99, 0))  # inside the ignore region [1200, 100, 1400, 300]
        dets.append((5.0, 5.0, 25.0, 25.0, round(float(rng.uniform(0, 0.5)), 5), 1))
        cases.append((i, x0, y0, dets))
        rows += [
            {"image_id": side.stem, "file_name": f"{side.stem}.jpg", "category_id": c + 1,
             "bbox": [x1, y1, round(x2 - x1, 3), round(y2 - y1, 3)], "score": s}
            for x1, y1, x2, y2, s, c in dets
        ]  # fmt: skip
    return rows, cases


def test_converted_split_so_det_eval_and_hook_match_reference(tmp_path):
    from so_det_ultra.cli import main
    from so_det_ultra.metrics.hooks import on_val_end

    coco = make_source(tmp_path / "SODA-D")
    soda.convert_soda(tmp_path / "SODA-D", tmp_path / "out", splits=("val",), show_progress=False, verbose=False)
    out = tmp_path / "out"
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["so_det"] == soda.SO_DET and data["so_det"]["imgsz"] == 1200
    tiles = sorted((out / "images" / "val").iterdir())
    assert len(tiles) == 2 * len(tiling.tile_windows(900, 1700))  # every val tile, empty or not
    parent = contract.read_sidecar(out / "sidecars" / "val" / "00000.json")
    assert (parent.width, parent.height, parent.tile, len(parent.objects)) == (1700, 900, None, 25)
    assert parent.ignore.tolist() == [[1200, 100, 1400, 300]]

    rows, cases = tile_predictions(out, coco, np.random.default_rng(1))
    (tmp_path / "pred.json").write_text(json.dumps(rows))
    parents = []
    for i in range(2):
        a = [x for x in coco["annotations"] if x["image_id"] == i + 1 and x["category_id"] != 10]
        parents.append((np.array([[x, y, x + w, y + h] for x, y, w, h in (v["bbox"] for v in a)]),
                        np.array([v["category_id"] - 1 for v in a])))  # fmt: skip
    want = reference(parents, cases, 9)
    assert 0.1 < want["AP"] < 0.99

    pred, res = str(tmp_path / "pred.json"), str(tmp_path / "e.json")
    assert main(["eval", "--data", str(out / "data.yaml"), "--pred", pred, "--json", res]) == 0
    got = json.loads(Path(res).read_text())
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert got["counts"]["images"] == 2 and got["counts"]["tiles"] == len(tiles) and got["counts"]["det_merged"] > 0
    assert got["protocol"]["max_dets"] == [100, 300, 1000] and got["protocol"]["drop_ignored"] is False

    # the yolo val hook (on_val_end) on the same tiles and jdict gives the same numbers
    save = tmp_path / "run"
    save.mkdir()
    v = SimpleNamespace(
        args=SimpleNamespace(task="detect", single_cls=False, verbose=False, split="val", plots=False, imgsz=1200),
        data={**data, "path": str(out), "val": str(out / "images" / "val")},
        pred_to_json=None,
        dataloader=SimpleNamespace(dataset=SimpleNamespace(im_files=[str(t) for t in tiles])),
        jdict=rows,
        save_dir=save,
        training=False,
        metrics=None,
    )
    on_val_end(v)
    hook = json.loads((save / "so_det_metrics.json").read_text())
    assert all(hook[k] == got[k] for k in (*KEYS, "per_class", "counts"))

    # the tiles evaluated as images of their own: tiles: false
    t = load_eval_truth(tiles, out, tiles=False)
    assert len(t.images) == len(tiles) and not t.tiles
