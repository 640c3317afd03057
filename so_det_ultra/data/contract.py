"""The data contract between the dataset converters (:mod:`so_det_ultra.data`) and the metrics
(:mod:`so_det_ultra.metrics`): what both sides must agree on, here and only here.

Owns: the dataset layout, the sidecar JSON schema (one writer, :func:`write_sidecar`; one reader,
:func:`read_sidecar`, which returns typed records), YOLO label rows (one writer, one reader), the ``so_det:`` key of a
data YAML and its writer, the image suffixes and the object-size bins. Pure Python and numpy; the only other import
from this package is :mod:`so_det_ultra.data._io` (atomic file writes). The same contract in prose: docs/datasets.md.

Layout of a converted dataset root::

    <root>/images/<split>/<stem>.<ext>     images (or tiles)
    <root>/labels/<split>/<stem>.txt       YOLO rows ``cls xc yc w h`` (normalised)
    <root>/sidecars/<split>/<stem>.json    what YOLO labels cannot hold (schema: :func:`sidecar_dict`)
    <root>/data.yaml                       ``path``, splits, ``names``, ``so_det: {eval, sidecars, max_det}``

Examples:
    >>> from so_det_ultra.data.contract import size_bin, SODA_D_BINS
    >>> size_bin(10 * 10), size_bin(15 * 15, SODA_D_BINS)
    ('small', 'rS')
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from so_det_ultra.data import _io

# ---------------------------------------------------------------------------------------------------------- layout
IMAGES, LABELS, SIDECARS = "images", "labels", "sidecars"
OUTPUT_DIRS = (IMAGES, LABELS, SIDECARS)  # the folders a converter owns (and cleans of stale files) under its root
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # lower case; compare suffix.lower()
SO_DET_KEY = "so_det"  # data YAML key that turns on the small-object evaluation (docs/metrics.md)


def split_dir(root, kind: str, split: str) -> Path:
    """``root/<kind>/<split>`` for ``kind`` in :data:`OUTPUT_DIRS`."""
    if kind not in OUTPUT_DIRS:
        raise ValueError(f"kind must be one of {OUTPUT_DIRS}, got {kind!r}")
    return Path(root) / kind / split


def is_image(path) -> bool:
    """True for a file name with one of :data:`IMAGE_SUFFIXES` (any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def image_index(folder) -> dict:
    """``{stem: path}`` for every image file directly inside ``folder`` (first suffix in sorted order wins)."""
    out = {}
    if Path(folder).is_dir():
        for p in sorted(Path(folder).iterdir()):
            if is_image(p) and p.is_file():
                out.setdefault(p.stem, p)
    return out


def sidecar_path(image, root, folder: str = SIDECARS) -> Path:
    """``root/images/<split>/<stem>.<ext>`` -> ``root/<folder>/<split>/<stem>.json``.

    An image outside ``root/images`` uses the name of its own folder as the split.
    """
    image, root = Path(image), Path(root)
    try:
        rel = image.relative_to(root / IMAGES)
    except ValueError:
        rel = Path(image.parent.name) / image.name
    return root / folder / rel.with_suffix(".json")


# ------------------------------------------------------------------------------------------------------ size bins
BIG = 1e5**2  # COCO's "no upper limit" area
# (label, min_area, max_area) in pixel^2, edges inclusive as in COCOeval.
# COCO (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014; cocodataset.org/#detection-eval).
COCO_BINS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, BIG))
# SODA-D (Cheng et al., TPAMI 2023; github.com/shaunyuan22/SODA-mmdetection, mmdet/datasets/sodad_eval/sodadeval.py):
# extremely / relatively / generally small, and Normal.
SODA_D_BINS = (("eS", 0.0, 12.0**2), ("rS", 12.0**2, 20.0**2), ("gS", 20.0**2, 32.0**2), ("N", 32.0**2, 40.0 * 50))
SODA_D_SMALL = (0.0, 32.0**2)  # SODA-D's headline AP covers only the "Small" range


def size_bin(area: float, bins=COCO_BINS) -> str | None:
    """Label of the first bin whose range holds ``area`` (edges inclusive), or None beyond the last bin."""
    return next((label for label, lo, hi in bins if lo <= area <= hi), None)


# ---------------------------------------------------------------------------------------------------------- boxes
def clip_box(x1: float, y1: float, x2: float, y2: float, width: float, height: float):
    """Clip a pixel box to ``[0, width] x [0, height]``; ``None`` if no positive area remains inside."""
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)
    return (cx1, cy1, cx2, cy2) if cx2 > cx1 and cy2 > cy1 else None


def coord(v: float):
    """A pixel coordinate as the sidecar stores it: integers stay integers, other values keep 3 decimals."""
    return int(v) if float(v).is_integer() else round(float(v), 3)


class ObjectBox(NamedTuple):
    """One labelled object in pixel xyxy; ``truncation``/``occlusion`` as the source annotation gives them, or None."""

    cls: int
    x1: float
    y1: float
    x2: float
    y2: float
    truncation: Optional[int] = None
    occlusion: Optional[int] = None

    @property
    def box(self) -> tuple:
        """``(x1, y1, x2, y2)``."""
        return self.x1, self.y1, self.x2, self.y2


class TileOrigin(NamedTuple):
    """Where a tile was cut from: the source image's file name and the tile's top-left corner in it (pixels)."""

    source: str
    x: float
    y: float


def as_object(o) -> ObjectBox:
    """``o`` as an :class:`ObjectBox` (a plain ``(cls, x1, y1, x2, y2[, truncation, occlusion])`` tuple is accepted)."""
    return o if isinstance(o, ObjectBox) else ObjectBox(*o)


@dataclass
class Annotation:
    """The objects of one image (or tile) in pixel xyxy and its ignored regions.

    ``objects``: :class:`ObjectBox` records; ``ignore``: ``[x1, y1, x2, y2]`` regions where detections are neither
    rewarded nor punished; ``ignored_objects``: :class:`ObjectBox` records of ground truth flagged ``ignore`` (no
    label; COCO's ``ignore``: a detection matching one is neither rewarded nor punished; SODA-D's parent sidecars).
    """

    objects: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    ignored_objects: list = field(default_factory=list)


def yolo_rows(objects, width: int, height: int) -> str:
    """YOLO label text ``cls xc yc w h`` (normalised, 6 decimals) for pixel-xyxy ``objects``."""
    rows = []
    for o in map(as_object, objects):
        xc, yc = (o.x1 + o.x2) / 2 / width, (o.y1 + o.y2) / 2 / height
        bw, bh = (o.x2 - o.x1) / width, (o.y2 - o.y1) / height
        rows.append(f"{o.cls} {xc:.6f} {yc:.6f} {bw:.6f} {bh:.6f}\n")
    return "".join(rows)


def read_labels(path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A YOLO label file -> pixel xyxy boxes (N, 4) and classes (N,). Polygon rows become their bounding box.

    A missing file means no objects. Boxes are rounded to 0.01 px: labels hold ~6 decimals of a normalised value
    (~0.002 px at 2000 px), so integral source annotations (VisDrone) come back exactly and a box lying exactly on
    the ignore threshold stays on its side.
    """
    path = Path(path)
    boxes, cls = [], []
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            v = line.split()
            if not v:
                continue
            try:
                c, xy = int(float(v[0])), np.asarray(v[1:], dtype=np.float64)
            except ValueError as err:
                raise ValueError(f"{path}:{n}: not a YOLO label row: {line!r}") from err
            if len(xy) == 4:
                xc, yc, w, h = xy
                x1, y1, x2, y2 = xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
            elif len(xy) >= 6 and len(xy) % 2 == 0:
                x1, y1, x2, y2 = xy[0::2].min(), xy[1::2].min(), xy[0::2].max(), xy[1::2].max()
            else:
                raise ValueError(f"{path}:{n}: expected 'cls xc yc w h' (or a polygon), got {line!r}")
            boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
            cls.append(c)
    boxes = np.round(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 2)
    return boxes, np.asarray(cls, dtype=np.int64)


# -------------------------------------------------------------------------------------------------------- sidecars
@dataclass
class Sidecar:
    """A sidecar as read back: image name, size, ignored regions (K, 4), the objects (:class:`ObjectBox`, in label
    order) and, for a tile, where it was cut from (:class:`TileOrigin`; None for a full image)."""

    image: str | None = None
    width: int | None = None
    height: int | None = None
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    objects: list = field(default_factory=list)
    tile: TileOrigin | None = None
    ignored_objects: list = field(default_factory=list)

    def object_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The objects as pixel xyxy boxes (N, 4) float64 and classes (N,) int64."""
        boxes = np.asarray([o.box for o in self.objects], dtype=np.float64).reshape(-1, 4)
        return boxes, np.asarray([o.cls for o in self.objects], dtype=np.int64)


def sidecar_dict(image: str, width: int, height: int, ann: Annotation, tile=None) -> dict:
    """The sidecar JSON object of one image (pixel xyxy in that image; for a tile, in the tile).

    Keys: ``image`` (file name), ``width``, ``height``, ``ignore`` (list of ``[x1, y1, x2, y2]``), ``objects`` (one
    ``{cls, box, truncation, occlusion}`` per label row, in label order), ``ignored_objects`` (``{cls, box}`` of
    ground truth flagged ``ignore``; only when there are some) and, for a tile only, ``tile`` (``{source, x, y}``:
    the source image name and the tile's top-left corner in it; a :class:`TileOrigin` or a dict).
    """
    out = {
        "image": image,
        "width": width,
        "height": height,
        "ignore": [[coord(v) for v in box] for box in ann.ignore],
        "objects": [
            {"cls": o.cls, "box": [coord(v) for v in o.box], "truncation": o.truncation, "occlusion": o.occlusion}
            for o in map(as_object, ann.objects)
        ],
    }
    if ann.ignored_objects:  # written only when there are some: other sidecars keep their bytes
        out["ignored_objects"] = [{"cls": o.cls, "box": [coord(v) for v in o.box]} for o in ann.ignored_objects]
    if tile is not None:
        out["tile"] = tile._asdict() if isinstance(tile, TileOrigin) else dict(tile)
    return out


def write_sidecar(path, image: str, width: int, height: int, ann: Annotation, tile=None, write=None) -> bool:
    """Write :func:`sidecar_dict` to ``path`` (compact, atomic, only when the bytes change); True if written.

    ``write(path, text) -> bool`` writes the text (default :func:`~._io.atomic_write_text`; a run writes through its
    :class:`~.ownership.Ownership`).
    """
    return (write or _io.atomic_write_text)(path, _io.json_text(sidecar_dict(image, width, height, ann, tile)))


def read_sidecar(path) -> Sidecar | None:
    """The sidecar at ``path``, or None when there is none (an image without a sidecar has no ignored regions).

    Raises:
        ValueError: The file is not a sidecar of this schema (the message names the file and the field).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        return Sidecar(
            image=meta.get("image"),
            width=int(meta["width"]) if "width" in meta else None,
            height=int(meta["height"]) if "height" in meta else None,
            ignore=np.asarray(meta.get("ignore", []), dtype=np.float64).reshape(-1, 4),
            objects=[_read_object(o) for o in meta.get("objects", [])],
            tile=_read_tile(meta["tile"]) if meta.get("tile") else None,
            ignored_objects=[_read_object(o) for o in meta.get("ignored_objects", [])],
        )
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"{path}: not a so-det sidecar ({type(err).__name__}: {err}); see docs/datasets.md") from err


def _read_object(o: dict) -> ObjectBox:
    box = [float(v) for v in o["box"]]
    if len(box) != 4:
        raise ValueError(f"an object's 'box' must be [x1, y1, x2, y2], got {o['box']!r}")
    return ObjectBox(int(o["cls"]), *box, o.get("truncation"), o.get("occlusion"))


def _read_tile(t: dict) -> TileOrigin:
    try:
        return TileOrigin(str(t["source"]), float(t["x"]), float(t["y"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"'tile' must be {{source, x, y}}, got {t!r}") from err


# ---------------------------------------------------------------------------------------------------- data YAML
def so_det_key(protocol: str, max_det: int) -> dict:
    """The ``so_det:`` mapping a converter writes: evaluation protocol, sidecar folder, detections per image."""
    return {"eval": protocol, "sidecars": SIDECARS, "max_det": max_det}


def so_det_hint() -> str:
    """What to add to a data YAML without the key, for error messages: ``so_det: {eval: visdrone, ...}``."""
    return f"{SO_DET_KEY}: {{" + ", ".join(f"{k}: {v}" for k, v in so_det_key("visdrone", 500).items()) + "}"


def sidecar_folder(data: dict) -> str:
    """The sidecar folder (under ``data['path']``) named by a loaded data YAML's ``so_det:`` key."""
    return (data.get(SO_DET_KEY) or {}).get("sidecars", SIDECARS)


def write_data_yaml(dst, names: dict, so_det: dict | None = None, train_fallback: bool = True, write=None) -> Path:
    """``dst/data.yaml`` for every split present under ``dst/images``; val falls back to train when absent.

    The ``so_det:`` key is written when ``so_det`` is given (converters); plain YOLO datasets leave it out.
    ``write(path, text)`` writes the file (default :func:`~._io.atomic_write_text`).

    Returns:
        The path written.
    """
    import yaml

    dst = Path(dst)
    present = [s for s in SPLITS if (dst / IMAGES / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"nothing converted under {dst / IMAGES}")
    data = {"path": str(dst.resolve())}
    for s in present:
        data[s] = f"{IMAGES}/{s}"
    if "train" not in data:
        data["train"] = data.get("val") or data["test"]
    if "val" not in data and train_fallback:
        data["val"] = data["train"]
    data["names"] = dict(names)
    if so_det is not None:
        data[SO_DET_KEY] = dict(so_det)
    path = dst / "data.yaml"
    (write or _io.atomic_write_text)(path, yaml.safe_dump(data, sort_keys=False))
    return path
