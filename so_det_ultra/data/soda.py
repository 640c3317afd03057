"""SODA-D (COCO JSON) -> YOLO labels and sidecars, with the official 800x800 / 150 px-overlap training tiles.

Source layout (the official release, unzipped): ``SRC/Annotations/{train,val,test}.json`` and ``SRC/Images/``
(file names in the JSON are relative to ``Images/``). Output layout and sidecar format: docs/datasets.md.

Rules:

- classes: the JSON's categories other than ``ignore``, sorted by category id, become 0..n-1 with their JSON names
  (the official release gives people, rider, bicycle, motor, vehicle, traffic-sign, traffic-light,
  traffic-camera, warning-cone); every split must list the same categories;
- an annotation whose category is named ``ignore``, or that carries a true ``ignore`` or ``iscrowd`` flag, is an
  ignored region: it goes to the sidecar's ``ignore`` list, not to the labels;
- malformed annotations (missing keys, bbox not 4 finite numbers, zero or negative size, unknown image or category
  id, box entirely outside the image) are reported as ``file:annotations[k]: reason``, counted and skipped;
- boxes partly outside the image are clipped to it (the VisDrone clipping rule, :func:`~.visdrone.clip_box`);
- **tiling** (training splits, ``tile_splits``): the SODA-mmdetection protocol (SPEC.md sec. 7) cuts each image into
  ``tile`` x ``tile`` patches with ``overlap`` px overlap (stride ``tile - overlap``; the last row/column is aligned to
  the image edge so tiles never leave the image; a side shorter than ``tile`` gives one tile of that side);
- **tile border rule**: an object cut by a tile border is kept in that tile, clipped to it, if at least
  ``min_visible`` (default 0.5) of its area lies inside the tile; otherwise its visible part becomes an ignored
  region of that tile's sidecar (so metrics do not count a detection of the sliver as a false positive).
  Ignored regions are clipped into every tile they touch;
- tiles without any kept object are not written unless ``keep_empty`` (the official split writes only tiles with
  objects); evaluation splits keep the full images, as the protocol evaluates on full images.

Interpretation: SODA-mmdetection does not state a visibility threshold for cut objects in its documentation;
``min_visible`` exposes it (``--min-visible`` on the command line). Tiles are re-encoded (JPEG quality 95).

Examples:
    >>> from so_det_ultra.data.soda import convert_soda, tile_starts
    >>> tile_starts(1920, 800, 150)
    [0, 650, 1120]
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from so_det_ultra.data import _io
from so_det_ultra.data._summary import Summary
from so_det_ultra.data.visdrone import (Annotation, _finish, _num, clip_box, encode, fill_ignored, image_size, sidecar,
                                        write_data_yaml, yolo_rows)

NAMES = {0: "people", 1: "rider", 2: "bicycle", 3: "motor", 4: "vehicle", 5: "traffic-sign", 6: "traffic-light",
         7: "traffic-camera", 8: "warning-cone"}
SO_DET = {"eval": "soda-d", "sidecars": "sidecars", "max_det": 1000}
ENV_SRC = "SO_DET_SODA_SRC"


def tile_starts(length: int, tile: int = 800, overlap: int = 150) -> list:
    """Tile origins along one side: stride ``tile - overlap``, last tile flush with the edge."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def tiles(width: int, height: int, tile: int = 800, overlap: int = 150) -> list:
    """``[(x0, y0, x1, y1)]`` tile windows covering a ``width`` x ``height`` image."""
    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def load_coco(path: Path, summary: Summary):
    """Parse one SODA-D/COCO JSON: ``(names, images, anns)`` with ``images = {id: (file_name, w, h)}`` and
    ``anns = {image_id: Annotation}`` (pixel xyxy, clipped; objects' truncation/occlusion are ``None``)."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "categories")):
        raise ValueError(f"{path}: not a COCO detection file (needs 'images' and 'categories' lists)")
    cats = {c["id"]: str(c["name"]) for c in coco["categories"]}
    ignore_ids = {i for i, n in cats.items() if n.lower() == "ignore"}
    kept = sorted(i for i in cats if i not in ignore_ids)
    cls_of = {cid: k for k, cid in enumerate(kept)}
    names = {k: cats[cid] for k, cid in enumerate(kept)}
    images = {}
    for k, im in enumerate(coco["images"]):
        try:
            images[im["id"]] = (str(im["file_name"]), int(im["width"]), int(im["height"]))
        except (KeyError, TypeError, ValueError):
            summary.problem(f"{path}:images[{k}]", "image record without id/file_name/width/height")
    anns = {i: Annotation() for i in images}
    for k, a in enumerate(coco.get("annotations", [])):
        where = f"{path}:annotations[{k}]"
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            if not all(map(math.isfinite, (x, y, w, h))):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            summary.problem(where, "bbox is not 4 finite numbers")
            continue
        if a.get("image_id") not in images:
            summary.problem(where, f"unknown image_id {a.get('image_id')!r}")
            continue
        if a.get("category_id") not in cats:
            summary.problem(where, f"unknown category_id {a.get('category_id')!r}")
            continue
        if w <= 0 or h <= 0:
            summary.problem(where, "zero or negative box size")
            continue
        _, iw, ih = images[a["image_id"]]
        box = clip_box(x, y, x + w, y + h, iw, ih)
        if box is None:
            summary.problem(where, "box outside the image")
            continue
        ann = anns[a["image_id"]]
        if a["category_id"] in ignore_ids or a.get("ignore") or a.get("iscrowd"):
            ann.ignore.append([_num(v) for v in box])
            summary.ignore_regions += 1
            summary.skipped["ignore annotation -> sidecar"] += 1
        else:
            ann.objects.append((cls_of[a["category_id"]], *box, None, None))
            summary.clipped += box != (x, y, x + w, y + h)
    return names, images, anns


def cut(ann: Annotation, window, min_visible: float, summary: Summary) -> Annotation:
    """The part of ``ann`` inside ``window`` in window pixels, by the tile border rule."""
    x0, y0, x1, y1 = window
    out = Annotation()
    for x1b, y1b, x2b, y2b in ann.ignore:
        if (b := clip_box(x1b - x0, y1b - y0, x2b - x0, y2b - y0, x1 - x0, y1 - y0)) is not None:
            out.ignore.append([_num(v) for v in b])
    for c, bx1, by1, bx2, by2, t, o in ann.objects:
        b = clip_box(bx1 - x0, by1 - y0, bx2 - x0, by2 - y0, x1 - x0, y1 - y0)
        if b is None:
            continue
        if (b[2] - b[0]) * (b[3] - b[1]) >= min_visible * (bx2 - bx1) * (by2 - by1) - 1e-9:
            out.objects.append((c, *b, t, o))
            summary.clipped += b != (bx1 - x0, by1 - y0, bx2 - x0, by2 - y0)
        else:
            out.ignore.append([_num(v) for v in b])
            summary.skipped[f"cut by a tile border, < {min_visible:g} visible -> tile ignore"] += 1
    return out


def _write(dst: Path, split: str, stem: str, name: str, w: int, h: int, ann: Annotation, summary, keep,
           image_bytes=None, image_src=None, mode="copy", extra=None):
    img_dir, lbl_dir, side_dir = (dst / d / split for d in ("images", "labels", "sidecars"))
    changed = (_io.atomic_write_bytes(img_dir / name, image_bytes) if image_bytes is not None
               else _io.place_image(image_src, img_dir / name, mode))
    changed += _io.atomic_write_text(lbl_dir / f"{stem}.txt", yolo_rows(ann.objects, w, h))
    side = sidecar(name, w, h, ann)
    if extra:
        side.update(extra)
    changed += _io.write_json(side_dir / f"{stem}.json", side)
    for c, x1, y1, x2, y2, *_ in ann.objects:
        summary.add_object(c, x2 - x1, y2 - y1)
    summary.files_written += changed
    summary.images[split] += 1
    keep["images"].add(name)
    keep["labels"].add(f"{stem}.txt")
    keep["sidecars"].add(f"{stem}.json")


def convert_split(json_path: Path, images_dir: Path, dst: Path, split: str, summary: Summary, tile: int | None = 800,
                  overlap: int = 150, min_visible: float = 0.5, keep_empty: bool = False, mask_ignored: bool = False,
                  images: str = "copy", show_progress: bool = True) -> dict:
    """Convert one COCO JSON; ``tile=None`` keeps full images. Returns the class names of this JSON."""
    import cv2

    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    names, recs, anns = load_coco(json_path, summary)
    keep = {"images": set(), "labels": set(), "sidecars": set()}
    for image_id, (file_name, w, h) in _io.progress(recs.items(), f"SODA-D {split}", len(recs), show_progress):
        src = Path(images_dir) / file_name
        summary.source_images[split] += 1
        size = image_size(src)
        if size is None:
            summary.problem(str(src), "missing or unreadable image")
            continue
        if tuple(size) != (w, h):
            summary.problem(str(src), f"image is {size[0]}x{size[1]}, JSON says {w}x{h} (JSON size used)")
        ann, name = anns[image_id], Path(file_name).name
        stem, suffix = Path(name).stem, Path(name).suffix.lower()
        if tile is None:
            if mask_ignored and ann.ignore:
                data = encode(fill_ignored(cv2.imread(str(src), cv2.IMREAD_COLOR), ann), suffix)
                _write(dst, split, stem, name, w, h, ann, summary, keep, image_bytes=data)
            else:
                _write(dst, split, stem, name, w, h, ann, summary, keep, image_src=src, mode=images)
            continue
        img = None
        for win in tiles(w, h, tile, overlap):
            part = cut(ann, win, min_visible, summary)
            if not part.objects and not keep_empty:
                continue
            if img is None:
                img = cv2.imread(str(src), cv2.IMREAD_COLOR)
            crop = img[win[1] : win[3], win[0] : win[2]].copy()
            if mask_ignored and part.ignore:
                crop = fill_ignored(crop, part)
            tstem = f"{stem}__{win[0]}_{win[1]}"
            tw, th = win[2] - win[0], win[3] - win[1]
            _write(dst, split, tstem, tstem + suffix, tw, th, part, summary, keep,
                   image_bytes=encode(crop, suffix), extra={"tile": {"source": name, "x": win[0], "y": win[1]}})
    for d, names_kept in keep.items():
        summary.stale_removed += _io.remove_stale(dst / d / split, names_kept)
    return names


def find_source(src: Path):
    """``(annotations_dir, images_dir)`` under ``src`` (its own ``Annotations/`` + ``Images/`` or one level down)."""
    src = Path(src)
    for root in [src, *sorted(p for p in src.iterdir() if p.is_dir())] if src.is_dir() else []:
        a = next((root / n for n in ("Annotations", "annotations") if (root / n).is_dir()), None)
        i = next((root / n for n in ("Images", "images") if (root / n).is_dir()), None)
        if a is not None and i is not None and any(a.glob("*.json")):
            return a, i
    return None


def _archives(src: Path):
    src = Path(src)
    if src.is_file() and src.suffix == ".zip":
        return [src]
    if not src.is_dir():
        return []
    return sorted(p for p in src.glob("*.zip") if p.stem.lower().startswith(("soda", "annotations", "images")))


MISSING = """SODA-D not found in {where}.
Expected a folder holding Annotations/{{train,val,test}}.json and Images/ (the official release, unzipped), or the
official zip archives (SODA-D*.zip, or Annotations.zip + Images.zip) in that folder.
Get them from https://shaunyuan22.github.io/SODA/ on a connected machine, copy them there (or set
{env}=<folder holding them>) and run again. See docs/datasets.md."""


def convert_soda(src, dst, splits=("train", "val", "test"), tile_splits=("train",), tile: int = 800,
                 overlap: int = 150, min_visible: float = 0.5, keep_empty: bool = False, mask_ignored: bool = False,
                 images: str = "copy", show_progress: bool = True, verbose: bool = True) -> Summary:
    """Convert SODA-D at ``src`` (folders or archives) into ``dst``; ``tile_splits`` are cut into tiles.

    Args:
        src: folder with ``Annotations/*.json`` and ``Images/`` (or one level above), or the official archives.
        dst: output root (created): ``images/``, ``labels/``, ``sidecars/``, ``data.yaml``, ``convert-soda-d.log``.
        splits: JSON stems to convert (missing ones are skipped with a note).
        tile_splits: splits cut into ``tile`` x ``tile`` tiles with ``overlap``; others keep full images.
        min_visible: tile border rule threshold (fraction of an object's area inside the tile).
        keep_empty: also write tiles without objects. mask_ignored: grey-fill ignored regions in written images.
        images: ``copy``/``hardlink``/``symlink`` for full images that are not re-encoded.
    """
    src, dst = Path(src), Path(dst)
    summary = Summary()
    extract = dst / ".extract"
    try:
        found = find_source(src) if src.exists() else None
        if found is None and _archives(src):
            for archive in _archives(src):
                print(f"extracting {archive} ...")
                _io.extract_archive(archive, extract)
            found = find_source(extract)
        if found is None:
            raise FileNotFoundError(MISSING.format(where=src, env=ENV_SRC))
        ann_dir, img_dir = found
        _io.check_dst(img_dir, dst)
        _io.check_dst(ann_dir, dst)
        names = None
        mode = "hardlink" if extract in img_dir.parents and images == "copy" else images
        for split in splits:
            jp = ann_dir / f"{split}.json"
            if not jp.is_file():
                print(f"note: {jp} not found, split {split!r} skipped")
                continue
            n = convert_split(jp, img_dir, dst, split, summary, tile if split in tile_splits else None, overlap,
                              min_visible, keep_empty, mask_ignored, mode, show_progress)
            if names is not None and n != names:
                raise ValueError(f"{jp}: categories {n} differ from the other splits' {names}")
            names = n
    finally:
        if extract.exists():
            shutil.rmtree(extract)
    if names is None:
        raise FileNotFoundError(f"none of {[f'{s}.json' for s in splits]} found in {ann_dir}")
    summary.names = names
    write_data_yaml(dst, names, SO_DET)
    _finish(dst / "convert-soda-d.log", summary, verbose)
    return summary


def prepare_from_yaml(data: dict) -> None:
    """``download:`` step of ``cfg/datasets/soda-d.yaml``: convert local SODA-D files into ``data['path']``.

    Looks in ``$SO_DET_SODA_SRC``, in ``path`` itself and in its parent folder. Never downloads.
    """
    src = _io.find_local_source(data, ENV_SRC, lambda c: find_source(c) or _archives(c), MISSING)
    convert_soda(src, Path(data["path"]))
