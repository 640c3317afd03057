"""VisDrone2019-DET (native annotation files) -> YOLO labels plus per-image sidecars with what YOLO cannot hold.

Source layout (the official archives, unzipped): ``VisDrone2019-DET-{train,val,test-dev}/{images,annotations}``; one
annotation line per box, ``x,y,w,h,score,category,truncation,occlusion`` in pixels with (x, y) the top-left corner
(P. Zhu et al., "Detection and Tracking Meet Drones Challenge", TPAMI 2021; format described in
github.com/VisDrone/VisDrone2018-DET-toolkit, ``readme.md``). Output layout and sidecar format:
:mod:`so_det_ultra.data.contract` and docs/datasets.md. The run itself (sources, archives, rerun safety, log) is the
skeleton of :mod:`so_det_ultra.data.converter`.

The conversion rules (categories, ignored regions, malformed lines as ``file:line: reason``, clipping, bad and empty
files) are listed in docs/datasets.md, "Conversion rules (VisDrone)". Ignored regions are only recorded by default;
``mask_ignored=True`` paints them in the converted copy: ``mask_style="esod"`` (the default, ESOD's recipe) paints the
boxes of categories 0 *and* 11 with 85, in file order (github alibaba/esod ``scripts/data_prepare.py`` lines
229-235); ``mask_style="grey"`` fills category 0 with grey 114 and keeps labelled objects' pixels (an interpretation).

Examples:
    >>> from so_det_ultra.data.visdrone import convert_visdrone
    >>> summary = convert_visdrone("downloads/", "datasets/visdrone")  # doctest: +SKIP
    >>> # yolo train model=so-det-s.yaml data=datasets/visdrone/data.yaml
"""

from __future__ import annotations

import math
from pathlib import Path

from so_det_ultra.data import _io, contract
from so_det_ultra.data._summary import Summary
from so_det_ultra.data.contract import Annotation
from so_det_ultra.data.converter import Converter, Source, SplitWriter, fill_ignored

NAMES = {
    0: "pedestrian",
    1: "people",
    2: "bicycle",
    3: "car",
    4: "van",
    5: "truck",
    6: "tricycle",
    7: "awning-tricycle",
    8: "bus",
    9: "motor",
}
SPLITS = {"VisDrone2019-DET-train": "train", "VisDrone2019-DET-val": "val", "VisDrone2019-DET-test-dev": "test"}
MASK_STYLES = ("esod", "grey")
ESOD_FILL = 85  # scripts/data_prepare.py: image[y1:y1 + h, x1:x1 + w, :] = 85 for categories 0 and 11
SO_DET = contract.so_det_key("visdrone", max_det=500)  # the toolkit's maxDets (utils/calcAccuracy.m)
ENV_SRC = "SO_DET_VISDRONE_SRC"


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
        box = contract.clip_box(x, y, x + w, y + h, width, height)
        if box is None:
            summary.problem(f"{name}:{i}", "box outside the image")
            continue
        clipped = box != (x, y, x + w, y + h)
        if cat == 0:
            out.ignore.append([contract.coord(v) for v in box])
            summary.ignore_regions += 1
            summary.skipped["ignored region (category 0) -> sidecar"] += 1
        elif cat == 11:
            summary.skipped["others (category 11)"] += 1
        elif score == 0:
            summary.skipped["score 0"] += 1
        else:
            out.objects.append(contract.ObjectBox(cat - 1, *box, trunc, occ))
            summary.clipped += clipped
    return out


def masked_image(path: Path, ann: Annotation, lines=(), style: str = "grey") -> bytes | None:
    """Encoded copy of the image at ``path`` with ignored regions painted (module docstring), None if none is.

    ``esod``: the category-0 and -11 boxes of the annotation ``lines`` filled with 85 (official ``data_prepare.py``);
    ``grey``: ``ann``'s ignored regions filled grey, objects kept (:func:`.converter.fill_ignored`).
    """
    if style == "grey":
        return _io.encode(fill_ignored(_io.read_image(path), ann), path.suffix) if ann.ignore else None
    boxes = []
    for line in lines:
        try:
            row = parse_line(line)
        except ValueError:
            continue  # reported by parse_annotation
        if row is not None and row[5] in (0, 11):
            boxes.append([max(int(v), 0) for v in row[:4]])
    if not boxes:
        return None
    img = _io.read_image(path)
    for x, y, w, h in boxes:
        img[y : y + h, x : x + w] = ESOD_FILL
    return _io.encode(img, path.suffix)


def find_splits(src: Path, split: str | None = None):
    """``[(split, folder)]`` in ``src``: an official split folder, or the ``VisDrone2019-DET-*`` folders in it."""
    src = Path(src)
    if (src / "images").is_dir() and (src / "annotations").is_dir():
        if split is None:
            split = next((s for name, s in SPLITS.items() if src.name == name), "train")
        return [(split, src)]
    found = [(s, src / name) for name, s in SPLITS.items() if (src / name / "images").is_dir()]
    return [(s, f) for s, f in found if split is None or s == split]


MISSING = """VisDrone2019-DET not found in {where}.
Expected one of:
  - the official folders VisDrone2019-DET-train/, VisDrone2019-DET-val/, VisDrone2019-DET-test-dev/
    (each holding images/ and annotations/), or one such split folder itself;
  - the official archives VisDrone2019-DET-train.zip, VisDrone2019-DET-val.zip, VisDrone2019-DET-test-dev.zip.
Get them from https://github.com/VisDrone/VisDrone-Dataset (Task 1, object detection in images) on a connected
machine, copy them there (or set {env}=<folder holding them>) and run again.
See docs/datasets.md."""


class VisDrone(Converter):
    """VisDrone2019-DET: one source split per official folder (or archive); images kept, labels and sidecars written."""

    name = "visdrone"
    names = NAMES
    so_det = SO_DET
    env = ENV_SRC
    missing = MISSING

    def __init__(
        self, split: str | None, mask_ignored: bool, images: str, show_progress: bool, mask_style: str = "esod"
    ):
        super().__init__(images, mask_ignored, show_progress)
        if mask_style not in MASK_STYLES:
            raise ValueError(f"mask_style must be one of {MASK_STYLES}, got {mask_style!r}")
        self.split = split
        self.mask_style = mask_style

    @classmethod
    def find(cls, src: Path, split: str | None = None, extracted: bool = False) -> list[Source]:
        return [
            Source(s, folder / "images", folder / "annotations", guard=(folder,), extracted=extracted)
            for s, folder in find_splits(src, split)
        ]

    @classmethod
    def archives(cls, src: Path) -> list[Path]:
        src = Path(src)
        if src.is_file() and src.suffix == ".zip":
            return [src]
        return sorted(p for p in src.glob("VisDrone2019-DET-*.zip") if p.stem in SPLITS) if src.is_dir() else []

    def locate(self, src: Path, extract: Path) -> list[Source]:
        """Folders first; an archive is unpacked only for a split no folder provides."""
        sources = self.find(src, self.split) if src.is_dir() else []
        done = {s.split for s in sources}
        for archive in self.archives(src):
            split = SPLITS[archive.stem]
            if split in done or (self.split is not None and split != self.split):
                continue
            self.unpack(archive, extract)
            sources += [s for s in self.find(extract, split, extracted=True) if s.split == split]
            done.add(split)
        return sorted(sources, key=lambda s: s.split)

    def convert_split(self, source: Source, out: SplitWriter) -> None:
        """One official split folder (``images/`` + ``annotations/``) into ``out``."""
        summary, split = out.summary, source.split
        index, ann_dir = contract.image_index(source.images), source.annotations
        if not index:
            raise FileNotFoundError(f"no images in {source.images}")
        if not ann_dir.is_dir():
            raise FileNotFoundError(
                f"{ann_dir} is missing (VisDrone test-challenge has no annotations: not convertible)"
            )
        for ann in sorted(ann_dir.glob("*.txt")):
            if ann.stem not in index:
                summary.problem(f"{ann}", "annotation file without an image")
        for stem, img in _io.progress(index.items(), f"VisDrone {split}", len(index), self.show_progress):
            summary.source_images[split] += 1
            size, why = _io.image_check(img)
            if size is None:
                summary.problem(str(img), f"{why}; skipped")
                continue
            w, h = size
            ann_file = ann_dir / f"{stem}.txt"
            if ann_file.is_file():
                try:
                    lines = ann_file.read_text(encoding="utf-8", errors="replace").splitlines()
                except OSError as err:
                    summary.problem(str(ann_file), f"unreadable annotation file ({err.strerror or err}); image skipped")
                    continue
                if not any(line.strip() for line in lines):
                    summary.warn(str(ann_file), "empty annotation file (image written without objects)")
            else:
                summary.problem(str(ann_file), "missing annotation file (image written without objects)")
                lines = []
            ann = parse_annotation(lines, w, h, str(ann_file), summary)
            masked = masked_image(img, ann, lines, self.mask_style) if self.mask_ignored else None
            if masked is not None:
                out.write(img.name, w, h, ann, image_bytes=masked)
            else:
                out.write(img.name, w, h, ann, image_src=img, mode=self.image_mode(source))


def convert_visdrone(
    src,
    dst,
    split: str | None = None,
    mask_ignored: bool = False,
    images: str = "copy",
    show_progress: bool = True,
    verbose: bool = True,
    force: bool = False,
    lock_timeout: float | None = None,
    mask_style: str = "esod",
) -> Summary:
    """Convert VisDrone2019-DET at ``src`` (folders, a split folder, or the official .zip archives) into ``dst``.

    Args:
        src: folder with ``VisDrone2019-DET-{train,val,test-dev}`` folders or archives, or one split folder itself.
        dst: output root (created): ``images/``, ``labels/``, ``sidecars/``, ``data.yaml``, ``convert-visdrone.log``.
        split: convert only this split (``train``/``val``/``test``); for a single split folder, its name in ``dst``
            (default: from the folder name, else ``train``).
        mask_ignored: paint ignored regions in the converted images (off by default).
        images: ``copy`` (default), ``hardlink`` or ``symlink`` the unmasked images.
        show_progress: progress bar per split.
        verbose: log the end summary with Ultralytics' ``LOGGER``.
        force: convert into a non-empty ``dst`` without a conversion manifest (see :mod:`~so_det_ultra.data.ownership`).
        lock_timeout: seconds to wait for another conversion writing ``dst`` (None: wait until it ends).
        mask_style: with ``mask_ignored``, ``grey`` (category 0 filled 114, objects kept) or ``esod`` (categories 0
            and 11 painted 85, ESOD's official preparation).

    Returns:
        The run's :class:`~so_det_ultra.data._summary.Summary` (also written to ``dst/convert-visdrone.log``).
    """
    converter = VisDrone(split, mask_ignored, images, show_progress, mask_style)
    return converter.run(src, dst, verbose, force, lock_timeout)


def prepare_from_yaml(data: dict) -> None:
    """``download:`` step of ``cfg/datasets/visdrone.yaml``: convert local VisDrone files into ``data['path']``.

    Looks, in order, in ``$SO_DET_VISDRONE_SRC``, in ``path`` itself and in its parent folder (Ultralytics'
    ``datasets_dir`` for the default relative ``path``) for the official folders or archives. Never downloads.
    """
    VisDrone(None, False, "copy", True).run(VisDrone.local_source(data), Path(data["path"]), guard_src=False)
