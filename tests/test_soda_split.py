"""The SODA-D split rules of github shaunyuan22/SODA-mmdetection ``tools/img_split/sodad_split.py`` and the ignore
flags of its evaluator (``mmdet/datasets/sodad_eval/sodadeval.py``), on generated SODA-D sources (docs/datasets.md)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from so_det_ultra.data import contract, soda
from so_det_ultra.metrics.evaluate import evaluate
from so_det_ultra.metrics.protocol import PROTOCOLS
from so_det_ultra.metrics.truth import ImageTruth, load_eval_truth

W, H = 1700, 900  # tile starts along x: 0, 650, 900; along y: 0, 100
PEOPLE, IGNORE = 1, 10


def make_release(root: Path, anns: list, size=(W, H), split="train", seed=0) -> np.ndarray:
    """One image ``a.jpg`` (random pixels, PNG-like quality: stored as .png) with ``anns`` = [(bbox, cat, extra)]."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(exist_ok=True)
    img = np.random.default_rng(seed).integers(40, 255, (size[1], size[0], 3), dtype=np.uint8)
    cv2.imwrite(str(root / "Images" / "a.png"), img)
    cats = [{"id": k + 1, "name": n} for k, n in soda.NAMES.items()] + [{"id": IGNORE, "name": "ignore"}]
    rows = [
        {"id": k, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0, **extra}
        for k, (b, c, extra) in enumerate(anns)
    ]
    images = [{"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]}]
    (root / "Annotations" / f"{split}.json").write_text(
        json.dumps({"images": images, "annotations": rows, "categories": cats})
    )
    return img


def convert(tmp_path: Path, split="train", **kw):
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    soda.convert_soda(tmp_path / "SODA-D", out, splits=(split,), show_progress=False, verbose=False, **kw)
    return out


def tiles_of(out: Path, split="train") -> dict:
    """``{(x, y): (sidecar dict, image array)}`` of the split's tiles."""
    res = {}
    for f in sorted((out / "sidecars" / split).glob("a__*.json")):
        t = json.loads(f.read_text())
        res[(t["tile"]["x"], t["tile"]["y"])] = (t, cv2.imread(str(out / "images" / split / t["image"])))
    return res


def test_cut_objects_sliver_pixels_are_kept_and_only_the_ignore_category_is_filled(tmp_path):
    """sodad_split.py fills category-10 boxes only and restores every object box, cut ones included (lines 329-341)."""
    img = make_release(
        tmp_path / "SODA-D",
        [
            ([780, 300, 100, 20], PEOPLE, {}),  # 20 of 100 px inside tile x=0: a sliver there, whole in tile 650
            ([100, 100, 300, 300], IGNORE, {}),  # ignore region, filled
            ([150, 150, 20, 20], PEOPLE, {}),  # an object inside it: its pixels restored
        ],
    )
    tiles = tiles_of(convert(tmp_path))
    side, tile = tiles[(0, 0)]
    assert [780, 300, 800, 320] in side["ignore"] and all(o["box"] != [780, 300, 800, 320] for o in side["objects"])
    sliver = (slice(300, 320), slice(780, 800))
    assert np.abs(tile[sliver].astype(float) - img[sliver]).max() <= 1, "the sliver's pixels must be kept"
    assert tile[200:240, 300:380].max() == 0, "the ignore category's region must be filled black"
    assert np.abs(tile[150:170, 150:170].astype(float) - img[150:170, 150:170]).max() <= 1  # object restored
    side, _ = tiles[(85, 0)]  # the training extent ends at 880 + 5: tiles start at x = 0 and 85
    assert side["objects"][0]["box"] == [695, 300, 795, 320]  # whole in the next tile

    old = tiles_of(convert(tmp_path, fill_slivers=True))[(0, 0)][1]  # the earlier reading: slivers filled too
    assert old[sliver].max() == 0


def test_object_exactly_at_the_threshold_is_ignored(tmp_path):
    """sodad_split.py line 295: ``ignore`` when visible / area <= interAreaIgnThr (0.4); above it the object is kept."""
    make_release(
        tmp_path / "SODA-D",
        [([760, 300, 100, 20], PEOPLE, {}), ([759, 500, 100, 20], PEOPLE, {})],  # 40 % and 41 % inside tile x=0
    )
    side = tiles_of(convert(tmp_path))[(0, 0)][0]
    boxes = [o["box"] for o in side["objects"]]
    assert [760, 300, 800, 320] in side["ignore"] and [760, 300, 800, 320] not in boxes  # exactly 0.4: ignored
    assert [759, 500, 800, 520] in boxes  # 0.41: kept
    labels = (tmp_path / "out0" / "labels" / "train" / "a__0_0.txt").read_text().splitlines()
    assert len(labels) == 1


def test_training_extent_and_tiles_with_only_a_sliver(tmp_path):
    """Training tiles cover the annotations' extent + 5 px (lines 176-177); a tile any object intersects is kept
    (line 209), also when it holds only a sliver (no label)."""
    make_release(tmp_path / "SODA-D", [([990, 300, 10, 10], PEOPLE, {}), ([40, 40, 10, 10], PEOPLE, {})])
    # extent x: 1000 + 5 -> starts 0, 205 (the image's 1700 would give 0, 650, 900); y: 310 + 5 < 800 -> 800 high
    assert set(tiles_of(convert(tmp_path))) == {(0, 0), (205, 0)}
    full = {(0, 0), (650, 0), (900, 0), (650, 100), (900, 100)}  # the whole image: tiles holding an object
    assert set(tiles_of(convert(tmp_path, limit_extent=False))) == full

    make_release(tmp_path / "SODA-D", [([790, 300, 100, 20], PEOPLE, {}), ([1600, 800, 20, 20], PEOPLE, {})])
    tiles = tiles_of(convert(tmp_path, limit_extent=False))
    side, _ = tiles[(0, 0)]  # only 10 % of the first object: a sliver, no label, the tile is kept
    assert side["objects"] == [] and side["ignore"] == [[790, 300, 800, 320]]


def test_image_without_annotations_is_not_split(tmp_path):
    """``_getIndexLst`` takes image ids from ``imgToAnns``: an image without annotations has no tiles, in any split."""
    root = tmp_path / "SODA-D"
    make_release(root, [], split="val")
    coco = json.loads((root / "Annotations" / "val.json").read_text())  # a second image, b.png, with one object
    (root / "Images" / "b.png").write_bytes((root / "Images" / "a.png").read_bytes())
    coco["images"].append({"id": 2, "file_name": "b.png", "width": W, "height": H})
    coco["annotations"] = [{"id": 0, "image_id": 2, "category_id": PEOPLE, "bbox": [5, 5, 9, 9], "iscrowd": 0}]
    (root / "Annotations" / "val.json").write_text(json.dumps(coco))
    out = convert(tmp_path, split="val")
    assert {p.name.split("__")[0] for p in (out / "images" / "val").iterdir()} == {"b"}
    assert not (out / "sidecars" / "val" / "a.json").exists()
    out = convert(tmp_path, split="val", keep_empty=True)
    assert len(list((out / "images" / "val").glob("a__*"))) == 6


def test_ignore_flags_as_the_official_tools_read_them(tmp_path):
    """Only category 10 is an ignored region (generate_wo_ignore.py); an object flagged ``ignore`` is a training label
    and ignored ground truth of its parent (sodadeval.py line 115); ``iscrowd`` is not read (line 277)."""
    anns = [
        ([40, 40, 10, 10], PEOPLE, {"ignore": True}),
        ([80, 40, 10, 10], PEOPLE, {"iscrowd": 1}),
        ([120, 40, 10, 10], PEOPLE, {}),
        ([300, 300, 50, 50], IGNORE, {}),
    ]
    for split in ("train", "val"):
        make_release(tmp_path / "SODA-D", anns, split=split)
    out = tmp_path / "flags"
    soda.convert_soda(tmp_path / "SODA-D", out, splits=("train", "val"), show_progress=False, verbose=False)
    assert len((out / "labels" / "train" / "a__0_0.txt").read_text().splitlines()) == 3
    parent = contract.read_sidecar(out / "sidecars" / "val" / "a.json")
    assert [o.box for o in parent.objects] == [(80, 40, 90, 50), (120, 40, 130, 50)]
    assert [o.box for o in parent.ignored_objects] == [(40, 40, 50, 50)] and parent.ignore.tolist() == [
        [300, 300, 350, 350]
    ]

    truth = load_eval_truth(sorted((out / "images" / "val").iterdir()), out)  # what the evaluation scores
    assert truth.images[0].ignored_boxes.tolist() == [[40, 40, 50, 50]] and len(truth.images[0].boxes) == 2

    old = tmp_path / "region"
    soda.convert_soda(tmp_path / "SODA-D", old, splits=("val",), show_progress=False, verbose=False, flags="region")
    parent = contract.read_sidecar(old / "sidecars" / "val" / "a.json")
    assert len(parent.objects) == 1 and len(parent.ignore) == 3 and parent.ignored_objects == []
    with pytest.raises(ValueError, match="flags"):
        soda.convert_soda(tmp_path / "SODA-D", old, splits=("val",), flags="crowd")


def test_flagged_ground_truth_is_neither_rewarded_nor_punished():
    """COCO ignore semantics for flagged ground truth: missing it costs no recall, a detection on it is no FP."""
    boxes, cls = np.array([[10.0, 10, 30, 30]]), np.array([0])
    flagged = np.array([[60.0, 60, 80, 80]])
    det_on_regular = {"image_id": "a", "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5}
    det_on_flagged = {"image_id": "a", "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.9}
    p = PROTOCOLS["soda-d"]

    def ap(rows, ig=True):
        t = ImageTruth(Path("a.jpg"), 100, 100, boxes, cls, ignored_boxes=flagged, ignored_cls=np.array([0]))
        if not ig:  # the same box as a regular object
            t = ImageTruth(Path("a.jpg"), 100, 100, np.vstack([boxes, flagged]), np.array([0, 0]))
        r = evaluate([t], rows, p, ["people"])
        return r.metrics["AP50"], r.counts

    got, counts = ap([det_on_regular, det_on_flagged])
    assert got == pytest.approx(1.0) and counts["gt"] == 1 and counts["gt_flagged"] == 1
    assert ap([det_on_regular])[0] == pytest.approx(1.0)  # missing the flagged one costs nothing
    assert ap([det_on_regular], ig=False)[0] < 0.6  # as a regular object, missing it halves the recall
