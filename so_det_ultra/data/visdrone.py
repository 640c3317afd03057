"""VisDrone2019-DET (native annotation files) -> YOLO labels plus per-image sidecars with what YOLO cannot hold.

Source layout (the official archives, unzipped): ``VisDrone2019-DET-{train,val,test-dev}/{images,annotations}``; one
annotation line per box, ``x,y,w,h,score,category,truncation,occlusion`` in pixels with (x, y) the top-left corner
(SPEC.md sec. 7). Output layout and sidecar format: the data contract in docs/datasets.md.

Rules (each also counted in the end summary):

- categories 1..10 become classes 0..9 (:data:`NAMES`);
- category 0 (ignored region) rows go to the sidecar's ``ignore`` list, not to the labels;
- category 11 (others) and score-0 rows are not written;
- malformed lines (wrong field count, non-numbers, non-integer score/category/truncation/occlusion, unknown
  category, score not 0/1, zero or negative size, box entirely outside the image) are reported as ``file:line:
  reason``, counted, and skipped; the run goes on;
- **clipping rule**: a box partly outside the image is clipped to ``[0, W] x [0, H]`` and kept as long as a
  positive area remains inside (the clipped box is what the label and the sidecar hold); ignored regions are
  clipped the same way;
- truncation and occlusion of every written object are kept in the sidecar, in label order.

Interpretation: the official toolkit ignores detections *inside* ignored regions at evaluation time; it does not
say what training should do with them. By default the pixels are left as they are (the region is only recorded);
``mask_ignored=True`` fills each ignored region with grey 114 in the converted copy of the image, as ESOD does,
while pixels of labelled objects overlapping the region are kept. Masked JPEGs are re-encoded at quality 95.

Examples:
    >>> from so_det_ultra.data.visdrone import convert_visdrone
    >>> summary = convert_visdrone("downloads/", "datasets/visdrone")  # doctest: +SKIP
    >>> # yolo train model=so-det-s.yaml data=datasets/visdrone/data.yaml
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from so_det_ultra.data import _io
from so_det_ultra.data._summary import Summary

NAMES = {0: "pedestrian", 1: "people", 2: "bicycle", 3: "car", 4: "van", 5: "truck", 6: "tricycle",
         7: "awning-tricycle", 8: "bus", 9: "motor"}
SPLITS = {"VisDrone2019-DET-train": "train", "VisDrone2019-DET-val": "val", "VisDrone2019-DET-test-dev": "test"}
SO_DET = {"eval": "visdrone", "sidecars": "sidecars", "max_det": 500}
GREY = 114  # Ultralytics' letterbox padding value
ENV_SRC = "SO_DET_VISDRONE_SRC"


@dataclass
class Annotation:
    """What one annotation file yields: objects ``(cls, x1, y1, x2, y2, truncation, occlusion)`` and ignored regions."""

    objects: list = field(default_factory=list)
    ignore: list = field(default_factory=list)


def _number(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(text)
    return v


def parse_line(line: str):
    """One annotation line as ``(x, y, w, h, score, category, truncation, occlusion)``; ``ValueError(reason)`` if bad.

    ``None`` for a blank line. A single trailing comma (seen in some VisDrone releases) is accepted.
    """
    line = line.strip()
    if not line:
        return None
    fields = [f.strip() for f in line.split(",")]
    if len(fields) == 9 and fields[-1] == "":
        fields = fields[:8]
    if len(fields) != 8:
        raise ValueError(f"expected 8 comma-separated fields, got {len(fields)}")
    try:
        values = [_number(f) for f in fields]
    except ValueError:
        raise ValueError("non-numeric field") from None
    x, y, w, h, score, cat, trunc, occ = values
    if any(v != int(v) for v in (score, cat, trunc, occ)):
        raise ValueError("non-integer score/category/truncation/occlusion")
    score, cat, trunc, occ = int(score), int(cat), int(trunc), int(occ)
    if not 0 <= cat <= 11:
        raise ValueError(f"unknown category {cat}")
    if score not in (0, 1):
        raise ValueError(f"score {score} is not 0 or 1")
    if w <= 0 or h <= 0:
        raise ValueError("zero or negative box size")
    return x, y, w, h, score, cat, trunc, occ


def clip_box(x1: float, y1: float, x2: float, y2: float, width: float, height: float):
    """The clipping rule: clip to ``[0, width] x [0, height]``; ``None`` if no positive area remains inside."""
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)
    return (cx1, cy1, cx2, cy2) if cx2 > cx1 and cy2 > cy1 else None


def _num(v: float):
    """Integers stay integers in the sidecar (VisDrone is integral); other values keep 3 decimals."""
    return int(v) if float(v).is_integer() else round(float(v), 3)


def parse_annotation(lines, width: int, height: int, name: str, summary: Summary) -> Annotation:
    """Apply the module rules to the lines of one annotation file (``name`` is used in problem reports)."""
    out = Annotation()
    for i, line in enumerate(lines, 1):
        try:
            row = parse_line(line)
        except ValueError as err:
            summary.problem(f"{name}:{i}", str(err))
            continue
        if row is None:
            continue
        x, y, w, h, score, cat, trunc, occ = row
        box = clip_box(x, y, x + w, y + h, width, height)
        if box is None:
            summary.problem(f"{name}:{i}", "box outside the image")
            continue
        clipped = box != (x, y, x + w, y + h)
        if cat == 0:
            out.ignore.append([_num(v) for v in box])
            summary.ignore_regions += 1
            summary.skipped["ignored region (category 0) -> sidecar"] += 1
        elif cat == 11:
            summary.skipped["others (category 11)"] += 1
        elif score == 0:
            summary.skipped["score 0"] += 1
        else:
            out.objects.append((cat - 1, *box, trunc, occ))
            summary.add_object(cat - 1, box[2] - box[0], box[3] - box[1])
            summary.clipped += clipped
    return out


def yolo_rows(objects, width: int, height: int) -> str:
    """YOLO label text ``cls xc yc w h`` (normalised, 6 decimals) for pixel-xyxy objects."""
    rows = []
    for cls, x1, y1, x2, y2, *_ in objects:
        xc, yc, bw, bh = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
        rows.append(f"{cls} {xc:.6f} {yc:.6f} {bw:.6f} {bh:.6f}\n")
    return "".join(rows)


def sidecar(image: str, width: int, height: int, ann: Annotation) -> dict:
    """The per-image sidecar of the data contract (pixel xyxy boxes in the full image)."""
    return {
        "image": image,
        "width": width,
        "height": height,
        "ignore": ann.ignore,
        "objects": [
            {"cls": c, "box": [_num(v) for v in (x1, y1, x2, y2)], "truncation": t, "occlusion": o}
            for c, x1, y1, x2, y2, t, o in ann.objects
        ],
    }


def fill_ignored(img, ann: Annotation, grey: int = GREY):
    """Fill ``ann``'s ignored regions of ``img`` (HxWxC array, modified in place) with grey; objects' pixels kept."""
    import numpy as np

    mask = np.zeros(img.shape[:2], bool)
    for x1, y1, x2, y2 in ann.ignore:
        mask[int(y1) : math.ceil(y2), int(x1) : math.ceil(x2)] = True
    for _, x1, y1, x2, y2, *_ in ann.objects:
        mask[int(y1) : math.ceil(y2), int(x1) : math.ceil(x2)] = False
    img[mask] = grey
    return img


def encode(img, suffix: str) -> bytes:
    """Image bytes in the format of ``suffix`` (JPEG at quality 95); deterministic for the same pixels."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(suffix.lower(), img, params)
    if not ok:
        raise OSError(f"could not encode a {suffix} image")
    return buf.tobytes()


def masked_image(path: Path, ann: Annotation) -> bytes:
    """Encoded copy of the image at ``path`` with ignored regions filled grey (see :func:`fill_ignored`)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"could not read {path}")
    return encode(fill_ignored(img, ann), path.suffix)


def image_size(path: Path):
    """(width, height) from the image header; ``None`` if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # any decoder error means "unreadable" to the caller
        return None


def convert_split(folder: Path, dst: Path, split: str, summary: Summary, mask_ignored: bool = False,
                  images: str = "copy", show_progress: bool = True) -> None:
    """Convert one official split folder (``images/`` + ``annotations/``) into ``dst`` as split ``split``."""
    folder, dst = Path(folder), Path(dst)
    index = _io.image_index(folder / "images")
    ann_dir = folder / "annotations"
    if not index:
        raise FileNotFoundError(f"no images in {folder / 'images'}")
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"{ann_dir} is missing (VisDrone test-challenge has no annotations: not convertible)")
    for ann in sorted(ann_dir.glob("*.txt")):
        if ann.stem not in index:
            summary.problem(f"{ann}", "annotation file without an image")
    out_img, out_lbl, out_side = (dst / d / split for d in ("images", "labels", "sidecars"))
    keep = {"images": set(), "labels": set(), "sidecars": set()}
    for stem, img in _io.progress(index.items(), f"VisDrone {split}", len(index), show_progress):
        summary.source_images[split] += 1
        size = image_size(img)
        if size is None:
            summary.problem(str(img), "unreadable image")
            continue
        w, h = size
        ann_file = ann_dir / f"{stem}.txt"
        if ann_file.is_file():
            lines = ann_file.read_text(encoding="utf-8", errors="replace").splitlines()
        else:
            summary.problem(str(ann_file), "missing annotation file (image written without objects)")
            lines = []
        ann = parse_annotation(lines, w, h, str(ann_file), summary)
        if mask_ignored and ann.ignore:
            changed = _io.atomic_write_bytes(out_img / img.name, masked_image(img, ann))
        else:
            changed = _io.place_image(img, out_img / img.name, images)
        changed += _io.atomic_write_text(out_lbl / f"{stem}.txt", yolo_rows(ann.objects, w, h))
        changed += _io.write_json(out_side / f"{stem}.json", sidecar(img.name, w, h, ann))
        summary.files_written += changed
        keep["images"].add(img.name)
        keep["labels"].add(f"{stem}.txt")
        keep["sidecars"].add(f"{stem}.json")
        summary.images[split] += 1
    for d, names in keep.items():
        summary.stale_removed += _io.remove_stale(dst / d / split, names)


def write_data_yaml(dst: Path, names: dict, so_det: dict, train_fallback: bool = True) -> Path:
    """``dst/data.yaml`` for every split present under ``dst/images`` (val falls back to train if absent)."""
    dst = Path(dst)
    present = [s for s in ("train", "val", "test") if (dst / "images" / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"nothing converted under {dst / 'images'}")
    data = {"path": str(dst.resolve())}
    for s in present:
        data[s] = f"images/{s}"
    if "train" not in data:
        data["train"] = data.get("val") or data["test"]
    if "val" not in data and train_fallback:
        data["val"] = data["train"]
    data["names"] = dict(names)
    data["so_det"] = dict(so_det)
    path = dst / "data.yaml"
    _io.atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def find_splits(src: Path, split: str | None = None):
    """``[(split, folder)]`` in ``src``: an official split folder, or the ``VisDrone2019-DET-*`` folders in it."""
    src = Path(src)
    if (src / "images").is_dir() and (src / "annotations").is_dir():
        if split is None:
            split = next((s for name, s in SPLITS.items() if src.name == name), "train")
        return [(split, src)]
    found = [(s, src / name) for name, s in SPLITS.items() if (src / name / "images").is_dir()]
    return [(s, f) for s, f in found if split is None or s == split]


def _archives(src: Path):
    src = Path(src)
    if src.is_file() and src.suffix == ".zip":
        return [src]
    return sorted(p for p in src.glob("VisDrone2019-DET-*.zip") if p.stem in SPLITS) if src.is_dir() else []


MISSING = """VisDrone2019-DET not found in {where}.
Expected one of:
  - the official folders VisDrone2019-DET-train/, VisDrone2019-DET-val/, VisDrone2019-DET-test-dev/
    (each holding images/ and annotations/), or one such split folder itself;
  - the official archives VisDrone2019-DET-train.zip, VisDrone2019-DET-val.zip, VisDrone2019-DET-test-dev.zip.
Get them from https://github.com/VisDrone/VisDrone-Dataset (Task 1, object detection in images) on a connected
machine, copy them there (or set {env}=<folder holding them>) and run again.
See docs/datasets.md."""


def convert_visdrone(src, dst, split: str | None = None, mask_ignored: bool = False, images: str = "copy",
                     show_progress: bool = True, verbose: bool = True) -> Summary:
    """Convert VisDrone2019-DET at ``src`` (folders, a split folder, or the official .zip archives) into ``dst``.

    Args:
        src: folder with ``VisDrone2019-DET-{train,val,test-dev}`` folders or archives, or one split folder itself.
        dst: output root (created): ``images/``, ``labels/``, ``sidecars/``, ``data.yaml``, ``convert-visdrone.log``.
        split: convert only this split (``train``/``val``/``test``); for a single split folder, its name in ``dst``
            (default: from the folder name, else ``train``).
        mask_ignored: fill ignored regions with grey in the converted images (off by default).
        images: ``copy`` (default), ``hardlink`` or ``symlink`` the unmasked images.
        show_progress: progress bar per split. verbose: print the end summary.

    Returns:
        The run's :class:`~so_det_ultra.data._summary.Summary` (also written to ``dst/convert-visdrone.log``).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(MISSING.format(where=src, env=ENV_SRC))
    summary = Summary(names=dict(NAMES))
    extract = dst / ".extract"
    try:
        splits = find_splits(src, split) if src.is_dir() else []
        done = {s for s, _ in splits}
        for archive in _archives(src):
            s = SPLITS[archive.stem]
            if s in done or (split is not None and s != split):
                continue
            print(f"extracting {archive} ...")
            _io.extract_archive(archive, extract)
            splits += [(s2, f) for s2, f in find_splits(extract, s) if s2 == s]
            done.add(s)
        if not splits:
            raise FileNotFoundError(MISSING.format(where=src, env=ENV_SRC))
        for _, folder in splits:
            _io.check_dst(folder, dst)
        for s, folder in sorted(splits):
            mode = "hardlink" if extract in folder.parents and images == "copy" else images
            convert_split(folder, dst, s, summary, mask_ignored, mode, show_progress)
    finally:
        if extract.exists():
            shutil.rmtree(extract)
    if write_data_yaml(dst, NAMES, SO_DET) and not (dst / "images" / "val").is_dir():
        print(f"note: no val split in {dst}; data.yaml uses train as val (convert VisDrone2019-DET-val to fix)")
    _finish(dst / "convert-visdrone.log", summary, verbose)
    return summary


def _finish(log: Path, summary: Summary, verbose: bool) -> None:
    text = summary.format()
    _io.atomic_write_text(log, summary.format(max_problems=len(summary.problems)) + "\n")
    if verbose:
        print(text)


def prepare_from_yaml(data: dict) -> None:
    """``download:`` step of ``cfg/datasets/visdrone.yaml``: convert local VisDrone files into ``data['path']``.

    Looks, in order, in ``$SO_DET_VISDRONE_SRC``, in ``path`` itself and in its parent folder (Ultralytics'
    ``datasets_dir`` for the default relative ``path``) for the official folders or archives. Never downloads.
    """
    src = _io.find_local_source(data, ENV_SRC, lambda c: find_splits(c) or _archives(c), MISSING)
    convert_visdrone(src, Path(data["path"]))
