"""Converter faults: a conversion killed mid-way, then rerun, and bad files in the source.

- ``SO_DET_FAULT_KILL_AFTER=N`` makes ``so-det convert`` SIGKILL itself after its N-th complete temporary file, just
  before moving it into place (:mod:`so_det_ultra.data._io`); the kill points are drawn with a fixed seed. A rerun must
  give a tree byte-identical to an uninterrupted conversion (every file, data YAML and sidecars included; only the
  conversion log is left out, as it records the run's counts: files changed, temporary files removed).
- Truncated, unreadable and missing images, zero-byte annotation files and unusable SODA-D JSONs are reported by file
  and skipped, and the rest converts (docs/datasets.md, "Bad files").
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import BIN, clean_env

from so_det_ultra.data import soda, visdrone
from so_det_ultra.data._io import FAULT_ENV, TEMP_GLOB

LOGS = {"convert-visdrone.log", "convert-soda-d.log"}


def tree(root: Path) -> dict:
    """``{relative path: bytes}`` of every file under ``root`` except the conversion logs."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in LOGS
    }


def temp_files(root: Path) -> list:
    return [p for p in root.rglob(TEMP_GLOB)]


def image(path: Path, w: int = 80, h: int = 60, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return path.read_bytes()


def visdrone_source(root: Path, n: int = 5) -> Path:
    """A VisDrone train split of ``n`` 80x60 images with two objects and one ignored region each."""
    split = root / "VisDrone2019-DET-train"
    (split / "images").mkdir(parents=True)
    (split / "annotations").mkdir()
    for k in range(n):
        image(split / "images" / f"im{k}.jpg", seed=k)
        (split / "annotations" / f"im{k}.txt").write_text(
            f"{k},2,10,10,1,4,0,1\n30,20,8,6,1,1,1,2\n50,40,9,9,0,0,0,0\n"
        )
    return root


def killed(cmd: list, after: int, cwd: Path):
    """Run ``cmd`` with the fault hook set; it must die by SIGKILL."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=clean_env(**{FAULT_ENV: after}), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, f"not killed (rc {proc.returncode}): {proc.stderr[-2000:]}"


def test_visdrone_killed_then_rerun_is_byte_identical(tmp_path):
    src, dst = visdrone_source(tmp_path / "src"), tmp_path / "dst"
    visdrone.convert_visdrone(src, dst, show_progress=False, verbose=False)
    want = tree(dst)
    writes = len(want)  # files of a fresh run: images, labels, sidecars, data.yaml, manifest, lock (+ the log)
    assert writes == 5 * 3 + 3
    cmd = [BIN / "so-det", "convert", "visdrone", src, dst, "--no-progress"]
    for after in random.Random(13).sample(range(1, writes + 1), 2):
        shutil.rmtree(dst)
        killed(cmd, after, tmp_path)
        assert len(temp_files(dst)) == 1, f"killed after {after} writes: expected one temporary file left"
        assert tree(dst) != want
        again = visdrone.convert_visdrone(src, dst, show_progress=False, verbose=False)
        assert again.temp_removed == 1  # the one file being moved into place when the kill came
        assert not temp_files(dst), "a rerun left temporary files"
        assert tree(dst) == want, f"killed after {after} writes, the rerun differs from an uninterrupted run"
    # killed twice in a row at random points, then rerun
    shutil.rmtree(dst)
    killed(cmd, 4, tmp_path)
    killed(cmd, 9, tmp_path)
    visdrone.convert_visdrone(src, dst, show_progress=False, verbose=False)
    assert not temp_files(dst) and tree(dst) == want


def soda_source(root: Path, bad: bool = False) -> Path:
    """SODA-D with two 1000x700 images (tiles of 800 with overlap 150 in train); ``bad`` adds broken files."""
    (root / "Images").mkdir(parents=True)
    (root / "Annotations").mkdir()
    images, anns = [], []
    for k, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        images.append({"id": k + 1, "file_name": name, "width": 1000, "height": 700})
        anns += [
            {"id": 10 * k, "image_id": k + 1, "category_id": 1, "bbox": [100 + k, 100, 20, 20]},
            {"id": 10 * k + 1, "image_id": k + 1, "category_id": 2, "bbox": [900, 600, 30, 40]},
        ]
        if name != "c.jpg" or not bad:  # c.jpg missing when bad
            data = image(root / "Images" / name, 1000, 700, seed=k)
            if name == "b.jpg" and bad:
                (root / "Images" / name).write_bytes(data[: len(data) // 2])  # truncated
    coco = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "people"}, {"id": 2, "name": "car"}],
    }
    for split in ("train", "val", "test"):
        (root / "Annotations" / f"{split}.json").write_text(json.dumps(coco))
    if bad:
        (root / "Annotations" / "val.json").write_bytes(b"")  # zero-byte annotation file
        (root / "Annotations" / "test.json").write_text('{"info": {}}')  # JSON, but not COCO
    return root


def test_soda_killed_then_rerun_is_byte_identical(tmp_path):
    src, dst = soda_source(tmp_path / "SODA-D"), tmp_path / "dst"
    opts = {"splits": ("train", "val"), "tile_splits": ("train",)}
    soda.convert_soda(src, dst, **opts, show_progress=False, verbose=False)
    want = tree(dst)
    cmd = [BIN / "so-det", "convert", "soda-d", src, dst, "--splits", "train", "val", "--tile-splits", "train"]
    shutil.rmtree(dst)
    killed([*cmd, "--no-progress"], random.Random(13).randint(2, len(want) - 1), tmp_path)
    assert temp_files(dst) and tree(dst) != want
    soda.convert_soda(src, dst, **opts, show_progress=False, verbose=False)
    assert not temp_files(dst) and tree(dst) == want


def test_visdrone_bad_files_reported_and_skipped(tmp_path):
    """Truncated, zero-byte and non-image files are skipped by file; a zero-byte annotation converts with a warning."""
    src = visdrone_source(tmp_path / "src", n=4)
    split = src / "VisDrone2019-DET-train"
    data = (split / "images" / "im1.jpg").read_bytes()
    (split / "images" / "im1.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (split / "images" / "im2.jpg").write_bytes(b"")  # zero-byte image
    (split / "images" / "im3.jpg").write_bytes(b"not an image at all")
    image(split / "images" / "empty.jpg")
    (split / "annotations" / "empty.txt").write_bytes(b"")  # zero-byte annotation: an image without objects
    dst = tmp_path / "dst"
    proc = subprocess.run(
        [str(BIN / "so-det"), "convert", "visdrone", str(src), str(dst), "--no-progress"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, log = proc.stdout, (dst / "convert-visdrone.log").read_text()
    for text in (out, log):
        assert "im1.jpg: truncated image (no JPEG end marker); skipped" in text
        assert "im2.jpg: unreadable image" in text and "im3.jpg: unreadable image" in text
        assert "empty.txt: empty annotation file (image written without objects)" in text
        assert "Traceback" not in text
    assert sorted(p.name for p in (dst / "images" / "train").iterdir()) == ["empty.jpg", "im0.jpg"]
    assert (dst / "labels" / "train" / "empty.txt").read_text() == ""
    assert len((dst / "labels" / "train" / "im0.txt").read_text().splitlines()) == 2
    side = json.loads((dst / "sidecars" / "train" / "empty.json").read_text())
    assert side["objects"] == [] and side["ignore"] == [] and (side["width"], side["height"]) == (80, 60)
    assert "images written: train 2 (from source images: train 5)" in out


def test_soda_bad_files_reported_and_skipped(tmp_path):
    """Zero-byte / non-COCO JSON: that split is skipped by file; truncated and missing images skipped; rest converts."""
    src, dst = soda_source(tmp_path / "SODA-D", bad=True), tmp_path / "dst"
    s = soda.convert_soda(src, dst, splits=("train", "val", "test"), tile_splits=(), show_progress=False, verbose=False)
    problems = "\n".join(s.problems)
    assert f"{src / 'Annotations' / 'val.json'}: empty annotation file (0 bytes); split 'val' skipped" in problems
    assert f"{src / 'Annotations' / 'test.json'}: not a COCO detection file" in problems
    assert f"{src / 'Images' / 'b.jpg'}: truncated image (no JPEG end marker); skipped" in problems
    assert f"{src / 'Images' / 'c.jpg'}: missing image; skipped" in problems
    assert len(s.problems) == 4, problems
    assert sorted(p.name for p in (dst / "images" / "train").iterdir()) == ["a.jpg"]
    assert not (dst / "images" / "val").exists() and not (dst / "images" / "test").exists()
    assert "empty annotation file" in (dst / "convert-soda-d.log").read_text()
    with pytest.raises(FileNotFoundError, match="nothing converted"):  # every split unusable: a clear error
        soda.convert_soda(src, tmp_path / "d2", splits=("val", "test"), show_progress=False, verbose=False)
