"""Ground truth for evaluation: the images a split is scored on, read from YOLO labels and sidecars.

Owns: :class:`ImageTruth` (one evaluated image), the names a prediction row may use for an image
(:func:`image_names`), the image list of a split (:func:`split_images`) and, for a tiled split, the mapping of each
tile onto its original image (:class:`EvalTruth`, :func:`load_eval_truth`). Everything about the files on disk comes
through :mod:`so_det_ultra.data.contract`; the rules are in docs/metrics.md and docs/datasets.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from so_det_ultra.data import contract


@dataclass
class ImageTruth:
    """Ground truth of one image in pixels: ``boxes`` (N, 4) xyxy, ``cls`` (N,) class indices, ``ignore`` (K, 4)
    regions, and ``ignored_boxes`` (M, 4) / ``ignored_cls`` (M,): objects flagged ``ignore`` (COCO's ignored ground
    truth, as SODA-D's ``sodadeval.py`` reads ``gt['ignore']``; from a sidecar's ``ignored_objects``)."""

    file: Path
    width: int
    height: int
    boxes: np.ndarray
    cls: np.ndarray
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    ignored_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    ignored_cls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class EvalTruth:
    """The images a split is scored on, and how its tile images map onto them.

    Attributes:
        images: One :class:`ImageTruth` per evaluated image: full images of the split and the original images of its
            tiles.
        tiles: ``{name: (index into images, x0, y0)}`` for each tile image, keyed by every name a prediction row may
            use for it (:func:`image_names`).
        n_tiles: Number of tile images in the split.
    """

    images: list = field(default_factory=list)
    tiles: dict = field(default_factory=dict)
    n_tiles: int = 0


def image_names(path: Path) -> list[str]:
    """Ways a prediction row names an image: file name, stem, and Ultralytics' ``int(stem)`` for numeric stems."""
    stem = path.stem
    return [path.name, stem, *([str(int(stem))] if stem.isnumeric() else [])]


def image_index(files) -> dict:
    """``{name: position}`` over :func:`image_names` of ``files``; the first image wins a name two images share."""
    index = {}
    for i, f in enumerate(files):
        for k in image_names(Path(f)):
            index.setdefault(k, i)
    return index


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    from ultralytics.data.utils import exif_size

    with Image.open(path) as im:
        return exif_size(im)


def load_truth(image_files, root, sidecars: str = contract.SIDECARS, single_cls: bool = False) -> list[ImageTruth]:
    """Ground truth of ``image_files`` from their YOLO labels, sizes and sidecars (the data contract).

    Sizes come from the sidecar (``width``/``height``), else from the image header (EXIF-corrected, as Ultralytics
    reads it). An image without a sidecar has no ignored regions.
    """
    from ultralytics.data.utils import img2label_paths

    image_files = [Path(f) for f in image_files]
    out = []
    for img, lbl in zip(image_files, img2label_paths(image_files)):
        side = contract.read_sidecar(contract.sidecar_path(img, root, sidecars)) or contract.Sidecar()
        if side.width is not None and side.height is not None:
            w, h = side.width, side.height
        else:
            w, h = _image_size(img)
        boxes, cls = contract.read_labels(lbl, w, h)
        out.append(ImageTruth(img, w, h, boxes, cls * 0 if single_cls else cls, side.ignore))
    return out


def split_images(data: dict, split: str) -> list[Path]:
    """Image files of ``data[split]`` (a folder, a .txt list or a list of those), as Ultralytics lists them."""
    from ultralytics.data.utils import IMG_FORMATS

    if not data.get(split):
        raise ValueError(
            f"the data YAML has no '{split}' split (splits: "
            f"{[k for k in ('train', 'val', 'test', 'minival') if data.get(k)]})"
        )
    entries = data[split] if isinstance(data[split], (list, tuple)) else [data[split]]
    files = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS]
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    f = Path(line.strip())
                    files.append(f if f.is_absolute() else (p.parent / f))
        else:
            raise FileNotFoundError(f"split '{split}': {p} is neither a folder of images nor a .txt list")
    return sorted(files)


def load_eval_truth(image_files, root, sidecars: str = contract.SIDECARS, single_cls: bool = False, tiles=True):
    """Ground truth of a split for evaluation: tiles (when ``tiles``) are replaced by their original images.

    The tile's offset and original image come from its sidecar's ``tile`` (:class:`~so_det_ultra.data.contract.
    TileOrigin`), the original image's objects and ignored regions from its own sidecar beside the tiles'.

    Args:
        image_files: The split's images (tiles and/or full images).
        root: Dataset root (``path`` of the data YAML).
        sidecars: Sidecar folder under ``root``.
        single_cls: Every class becomes class 0.
        tiles: Map tiles to their original images; when False every image is evaluated as itself.

    Returns:
        An :class:`EvalTruth`.
    """
    out, plain, parents, offsets = EvalTruth(), [], {}, {}
    for img in map(Path, image_files):
        side = contract.read_sidecar(contract.sidecar_path(img, root, sidecars)) if tiles else None
        if side is None or side.tile is None:
            plain.append(img)
            continue
        parent = img.parent / side.tile.source
        if parent not in parents:
            parents[parent] = _parent_truth(parent, img, root, sidecars, single_cls)
        out.n_tiles += 1
        for k in image_names(img):
            offsets[k] = (parent, side.tile.x, side.tile.y)
    out.images = load_truth(plain, root, sidecars, single_cls) + list(parents.values())
    index = {t.file: i for i, t in enumerate(out.images)}
    out.tiles = {k: (index[p], x0, y0) for k, (p, x0, y0) in offsets.items()}
    return out


def _parent_truth(parent: Path, tile: Path, root, sidecars: str, single_cls: bool) -> ImageTruth:
    """The original image's ground truth from its sidecar (objects and ignored regions in its pixels)."""
    path = contract.sidecar_path(parent, root, sidecars)
    side = contract.read_sidecar(path)
    if side is None or side.width is None or side.height is None:
        raise ValueError(
            f"tile {tile.name} comes from {parent.name}, but {path} (its objects and size) is missing or has no "
            "width/height; convert the split again with 'so-det convert soda-d' (docs/datasets.md)"
        )
    boxes, cls = side.object_arrays()
    ig_boxes, ig_cls = contract.Sidecar(objects=side.ignored_objects).object_arrays()
    return ImageTruth(
        parent, side.width, side.height, boxes, cls * 0 if single_cls else cls, side.ignore,
        ig_boxes, ig_cls * 0 if single_cls else ig_cls,
    )  # fmt: skip
