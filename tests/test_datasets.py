"""Dataset converters: VisDrone2019-DET and SODA-D -> YOLO labels + sidecars, shipped dataset YAMLs.

Real-data tests use the VisDrone sample (``VISDRONE_SAMPLE``) and skip where it is absent; SODA-D uses a COCO JSON
built here. One stock-CLI run trains through ``data=visdrone.yaml`` (offline conversion step) on a 8+4 image subset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import BIN, FAST, VISDRONE_SAMPLE, clean_env, run, yolo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from so_det_ultra.data import contract, soda, tiling, visdrone
from so_det_ultra.data._summary import Summary

needs_sample = pytest.mark.skipif(
    not (VISDRONE_SAMPLE / "annotations").is_dir(),
    reason=f"VisDrone sample not found at {VISDRONE_SAMPLE} (set SO_DET_VISDRONE_SAMPLE to its folder)",
)


def tree_digest(root: Path, skip=()) -> str:
    """Hash of every file's relative path, bytes and mtime under ``root`` (except names in ``skip``)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in skip:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def official_rows(path: Path):
    return [list(map(int, line.split(",")[:8])) for line in path.read_text().splitlines() if line.strip()]


def subset(dst: Path, stems, folder="images"):
    """A VisDrone split folder holding copies of the sample's ``stems``."""
    (dst / "images").mkdir(parents=True)
    (dst / "annotations").mkdir()
    for s in stems:
        shutil.copy2(VISDRONE_SAMPLE / "images" / f"{s}.jpg", dst / "images")
        shutil.copy2(VISDRONE_SAMPLE / "annotations" / f"{s}.txt", dst / "annotations")
    return dst


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The whole sample converted once (split train), with the source digest taken before."""
    if not (VISDRONE_SAMPLE / "annotations").is_dir():
        pytest.skip(f"VisDrone sample not found at {VISDRONE_SAMPLE}")
    before = tree_digest(VISDRONE_SAMPLE)
    dst = tmp_path_factory.mktemp("visdrone")
    summary = visdrone.convert_visdrone(VISDRONE_SAMPLE, dst, show_progress=False, verbose=False)
    return dst, summary, before


# ----------------------------------------------------------------------------------------------- VisDrone, real data
@needs_sample
def test_sample_labels_match_official_rows(converted):
    dst, summary, _ = converted
    anns = sorted((VISDRONE_SAMPLE / "annotations").glob("*.txt"))
    assert summary.images["train"] == len(anns) == len(list((dst / "labels" / "train").glob("*.txt")))
    assert not summary.problems, summary.problems[:5]
    total = 0
    for ann in anns:
        rows = official_rows(ann)
        want = [r for r in rows if r[4] == 1 and 1 <= r[5] <= 10]
        side = json.loads((dst / "sidecars" / "train" / f"{ann.stem}.json").read_text())
        w, h = side["width"], side["height"]
        assert (w, h) == cv2.imread(str(VISDRONE_SAMPLE / "images" / f"{ann.stem}.jpg")).shape[1::-1]
        labels = np.loadtxt(dst / "labels" / "train" / f"{ann.stem}.txt", ndmin=2).reshape(-1, 5)
        assert len(labels) == len(want), ann.name
        assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all(), ann.name
        for (c, xc, yc, bw, bh), r, obj in zip(labels, want, side["objects"]):
            back = [(xc - bw / 2) * w, (yc - bh / 2) * h, bw * w, bh * h]
            assert np.abs(np.array(back) - r[:4]).max() <= 1.0, (ann.name, back, r)
            assert int(c) == r[5] - 1 == obj["cls"]
            assert (obj["truncation"], obj["occlusion"]) == (r[6], r[7])
        assert side["ignore"] == [[x, y, x + bw_, y + bh_] for x, y, bw_, bh_, s, c, *_ in rows if c == 0]
        total += len(want)
    assert sum(summary.objects.values()) == total
    assert sum(summary.scales.values()) == total
    assert summary.skipped["others (category 11)"] == sum(1 for a in anns for r in official_rows(a) if r[5] == 11)


@needs_sample
def test_source_untouched_and_rerun_idempotent(converted, tmp_path):
    dst, _, before = converted
    outputs = tree_digest(dst, skip={"convert-visdrone.log"})  # the log records this run's counts
    listing = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    again = visdrone.convert_visdrone(VISDRONE_SAMPLE, dst, show_progress=False, verbose=False)
    assert tree_digest(VISDRONE_SAMPLE) == before, "the source folder changed"
    assert again.files_written == 0 and again.stale_removed == 0
    assert tree_digest(dst, skip={"convert-visdrone.log"}) == outputs, "a rerun changed labels, sidecars or images"
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == listing, "a rerun added files"
    data = yaml.safe_load((dst / "data.yaml").read_text())
    assert data["names"] == visdrone.NAMES and data["so_det"]["eval"] == "visdrone"
    assert data["train"] == data["val"] == "images/train"  # no val split in the sample: train doubles as val
    with pytest.raises(ValueError, match="source"):
        visdrone.convert_visdrone(VISDRONE_SAMPLE, VISDRONE_SAMPLE / "out", show_progress=False, verbose=False)


@needs_sample
def test_mask_ignored_regions(tmp_path):
    stem = "0000142_04658_d_0000046"  # has ignored regions
    src = subset(tmp_path / "dl" / "VisDrone2019-DET-val", [stem])
    plain = visdrone.convert_visdrone(tmp_path / "dl", tmp_path / "plain", show_progress=False, verbose=False)
    assert plain.images == {"val": 1}
    out = tmp_path / "plain" / "images" / "val" / f"{stem}.jpg"
    assert out.read_bytes() == (src / "images" / f"{stem}.jpg").read_bytes(), "default must not alter images"
    visdrone.convert_visdrone(
        tmp_path / "dl", tmp_path / "masked", mask_ignored=True, mask_style="grey", show_progress=False, verbose=False
    )
    side = json.loads((tmp_path / "masked" / "sidecars" / "val" / f"{stem}.json").read_text())
    img = cv2.imread(str(tmp_path / "masked" / "images" / "val" / f"{stem}.jpg")).astype(int)
    orig = cv2.imread(str(out)).astype(int)
    objects = np.zeros(img.shape[:2], bool)
    for o in side["objects"]:
        x1, y1, x2, y2 = o["box"]
        objects[y1:y2, x1:x2] = True
    ignored = np.zeros(img.shape[:2], bool)
    for x1, y1, x2, y2 in side["ignore"]:
        ignored[y1:y2, x1:x2] = True
    grey = ignored & ~objects
    assert grey.sum() > 1000
    assert np.abs(img[grey] - 114).mean() < 3, "ignored regions are not grey"
    assert np.abs(img[~ignored] - orig[~ignored]).mean() < 3, "pixels outside ignored regions changed"


# ------------------------------------------------------------------------------------ VisDrone, property tests
W, H = 200, 100
coord = st.integers(-50, 260)
size = st.integers(-3, 120)
valid_row = st.tuples(
    st.integers(0, W - 1),
    st.integers(0, H - 1),
    st.integers(1, 80),
    st.integers(1, 80),
    st.integers(0, 1),
    st.integers(0, 11),
    st.integers(0, 2),
    st.integers(0, 3),
)
bad_line = st.one_of(
    st.lists(st.integers(0, 9).map(str), min_size=1, max_size=12).filter(lambda f: len(f) not in (8, 9)).map(",".join),
    st.tuples(valid_row, st.integers(0, 7), st.sampled_from(["abc", "", "1e", "nan", "--1"])).map(
        lambda t: ",".join(t[2] if i == t[1] else str(v) for i, v in enumerate(t[0]))
    ),
    valid_row.map(lambda r: ",".join(map(str, (*r[:2], 0, *r[3:])))),  # zero width
    valid_row.map(lambda r: ",".join(map(str, (*r[:3], -r[3], *r[4:])))),  # negative height
    valid_row.map(lambda r: ",".join(map(str, (W + 5, *r[1:])))),  # entirely right of the image
    valid_row.map(lambda r: ",".join(map(str, (*r[:5], 12, *r[6:])))),  # unknown category
    valid_row.map(lambda r: ",".join(map(str, (*r[:4], 2, *r[5:])))),  # score not 0/1
)
line = st.one_of(valid_row.map(lambda r: ("ok", r)), bad_line.map(lambda s: ("bad", s)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line, max_size=25))
def test_parse_annotation_properties(items):
    """No valid box is lost, no invalid one is written, every bad line is reported once (with its line number)."""
    text = [",".join(map(str, v)) if kind == "ok" else v for kind, v in items]
    s = Summary()
    ann = visdrone.parse_annotation(text, W, H, "f.txt", s)
    want_obj, want_ign, bad_lines = [], [], []
    for i, (kind, v) in enumerate(items, 1):
        if kind == "bad":
            bad_lines.append(i)
            continue
        x, y, w, h, score, cat, t, o = v
        box = (max(x, 0), max(y, 0), min(x + w, W), min(y + h, H))
        if cat == 0:
            want_ign.append(list(box))
        elif cat != 11 and score == 1:
            want_obj.append((cat - 1, *box, t, o))
    assert ann.objects == want_obj
    assert ann.ignore == want_ign
    assert [int(p.split(":")[1]) for p in s.problems] == bad_lines
    for _, x1, y1, x2, y2, *_ in ann.objects:
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="0123456789,.-e \tx", max_size=30), max_size=15))
def test_parse_annotation_random_text_never_crashes(lines):
    s = Summary()
    ann = visdrone.parse_annotation(lines, W, H, "f.txt", s)
    nonblank = sum(1 for x in lines if x.strip())
    not_written = s.skipped["others (category 11)"] + s.skipped["score 0"]
    assert len(s.problems) + len(ann.objects) + len(ann.ignore) + not_written == nonblank
    rows = contract.yolo_rows(ann.objects, W, H)
    for r in rows.splitlines():
        c, *xywh = r.split()
        assert 0 <= int(c) <= 9 and all(0 <= float(v) <= 1 for v in xywh)


def test_cli_reports_bad_lines_and_missing_source(tmp_path):
    """``so-det convert visdrone``: malformed lines reported as file:line and counted, the run still succeeds."""
    split = tmp_path / "src" / "VisDrone2019-DET-train"
    (split / "images").mkdir(parents=True)
    (split / "annotations").mkdir()
    cv2.imwrite(str(split / "images" / "a.jpg"), np.full((60, 80, 3), 50, np.uint8))
    (split / "annotations" / "a.txt").write_text(
        "1,2,10,10,1,4,0,1\n1,2,x,10,1,4,0,0\n70,50,20,20,1,1,1,2\n5,5,5,5,0,0,0,0\n1,2,3\n"
    )
    out = run(
        [BIN / "so-det", "convert", "visdrone", tmp_path / "src", tmp_path / "dst", "--no-progress"], cwd=tmp_path
    )
    text = out.stdout
    assert "a.txt:2: non-numeric field" in text and "a.txt:5: expected 8 comma-separated fields, got 3" in text
    assert "malformed: non-numeric field: 1" in text and "ignored region (category 0) -> sidecar: 1" in text
    assert "boxes clipped to the image/tile: 1" in text
    labels = (tmp_path / "dst" / "labels" / "train" / "a.txt").read_text().splitlines()
    assert labels == ["3 0.075000 0.116667 0.125000 0.166667", "0 0.937500 0.916667 0.125000 0.166667"]
    assert "a.txt:2" in (tmp_path / "dst" / "convert-visdrone.log").read_text()
    proc = subprocess.run(
        [str(BIN / "so-det"), "convert", "visdrone", str(tmp_path / "nothing"), str(tmp_path / "d2")],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert proc.returncode == 2 and "VisDrone2019-DET-train.zip" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_message_names_files(tmp_path, monkeypatch):
    monkeypatch.delenv(visdrone.ENV_SRC, raising=False)
    monkeypatch.delenv(soda.ENV_SRC, raising=False)
    with pytest.raises(FileNotFoundError, match=r"VisDrone2019-DET-val\.zip.*\n.*\n.*SO_DET_VISDRONE_SRC"):
        visdrone.prepare_from_yaml({"path": tmp_path / "root" / "vd"})
    with pytest.raises(FileNotFoundError, match=r"Annotations/\{train,val,test\}\.json"):
        soda.prepare_from_yaml({"path": tmp_path / "root" / "soda"})


# --------------------------------------------------------------------------------------------------------- SODA-D
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(16, 1000), st.data())
def test_tile_starts_cover_with_overlap(length, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    starts = tiling.tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(starts[-1] + tile, length) == length
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap  # consecutive tiles overlap by at least `overlap` (more at the last one)
        assert b - a <= tile - overlap or b == length - tile


def make_soda(root: Path):
    """Two 1700x900 images, categories with non-contiguous ids plus `ignore`; objects on tile borders."""
    (root / "Images").mkdir(parents=True)
    (root / "Annotations").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(root / "Images" / name), rng.integers(0, 255, (900, 1700, 3), dtype=np.uint8))
    cats = [{"id": 7, "name": "vehicle"}, {"id": 3, "name": "people"}, {"id": 10, "name": "ignore"}]
    anns = [
        ([10, 10, 20, 20], 3),  # inside the first tile only
        ([780, 300, 40, 30], 7),  # straddles x=800 (tile 0 ends) but fully inside tile x=650
        ([1450, 700, 200, 150], 7),  # inside the last tile (x=900, y=100)
        ([640, 40, 20, 10], 3),  # 10 of 20 px left of x=650: exactly 50% in tile 650
        ([1680, 880, 40, 40], 3),  # partly outside the image: clipped to 20x20
        ([100, 100, 300, 300], 10),  # ignore region
        ([5, 5, 10, 10], 10),
    ]
    annotations = [
        {"id": k, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (b, c) in enumerate(anns)
    ]
    annotations += [
        {"id": 90, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        {"id": 91, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5], "iscrowd": 0},  # malformed
        {"id": 92, "image_id": 9, "category_id": 3, "bbox": [1, 1, 5, 5]},  # unknown image
        {"id": 93, "image_id": 2, "category_id": 7, "bbox": [50, 50, 8, 8], "ignore": True},  # flagged ignore
    ]
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 1700, "height": 900},
        {"id": 2, "file_name": "b.jpg", "width": 1700, "height": 900},
    ]
    coco = {"images": images, "annotations": annotations, "categories": cats}
    for split in ("train", "val"):
        (root / "Annotations" / f"{split}.json").write_text(json.dumps(coco))
    return [(b, c) for b, c in anns if c != 10]


def test_soda_fills_ignored_regions_black_by_default(tmp_path):
    """As the official split (``ignFillVal`` [0, 0, 0]): ignored pixels of every tile are black; off on request."""
    make_soda(tmp_path / "SODA-D")
    for mask, out in ((True, "on"), (False, "off")):
        kw = {} if mask else {"mask_ignored": False}
        soda.convert_soda(
            tmp_path / "SODA-D", tmp_path / out, splits=("train",), show_progress=False, verbose=False, **kw
        )
    src = cv2.imread(str(tmp_path / "SODA-D" / "Images" / "a.jpg")).astype(float)
    region = (slice(120, 380), slice(120, 380))  # inside the ignore box [100, 100, 400, 400], no object there
    on = cv2.imread(str(tmp_path / "on" / "images" / "train" / "a__0_0.jpg")).astype(float)
    off = cv2.imread(str(tmp_path / "off" / "images" / "train" / "a__0_0.jpg")).astype(float)
    assert on[region].mean() < 3, "ignored region not filled black"
    assert np.abs(off[region] - src[region]).mean() < 8, "mask_ignored=False changed the ignored region"
    assert np.abs(on[500:700, 500:700] - src[500:700, 500:700]).mean() < 8, "pixels outside ignored regions changed"


def test_soda_tiles_border_rule_and_classes(tmp_path):
    objects = make_soda(tmp_path / "SODA-D")
    before = tree_digest(tmp_path / "SODA-D")
    s = soda.convert_soda(
        tmp_path / "SODA-D", tmp_path / "out", splits=("train", "val"), show_progress=False, verbose=False
    )
    assert tree_digest(tmp_path / "SODA-D") == before
    assert s.names == {0: "people", 1: "vehicle"}  # ids 3, 7 -> 0, 1; `ignore` is not a class
    assert [p.split(":", 2)[-1].strip() for p in s.problems].count("bbox is not 4 finite numbers") == 2  # 2 splits
    data = yaml.safe_load((tmp_path / "out" / "data.yaml").read_text())
    assert data["names"] == s.names and data["so_det"]["eval"] == "soda-d"
    # val keeps the full image with every object and the ignore regions in full-image pixels
    side = json.loads((tmp_path / "out" / "sidecars" / "val" / "a.json").read_text())
    assert (side["width"], side["height"]) == (1700, 900) and len(side["objects"]) == 5
    assert side["ignore"] == [[100, 100, 400, 400], [5, 5, 15, 15]]
    assert [o["cls"] for o in side["objects"]] == [0, 1, 1, 0, 0]
    assert side["objects"][4]["box"] == [1680, 880, 1700, 900]
    side_b = json.loads((tmp_path / "out" / "sidecars" / "val" / "b.json").read_text())
    assert side_b["ignore"] == [] and len(side_b["objects"]) == 1  # the flagged object: ignored ground truth
    assert side_b["ignored_objects"] == [{"cls": 1, "box": [50, 50, 58, 58]}]
    # train: tiles of a.jpg by the border rule
    tiles = {}
    for f in sorted((tmp_path / "out" / "sidecars" / "train").glob("a__*.json")):
        t = json.loads(f.read_text())
        tiles[(t["tile"]["x"], t["tile"]["y"])] = t
        img = cv2.imread(str(tmp_path / "out" / "images" / "train" / t["image"]))
        assert img.shape[1::-1] == (t["width"], t["height"]) and max(img.shape[:2]) <= 800
        labels = np.loadtxt(tmp_path / "out" / "labels" / "train" / f"{f.stem}.txt", ndmin=2).reshape(-1, 5)
        assert len(labels) == len(t["objects"]) and ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all()
    windows = tiling.tile_windows(900, 1700)
    assert set(tiles) <= {w[:2] for w in windows}
    for k, (b, c) in enumerate(objects):
        x1, y1, x2, y2 = b[0], b[1], min(b[0] + b[2], 1700), min(b[1] + b[3], 900)
        kept_in = 0
        for wx0, wy0, wx1, wy1 in windows:
            ix = max(0, min(x2, wx1) - max(x1, wx0)) * max(0, min(y2, wy1) - max(y1, wy0))
            want = ix >= 0.5 * (x2 - x1) * (y2 - y1)
            t = tiles.get((wx0, wy0))
            box = [max(x1, wx0) - wx0, max(y1, wy0) - wy0, min(x2, wx1) - wx0, min(y2, wy1) - wy0]
            have = t is not None and any(o["box"] == box for o in t["objects"])
            assert have == want, (k, (wx0, wy0), box)
            if have:
                kept_in += 1
                assert next(o["cls"] for o in t["objects"] if o["box"] == box) == {3: 0, 7: 1}[c]
            elif ix > 0 and t is not None:
                assert box in t["ignore"], "a cut object's sliver must become an ignored region of the tile"
        assert kept_in >= 1, f"object {k} is in no tile"
    assert tiles[(650, 0)]["objects"][0]["box"] == [130, 300, 170, 330]  # the x=800 straddler, whole here
    # a stricter border rule drops the exactly-half-visible object from tile (650, 0), rerun cleans stale tiles
    s2 = soda.convert_soda(
        tmp_path / "SODA-D", tmp_path / "out", splits=("train",), min_visible=0.6, show_progress=False, verbose=False
    )
    t = json.loads((tmp_path / "out" / "sidecars" / "train" / "a__650_0.json").read_text())
    assert [0, 40, 10, 50] in t["ignore"] and all(o["box"] != [0, 40, 10, 50] for o in t["objects"])
    assert s2.skipped["cut by a tile border, <= 0.6 visible -> tile ignore"] > 0


# ------------------------------------------------------------------------------- shipped YAMLs and the stock CLI
def test_shipped_yamls_carry_contract():
    from so_det_ultra import paths

    for name, mod in (("visdrone.yaml", visdrone), ("soda-d.yaml", soda)):
        p = paths.dataset_cfg(name)
        assert p is not None and p.is_file(), name
        d = yaml.safe_load(p.read_text())
        assert d["names"] == mod.NAMES and d["so_det"] == mod.SO_DET
        assert "prepare_from_yaml(yaml)" in d["download"] and "http" not in d["download"]
    assert paths.dataset_cfg("VisDrone.yaml") is None  # Ultralytics' own name is left alone


@needs_sample
@pytest.mark.cli
def test_stock_cli_trains_via_visdrone_yaml_offline(tmp_path, workdir):
    """`yolo train data=visdrone.yaml` from a foreign dir: the offline step converts local folders, then trains."""
    stems = sorted(p.stem for p in (VISDRONE_SAMPLE / "images").glob("*.jpg"))
    src = tmp_path / "downloads"
    subset(src / "VisDrone2019-DET-train", stems[:8])
    subset(src / "VisDrone2019-DET-val", stems[8:12])
    env = clean_env(YOLO_CONFIG_DIR=tmp_path / "ycfg", SO_DET_VISDRONE_SRC=src)
    run([BIN / "yolo", "settings", f"datasets_dir={tmp_path / 'datasets'}"], cwd=workdir, env=env)
    out = yolo(
        "train",
        "model=so-det-n.yaml",
        "data=visdrone.yaml",
        *FAST,
        f"project={tmp_path / 'runs'}",
        "name=vd",
        cwd=workdir,
        env=env,
    )
    root = tmp_path / "datasets" / "so-det-visdrone"
    assert len(list((root / "labels" / "train").glob("*.txt"))) == 8
    assert len(list((root / "sidecars" / "val").glob("*.json"))) == 4
    assert (tmp_path / "runs" / "vd" / "weights" / "last.pt").is_file()
    assert "objects written" in out.stdout + out.stderr
    # the converter's own data.yaml works with the stock CLI too
    yolo(
        "train",
        "model=so-det-n.yaml",
        f"data={root / 'data.yaml'}",
        *FAST,
        f"project={tmp_path / 'runs'}",
        "name=vd2",
        cwd=workdir,
        env=env,
    )
    assert (tmp_path / "runs" / "vd2" / "weights" / "last.pt").is_file()


@needs_sample
def test_visdrone_from_zip_archive(tmp_path):
    stems = sorted(p.stem for p in (VISDRONE_SAMPLE / "images").glob("*.jpg"))[:2]
    folder = subset(tmp_path / "unzipped" / "VisDrone2019-DET-val", stems)
    (tmp_path / "dl").mkdir()
    archive = Path(
        shutil.make_archive(str(tmp_path / "dl" / "VisDrone2019-DET-val"), "zip", folder.parent, folder.name)
    )
    before = tree_digest(tmp_path / "dl")
    s = visdrone.convert_visdrone(tmp_path / "dl", tmp_path / "out", show_progress=False, verbose=False)
    assert archive.name == "VisDrone2019-DET-val.zip" and tree_digest(tmp_path / "dl") == before
    assert s.images == {"val": 2} and not (tmp_path / "out" / ".extract").exists()
    for stem in stems:
        got = (tmp_path / "out" / "images" / "val" / f"{stem}.jpg").read_bytes()
        assert got == (folder / "images" / f"{stem}.jpg").read_bytes()


def test_soda_yaml_download_step_converts_local_folder(tmp_path, monkeypatch):
    """The `download:` step of soda-d.yaml finds the release in `path`'s parent (datasets_dir) and converts it."""
    monkeypatch.delenv(soda.ENV_SRC, raising=False)
    make_soda(tmp_path / "datasets" / "SODA-D")
    root = tmp_path / "datasets" / "so-det-soda-d"
    script = yaml.safe_load(_dataset_yaml("soda-d.yaml").read_text())["download"]
    exec(script, {"yaml": {"path": root}})  # what Ultralytics' check_det_dataset does with a Python `download:`
    assert any((root / "images" / "val").glob("a__*.jpg")) and any((root / "images" / "train").glob("a__*.jpg"))
    assert (root / "sidecars" / "val" / "a.json").is_file()  # val is tiled; a.jpg's own sidecar stays
    assert yaml.safe_load((root / "data.yaml").read_text())["val"] == "images/val"


def _dataset_yaml(name):
    from so_det_ultra import paths

    return paths.dataset_cfg(name)


@pytest.mark.parametrize(
    "argv", [["convert", "--help"], ["convert", "visdrone", "--help"], ["convert", "soda-d", "--help"]]
)
def test_convert_help(argv, capsys):
    from so_det_ultra.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage: so-det convert" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ data contract, tiling, CLI
def test_sidecar_round_trip_and_paths(tmp_path):
    ann = contract.Annotation([(1, 2.0, 3.5, 10.25, 20.0, None, None)], [[0, 0, 5.12345, 5]])
    path = contract.sidecar_path(tmp_path / "images" / "val" / "a.jpg", tmp_path)
    assert path == tmp_path / "sidecars" / "val" / "a.json"
    assert contract.write_sidecar(path, "a.jpg", 40, 30, ann, tile={"source": "big.jpg", "x": 800, "y": 0})
    assert not contract.write_sidecar(path, "a.jpg", 40, 30, ann, tile={"source": "big.jpg", "x": 800, "y": 0})
    side = contract.read_sidecar(path)
    assert (side.image, side.width, side.height, side.tile.x) == ("a.jpg", 40, 30, 800)
    assert side.ignore.tolist() == [[0, 0, 5.123, 5]] and side.objects[0].box == (2, 3.5, 10.25, 20)
    assert contract.read_sidecar(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json"):
        contract.read_sidecar(tmp_path / "bad.json")
    labels = tmp_path / "a.txt"
    labels.write_text(contract.yolo_rows(ann.objects, 40, 30))
    boxes, cls = contract.read_labels(labels, 40, 30)
    assert cls.tolist() == [1] and np.allclose(boxes, [[2, 3.5, 10.25, 20]], atol=0.01)


def test_size_bins_are_the_metrics_bins():
    from so_det_ultra.metrics.protocol import PROTOCOLS

    assert PROTOCOLS["visdrone"].bins is contract.COCO_BINS and PROTOCOLS["soda-d"].bins is contract.SODA_D_BINS
    assert [contract.size_bin(a) for a in (0, 32**2, 32**2 + 1, 96**2, 96**2 + 1)] == ["small"] * 2 + ["medium"] * 2 + [
        "large"
    ]
    assert [contract.size_bin(a, contract.SODA_D_BINS) for a in (144, 145, 400, 1024, 2000, 2001)] == [
        "eS",
        "rS",
        "rS",
        "gS",
        "N",
        None,
    ]


def test_to_frame_maps_tile_boxes_back():
    import torch

    boxes = np.array([[10.0, 20.0, 30.0, 40.0, 0.9, 2.0]])
    out = tiling.to_frame(boxes, (650, 100, 1450, 900), gain=2.0)  # a tile shown to the network at twice its size
    assert out.tolist() == [[655.0, 110.0, 665.0, 120.0, 0.9, 2.0]] and boxes[0, 0] == 10.0  # input untouched
    assert tiling.to_frame(torch.tensor(boxes), (650, 100, 1450, 900)).tolist()[0][:4] == [660.0, 120.0, 680.0, 140.0]
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_starts(1000, 800, 800)


def test_convert_cli_takes_its_defaults_from_the_converters():
    from so_det_ultra.cli import build_parser
    from so_det_ultra.cliargs import kwargs_for

    a = build_parser().parse_args(["convert", "soda-d", "src", "dst"])
    assert kwargs_for(soda.convert_soda, a) == {"src": "src", "dst": "dst"}
    a = build_parser().parse_args(["convert", "soda-d", "s", "d", "--tile", "640", "--no-progress", "--splits", "val"])
    assert kwargs_for(soda.convert_soda, a) == {
        "src": "s",
        "dst": "d",
        "tile": 640,
        "show_progress": False,
        "splits": ["val"],
    }
