"""SODA-D (COCO JSON) -> YOLO labels and sidecars, cut into the official 800x800 / 150 px-overlap tiles.

Source layout (the official release, unzipped): ``SRC/Annotations/{train,val,test}.json`` and ``SRC/Images/``
(file names in the JSON are relative to ``Images/``); dataset: G. Cheng et al., "Towards Large-Scale Small Object
Detection: Survey and Benchmarks", TPAMI 2023, https://shaunyuan22.github.io/SODA/. Output layout and sidecar format:
:mod:`so_det_ultra.data.contract` and docs/datasets.md; the run itself (sources, archives, rerun safety, log) is the
skeleton of :mod:`so_det_ultra.data.converter`.

Rules:

- classes: the JSON's categories other than ``ignore``, sorted by category id, become 0..n-1 with their JSON names
  (the official release gives people, rider, bicycle, motor, vehicle, traffic-sign, traffic-light,
  traffic-camera, warning-cone); every split must list the same categories;
- an annotation whose category is named ``ignore``, or that carries a true ``ignore`` or ``iscrowd`` flag, is an
  ignored region: it goes to the sidecar's ``ignore`` list, not to the labels;
- malformed annotations (missing keys, bbox not 4 finite numbers, zero or negative size, unknown image or category
  id, box entirely outside the image) are reported as ``file:annotations[k]: reason``, counted and skipped;
- **bad files**: a split JSON that is empty (zero bytes), unreadable or not COCO is reported by file and that split
  is skipped (its earlier output left as it is); an image that is missing, unreadable or truncated is reported by
  file and skipped; the rest converts. A JSON whose ``annotations`` list is empty converts its images without
  objects;
- boxes partly outside the image are clipped to it (the VisDrone clipping rule,
  :func:`~so_det_ultra.data.contract.clip_box`);
- **tiling** (every split by default, ``tile_splits``): the SODA-D protocol (github.com/shaunyuan22/SODA-mmdetection,
  ``tools/img_split/sodad_split.py``, ``SODADSplit._divImg``) cuts each image into ``tile`` x ``tile`` patches with
  ``overlap`` px overlap; the grid is :mod:`so_det_ultra.data.tiling` (stride ``tile - overlap``; the last row/column
  is aligned to the image edge so tiles never leave the image; a side shorter than ``tile`` gives one tile of that
  side);
- **tile border rule**: an object cut by a tile border is kept in that tile, clipped to it, if at least
  ``min_visible`` (default 0.4, the official ``interAreaIgnThr``) of its area lies inside the tile; otherwise its
  visible part becomes an ignored region of that tile's sidecar. Ignored regions are clipped into every tile they
  touch;
- **empty tiles**: training tiles without any kept object are not written unless ``keep_empty`` (``sodad_split.py``
  keeps a patch in ``train`` mode only when it holds annotations); tiles of the other splits are all written, as the
  official split does outside ``train`` mode, because the evaluation runs the detector on every tile;
- **parent sidecar**: for a tiled split, the full image's sidecar (``sidecars/<split>/<stem>.json``, no image, no
  label) holds its objects and ignored regions in full-image pixels; each tile sidecar names it in
  ``tile.source``. The SODA-D evaluation (docs/metrics.md) maps tile detections back with the tile offset, merges
  them and scores them against these parents, as the official evaluation scores the original images.

Interpretation: ``sodad_split.py`` (``SODADSplit._divAnn``) marks a cut object ``ignore`` when its visible fraction
is ``<= interAreaIgnThr`` (0.40 in ``split_configs/split_train.json``), i.e. keeps it when the fraction is above;
``min_visible`` keeps it at ``>= min_visible`` (an object exactly at 0.4 is kept here). The official script also
fills ignored regions of every patch with black (``ignFillVal`` [0, 0, 0]); so do we by default (``mask_ignored=True``,
``ignore_fill=0``), keeping the pixels of objects that overlap an ignored region (interpretation: the official fill
covers the ignore box whole). Tiles are re-encoded (JPEG quality 95).

Examples:
    >>> from so_det_ultra.data.soda import convert_soda
    >>> summary = convert_soda("downloads/SODA-D", "datasets/soda-d")  # doctest: +SKIP
    >>> # yolo train model=so-det-s.yaml data=datasets/soda-d/data.yaml imgsz=1200
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from so_det_ultra.data import _io, contract, tiling
from so_det_ultra.data._summary import Summary
from so_det_ultra.data.contract import Annotation
from so_det_ultra.data.converter import Converter, Source, SplitWriter, UnusableSource, fill_ignored

NAMES = {
    0: "people",
    1: "rider",
    2: "bicycle",
    3: "motor",
    4: "vehicle",
    5: "traffic-sign",
    6: "traffic-light",
    7: "traffic-camera",
    8: "warning-cone",
}
MIN_VISIBLE = 0.4  # sodad_split.py --interAreaIgnThr (split_configs/split_train.json)
IMGSZ = 1200  # configs/_base_/datasets/sodad.py: img_scale=(1200, 1200), keep_ratio=True
MERGE_IOU = 0.5  # mmdet/datasets/sodad.py, SODADDataset.evaluate -> merge_dets(nms_iou_thr=0.5)


def so_det_key(tile: int = tiling.SODA_D_TILE, overlap: int = tiling.SODA_D_OVERLAP) -> dict:
    """The ``so_det:`` key of a SODA-D data YAML: protocol, sidecars, per-tile cap, tile geometry, resize, merge IoU."""
    key = contract.so_det_key("soda-d", max_det=1000)  # detections per network image (tile) given to Ultralytics
    return {**key, "tile": tile, "overlap": overlap, "imgsz": IMGSZ, "merge_iou": MERGE_IOU}


SO_DET = so_det_key()
ENV_SRC = "SO_DET_SODA_SRC"


def load_coco(path: Path, summary: Summary):
    """Parse one SODA-D/COCO JSON: ``(names, images, anns)`` with ``images = {id: (file_name, w, h)}`` and
    ``anns = {image_id: Annotation}`` (pixel xyxy, clipped; objects' truncation/occlusion are ``None``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise UnusableSource(f"empty annotation file ({len(text.encode())} bytes)")
        coco = json.loads(text)
    except UnusableSource:
        raise
    except (OSError, ValueError) as err:
        raise UnusableSource(f"not a readable JSON file ({err})") from err
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "categories")):
        raise UnusableSource("not a COCO detection file (needs 'images' and 'categories' lists)")
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
        box = contract.clip_box(x, y, x + w, y + h, iw, ih)
        if box is None:
            summary.problem(where, "box outside the image")
            continue
        ann = anns[a["image_id"]]
        if a["category_id"] in ignore_ids or a.get("ignore") or a.get("iscrowd"):
            ann.ignore.append([contract.coord(v) for v in box])
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
        if (b := contract.clip_box(x1b - x0, y1b - y0, x2b - x0, y2b - y0, x1 - x0, y1 - y0)) is not None:
            out.ignore.append([contract.coord(v) for v in b])
    for c, bx1, by1, bx2, by2, t, o in ann.objects:
        b = contract.clip_box(bx1 - x0, by1 - y0, bx2 - x0, by2 - y0, x1 - x0, y1 - y0)
        if b is None:
            continue
        if (b[2] - b[0]) * (b[3] - b[1]) >= min_visible * (bx2 - bx1) * (by2 - by1) - 1e-9:
            out.objects.append((c, *b, t, o))
            summary.clipped += b != (bx1 - x0, by1 - y0, bx2 - x0, by2 - y0)
        else:
            out.ignore.append([contract.coord(v) for v in b])
            summary.skipped[f"cut by a tile border, < {min_visible:g} visible -> tile ignore"] += 1
    return out


def find_source(src: Path):
    """``(annotations_dir, images_dir)`` under ``src`` (its own ``Annotations/`` + ``Images/`` or one level down)."""
    src = Path(src)
    for root in [src, *sorted(p for p in src.iterdir() if p.is_dir())] if src.is_dir() else []:
        a = next((root / n for n in ("Annotations", "annotations") if (root / n).is_dir()), None)
        i = next((root / n for n in ("Images", "images") if (root / n).is_dir()), None)
        if a is not None and i is not None and any(a.glob("*.json")):
            return a, i
    return None


MISSING = """SODA-D not found in {where}.
Expected a folder holding Annotations/{{train,val,test}}.json and Images/ (the official release, unzipped), or the
official zip archives (SODA-D*.zip, or Annotations.zip + Images.zip) in that folder.
Get them from https://shaunyuan22.github.io/SODA/ on a connected machine, copy them there (or set
{env}=<folder holding them>) and run again. See docs/datasets.md."""


class SodaD(Converter):
    """SODA-D: one source split per ``Annotations/<split>.json``; ``tile_splits`` are cut into tiles."""

    name = "soda-d"
    names = NAMES
    so_det = SO_DET
    env = ENV_SRC
    missing = MISSING

    def __init__(
        self,
        splits,
        tile_splits,
        tile: int,
        overlap: int,
        min_visible: float,
        keep_empty: bool,
        mask_ignored: bool,
        images: str,
        show_progress: bool,
        ignore_fill: int = 0,
    ):
        super().__init__(images, mask_ignored, show_progress)
        self.ignore_fill = ignore_fill
        if not 0 < min_visible <= 1:
            raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
        tiling.tile_starts(tile, tile, overlap)  # checks tile and overlap before any file is written
        self.splits, self.tile_splits = tuple(splits), tuple(tile_splits)
        self.tile, self.overlap, self.min_visible, self.keep_empty = tile, overlap, min_visible, keep_empty
        self.so_det = so_det_key(tile, overlap)  # data.yaml records the geometry the tiles were cut with

    @classmethod
    def find(cls, src: Path, splits=None, extracted: bool = False) -> list[Source]:
        """One source per ``Annotations/<split>.json`` (every JSON when ``splits`` is None)."""
        found = find_source(src)
        if found is None:
            return []
        ann_dir, img_dir = found
        splits = sorted(p.stem for p in ann_dir.glob("*.json")) if splits is None else splits
        return [
            Source(s, img_dir, ann_dir / f"{s}.json", guard=(img_dir, ann_dir), extracted=extracted)
            for s in splits
            if (ann_dir / f"{s}.json").is_file()
        ]

    @classmethod
    def archives(cls, src: Path) -> list[Path]:
        src = Path(src)
        if src.is_file() and src.suffix == ".zip":
            return [src]
        if not src.is_dir():
            return []
        return sorted(p for p in src.glob("*.zip") if p.stem.lower().startswith(("soda", "annotations", "images")))

    def locate(self, src: Path, extract: Path) -> list[Source]:
        """The unpacked release if there is one, else every archive unpacked; splits without a JSON are skipped."""
        from ultralytics.utils import LOGGER

        found, extracted = find_source(src) if src.exists() else None, False
        if found is None and self.archives(src):
            for archive in self.archives(src):
                self.unpack(archive, extract)
            found, extracted = find_source(extract), True
        if found is None:
            return []
        sources = self.find(extract if extracted else src, self.splits, extracted)
        for s in sorted(set(self.splits) - {x.split for x in sources}):
            LOGGER.warning(f"{found[0] / f'{s}.json'} not found, split {s!r} skipped")
        if not sources:
            raise FileNotFoundError(f"none of {[f'{s}.json' for s in self.splits]} found in {found[0]}")
        return sources

    def convert_split(self, source: Source, out: SplitWriter) -> dict:
        """One COCO JSON into ``out``: full images, or tiles for ``tile_splits``. Returns the JSON's class names."""
        summary, split = out.summary, source.split
        names, recs, anns = load_coco(source.annotations, summary)
        mode = self.image_mode(source)
        for image_id, (file_name, w, h) in _io.progress(recs.items(), f"SODA-D {split}", len(recs), self.show_progress):
            src = source.images / file_name
            summary.source_images[split] += 1
            size, why = _io.image_check(src)
            if size is None:
                summary.problem(str(src), f"{why}; skipped")
                continue
            if tuple(size) != (w, h):
                summary.problem(str(src), f"image is {size[0]}x{size[1]}, JSON says {w}x{h} (JSON size used)")
            ann, name = anns[image_id], Path(file_name).name
            if split not in self.tile_splits:
                if self.mask_ignored and ann.ignore:
                    data = _io.encode(fill_ignored(_io.read_image(src), ann, self.ignore_fill), Path(name).suffix)
                    out.write(name, w, h, ann, image_bytes=data)
                else:
                    out.write(name, w, h, ann, image_src=src, mode=mode)
            else:
                self._write_tiles(src, name, w, h, ann, out)
                self._write_parent(name, w, h, ann, out)
        return names

    def _write_parent(self, name: str, w: int, h: int, ann: Annotation, out: SplitWriter) -> None:
        """The full image's sidecar beside its tiles' (objects and ignored regions in full-image pixels)."""
        path = contract.split_dir(out.dst, contract.SIDECARS, out.split) / f"{Path(name).stem}.json"
        out.summary.files_written += contract.write_sidecar(path, name, w, h, ann)
        out.keep[contract.SIDECARS].add(path.name)

    def _write_tiles(self, src: Path, name: str, w: int, h: int, ann: Annotation, out: SplitWriter) -> None:
        """The tiles of one image by the tile border rule: in ``train``, those holding a kept object (all of them with
        ``keep_empty``); in the other splits, all of them (the evaluation runs on every tile)."""
        stem, suffix = Path(name).stem, Path(name).suffix.lower()
        keep_empty = self.keep_empty or out.split != "train"
        img = None
        for win in tiling.tile_windows(h, w, self.tile, self.overlap):
            part = cut(ann, win, self.min_visible, out.summary)
            if not part.objects and not keep_empty:
                continue
            if img is None:
                img = _io.read_image(src)
            crop = tiling.crop(img, win).copy()
            if self.mask_ignored and part.ignore:
                crop = fill_ignored(crop, part, self.ignore_fill)
            tile = {"source": name, "x": win[0], "y": win[1]}
            tname = f"{stem}__{win[0]}_{win[1]}{suffix}"
            out.write(tname, win[2] - win[0], win[3] - win[1], part, image_bytes=_io.encode(crop, suffix), tile=tile)


def convert_soda(
    src,
    dst,
    splits=contract.SPLITS,
    tile_splits=contract.SPLITS,
    tile: int = tiling.SODA_D_TILE,
    overlap: int = tiling.SODA_D_OVERLAP,
    min_visible: float = MIN_VISIBLE,
    keep_empty: bool = False,
    mask_ignored: bool = True,
    ignore_fill: int = 0,
    images: str = "copy",
    show_progress: bool = True,
    verbose: bool = True,
) -> Summary:
    """Convert SODA-D at ``src`` (folders or archives) into ``dst``; ``tile_splits`` are cut into tiles.

    Args:
        src: folder with ``Annotations/*.json`` and ``Images/`` (or one level above), or the official archives.
        dst: output root (created): ``images/``, ``labels/``, ``sidecars/``, ``data.yaml``, ``convert-soda-d.log``.
        splits: JSON stems to convert (missing ones are skipped with a warning).
        tile_splits: splits cut into ``tile`` x ``tile`` tiles with ``overlap`` (all by default, as the official
            protocol trains and evaluates on tiles); others keep full images.
        tile: tile side in pixels (the SODA-D protocol's 800).
        overlap: tile overlap in pixels (the SODA-D protocol's 150).
        min_visible: tile border rule threshold (fraction of an object's area inside the tile; official 0.4).
        keep_empty: also write training tiles without objects (tiles of other splits are always all written).
        mask_ignored: fill ignored regions in written images (on by default, as the official split does).
        ignore_fill: the fill value (official ``ignFillVal``: 0, black).
        images: ``copy``/``hardlink``/``symlink`` for full images that are not re-encoded.
        show_progress: progress bar per split.
        verbose: log the end summary with Ultralytics' ``LOGGER``.

    Returns:
        The run's :class:`~so_det_ultra.data._summary.Summary` (also written to ``dst/convert-soda-d.log``).
    """
    converter = SodaD(
        splits, tile_splits, tile, overlap, min_visible, keep_empty, mask_ignored, images, show_progress, ignore_fill
    )
    return converter.run(src, dst, verbose)


def prepare_from_yaml(data: dict) -> None:
    """``download:`` step of ``cfg/datasets/soda-d.yaml``: convert local SODA-D files into ``data['path']``.

    Looks in ``$SO_DET_SODA_SRC``, in ``path`` itself and in its parent folder. Never downloads. The tiles are cut
    with ``so_det.tile`` / ``so_det.overlap`` of the YAML (official 800 / 150 when absent).
    """
    key = data.get(contract.SO_DET_KEY) or {}
    geometry = {k: int(key[k]) for k in ("tile", "overlap") if k in key}
    convert_soda(SodaD.local_source(data), Path(data["path"]), **geometry)
