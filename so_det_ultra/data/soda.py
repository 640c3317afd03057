"""SODA-D (COCO JSON) -> YOLO labels and sidecars, cut into the official 800x800 / 150 px-overlap tiles.

Source layout (the official release, unzipped): ``SRC/Annotations/{train,val,test}.json`` and ``SRC/Images/``
(file names in the JSON are relative to ``Images/``); dataset: G. Cheng et al., "Towards Large-Scale Small Object
Detection: Survey and Benchmarks", TPAMI 2023, https://shaunyuan22.github.io/SODA/. Output layout and sidecar format:
:mod:`so_det_ultra.data.contract` and docs/datasets.md; the run itself (sources, archives, rerun safety, log) is the
skeleton of :mod:`so_det_ultra.data.converter`.

The conversion rules (classes, ignored regions and flags, bad files, tiling and the tile border rule, the fill,
the training extent, which tiles are written, parent sidecars) follow the official split tool
(github.com/shaunyuan22/SODA-mmdetection ``tools/img_split/sodad_split.py``); each rule, its source line and the
interpretations left are listed in docs/datasets.md, "Conversion rules (SODA-D)".

Examples:
    >>> from so_det_ultra.data.soda import convert_soda
    >>> summary = convert_soda("downloads/SODA-D", "datasets/soda-d")  # doctest: +SKIP
    >>> # yolo train model=so-det-s.yaml data=datasets/soda-d/data.yaml imgsz=1200
"""

from __future__ import annotations

from pathlib import Path

from so_det_ultra.data import _io, contract, tiling
from so_det_ultra.data._summary import Summary
from so_det_ultra.data.contract import Annotation
from so_det_ultra.data.converter import Converter, Source, SplitWriter, fill_ignored
from so_det_ultra.data.soda_coco import FLAGS, load_coco

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


def cut(ann: Annotation, window, min_visible: float, summary: Summary) -> tuple[Annotation, list]:
    """The part of ``ann`` inside ``window`` in window pixels, by the tile border rule, and the cut objects' slivers.

    An object is kept (clipped) when more than ``min_visible`` of its area lies in the window; otherwise its visible
    part (a sliver) is an ignored region of the tile (``sodad_split.py`` line 295: ``ignore`` when the fraction is
    ``<= interAreaIgnThr``). Returns ``(part, slivers)``: ``part.ignore`` holds the clipped ignored regions, then the
    slivers, which are also returned on their own (their pixels are kept when the tile is filled).
    """
    x0, y0, x1, y1 = window
    out, slivers = Annotation(), []
    for x1b, y1b, x2b, y2b in ann.ignore:
        if (b := contract.clip_box(x1b - x0, y1b - y0, x2b - x0, y2b - y0, x1 - x0, y1 - y0)) is not None:
            out.ignore.append([contract.coord(v) for v in b])
    for obj in ann.objects:
        bx1, by1, bx2, by2 = obj.box
        b = contract.clip_box(bx1 - x0, by1 - y0, bx2 - x0, by2 - y0, x1 - x0, y1 - y0)
        if b is None:
            continue
        if (b[2] - b[0]) * (b[3] - b[1]) > min_visible * (bx2 - bx1) * (by2 - by1) + 1e-9:
            out.objects.append(obj._replace(x1=b[0], y1=b[1], x2=b[2], y2=b[3]))
            summary.clipped += b != (bx1 - x0, by1 - y0, bx2 - x0, by2 - y0)
        else:
            slivers.append([contract.coord(v) for v in b])
            summary.skipped[f"cut by a tile border, <= {min_visible:g} visible -> tile ignore"] += 1
    out.ignore += slivers
    return out, slivers


def parent_annotation(ann: Annotation, flagged) -> Annotation:
    """A full image's ground truth for its parent sidecar: its objects flagged ``ignore`` (indices ``flagged``) move
    to ``ignored_objects``, which the evaluation scores as COCO's ignored ground truth (``sodadeval.py`` line 115)."""
    if not flagged:
        return ann
    objects = [o for k, o in enumerate(ann.objects) if k not in flagged]
    return Annotation(objects, ann.ignore, [ann.objects[k] for k in sorted(flagged)])


def train_extent(width: int, height: int, extent: tuple, tile: int) -> tuple[int, int]:
    """The part of a training image that is cut into tiles: up to 5 px beyond its annotations' ``(xmax, ymax)``
    (``sodad_split.py`` lines 176-177), at least one tile (the official script pads a smaller extent to the patch
    size, lines 180-182, with the image's own pixels while the image is large enough), at most the image."""
    return min(width, max(extent[0] + 5, tile)), min(height, max(extent[1] + 5, tile))


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
        fill_slivers: bool = False,
        limit_extent: bool = True,
        flags: str = "official",
    ):
        super().__init__(images, mask_ignored, show_progress)
        self.ignore_fill, self.fill_slivers = ignore_fill, fill_slivers
        self.limit_extent, self.flags = limit_extent, flags
        if not 0 <= min_visible < 1:
            raise ValueError(f"min_visible must be in [0, 1) (official interAreaIgnThr), got {min_visible}")
        if flags not in FLAGS:
            raise ValueError(f"flags must be one of {FLAGS}, got {flags!r}")
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
        names, recs, anns, extents, flagged = load_coco(source.annotations, summary, self.flags)
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
            elif image_id in extents or self.keep_empty:  # sodad_split.py splits only images with annotations
                self._write_tiles(src, name, w, h, ann, out, extents.get(image_id))
                self._write_parent(name, w, h, parent_annotation(ann, flagged.get(image_id, ())), out)
            else:
                summary.skipped["image without annotations: no tiles (as the official split)"] += 1
        return names

    def _write_parent(self, name: str, w: int, h: int, ann: Annotation, out: SplitWriter) -> None:
        """The full image's sidecar beside its tiles' (objects and ignored regions in full-image pixels)."""
        out.write_sidecar(name, w, h, ann)

    def _fill(self, crop, part: Annotation, slivers: list):
        """Fill a tile's ignored regions: only the ``ignore`` category's, then every object's pixels restored, cut
        objects' slivers included (``sodad_split.py`` lines 272 and 329-341, int-truncated boxes); with
        ``fill_slivers``, slivers are filled too and boxes cover every touched pixel (the earlier reading)."""
        if self.fill_slivers:
            return fill_ignored(crop, part, self.ignore_fill)
        regions = Annotation(objects=part.objects, ignore=part.ignore[: len(part.ignore) - len(slivers)])
        return fill_ignored(crop, regions, self.ignore_fill, keep=slivers, truncate=True)

    def _write_tiles(self, src: Path, name: str, w: int, h: int, ann: Annotation, out: SplitWriter, extent) -> None:
        """The tiles of one image by the tile border rule, as ``sodad_split.py`` (``_divImg``) keeps them: in
        ``train``, those any object intersects, kept or cut (line 209; also an ignored region's without
        ``mask_ignored``), over :func:`train_extent` (``limit_extent``); all of them with ``keep_empty`` and in the
        other splits (the evaluation runs on every tile)."""
        stem, suffix = Path(name).stem, Path(name).suffix.lower()
        train = out.split == "train"
        keep_empty = self.keep_empty or not train
        if train and self.limit_extent and extent is not None:
            w, h = train_extent(w, h, extent, self.tile)
        img = None
        for win in tiling.tile_windows(h, w, self.tile, self.overlap):
            part, slivers = cut(ann, win, self.min_visible, out.summary)
            if not (keep_empty or part.objects or slivers or (part.ignore and not self.mask_ignored)):
                continue
            if img is None:
                img = _io.read_image(src)
            crop = tiling.crop(img, win).copy()
            if self.mask_ignored and part.ignore:
                crop = self._fill(crop, part, slivers)
            tile = contract.TileOrigin(name, win[0], win[1])
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
    force: bool = False,
    lock_timeout: float | None = None,
    guard_src: bool = True,
    fill_slivers: bool = False,
    limit_extent: bool = True,
    flags: str = "official",
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
        min_visible: tile border rule threshold: an object at most this fraction of whose area lies inside the tile
            is ignored there (official ``interAreaIgnThr`` 0.4, ``<=``).
        keep_empty: also write training tiles without objects (tiles of other splits are always all written), and
            tiles of images without annotations (the official split skips those images).
        mask_ignored: fill ignored regions in written images (on by default, as the official split does).
        ignore_fill: the fill value (official ``ignFillVal``: 0, black).
        images: ``copy``/``hardlink``/``symlink`` for full images that are not re-encoded.
        show_progress: progress bar per split.
        verbose: log the end summary with Ultralytics' ``LOGGER``.
        force: convert into a non-empty ``dst`` without a conversion manifest (see :mod:`~so_det_ultra.data.ownership`).
        lock_timeout: seconds to wait for another conversion writing ``dst`` (None: wait until it ends).
        guard_src: refuse a ``dst`` equal to, inside or holding ``src`` (False for the data YAML's ``download:`` step,
            where the release may sit in the dataset folder or its parent; the folders read are always guarded).
        fill_slivers: also fill the slivers of cut objects (the earlier reading; officially their pixels are kept).
        limit_extent: cut training images only up to 5 px beyond their annotations, as the official split does
            (False: the whole image).
        flags: ``official``: only the ``ignore`` category is an ignored region; an object annotation flagged
            ``ignore`` is a label in training tiles (the split tool recomputes the flag) and ignored ground truth in
            evaluation (``SODADeval`` reads ``gt['ignore']``); ``iscrowd`` is not read. ``region``: an annotation
            flagged ``ignore`` or ``iscrowd`` is an ignored region (the earlier reading).

    Returns:
        The run's :class:`~so_det_ultra.data._summary.Summary` (also written to ``dst/convert-soda-d.log``).
    """
    converter = SodaD(
        splits,
        tile_splits,
        tile,
        overlap,
        min_visible,
        keep_empty,
        mask_ignored,
        images,
        show_progress,
        ignore_fill,
        fill_slivers,
        limit_extent,
        flags,
    )
    return converter.run(src, dst, verbose, force, lock_timeout, guard_src)


def prepare_from_yaml(data: dict) -> None:
    """``download:`` step of ``cfg/datasets/soda-d.yaml``: convert local SODA-D files into ``data['path']``.

    Looks in ``$SO_DET_SODA_SRC``, in ``path`` itself and in its parent folder. Never downloads. The tiles are cut
    with ``so_det.tile`` / ``so_det.overlap`` of the YAML (official 800 / 150 when absent).
    """
    key = data.get(contract.SO_DET_KEY) or {}
    geometry = {k: int(key[k]) for k in ("tile", "overlap") if k in key}
    convert_soda(SodaD.local_source(data), Path(data["path"]), **geometry, guard_src=False)
