"""Tiled evaluation: detections on tiles moved to their original image, merged, and scored there (SODA-D protocol).

Source: github.com/shaunyuan22/SODA-mmdetection, ``mmdet/datasets/sodad.py``: ``SODADDataset.merge_dets`` adds each
patch's ``start_coord`` to its detections (``translate``) and collects them per original image (``ori_id``);
``_merge_func`` runs NMS per class (``mmcv.ops.nms``, IoU ``nms_iou_thr=0.5`` set in ``evaluate``) over the union;
``evaluate`` then scores the merged detections against the original images' annotations (``ori_ann_file``,
``val_wo_ignore.json``). Here the patch offset and the original image come from the tile sidecar's ``tile`` entry
(``{source, x, y}``, written by :mod:`so_det_ultra.data.soda`) and the original image's objects and ignored regions
from its own sidecar beside the tiles' (the data contract, docs/datasets.md).

Interpretations:

- NMS is ``torchvision.ops.nms`` per class in float32: the same greedy rule as ``mmcv.ops.nms`` with its default
  ``offset=0`` (a box is suppressed when its IoU with a kept, higher-scoring box is above the threshold).
- Rows that name an original image directly (already merged elsewhere, e.g. by :func:`so_det_ultra.highres.sliced`)
  are kept as they are; only rows naming a tile are moved and merged.
- The original images evaluated are those named by the split's tiles (the converter writes every tile of an
  evaluation split, so every original image has tiles), plus the split's full images, if any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from so_det_ultra.data import contract
from so_det_ultra.metrics.coco import ImageTruth, load_truth


@dataclass
class EvalTruth:
    """The images a split is scored on, and how its tile images map onto them.

    Attributes:
        images: One :class:`~so_det_ultra.metrics.coco.ImageTruth` per evaluated image: full images of the split and
            the original images of its tiles.
        tiles: ``{key: (index into images, x0, y0)}`` for each tile image, keyed by every name a prediction row may
            use for it (file name, stem, Ultralytics' ``int(stem)`` for numeric stems).
        n_tiles: Number of tile images in the split.
    """

    images: list = field(default_factory=list)
    tiles: dict = field(default_factory=dict)
    n_tiles: int = 0


def _keys(path: Path) -> list[str]:
    stem = path.stem
    return [path.name, stem, *([str(int(stem))] if stem.isnumeric() else [])]


def load_eval_truth(image_files, root, sidecars: str = contract.SIDECARS, single_cls: bool = False, tiles=True):
    """Ground truth of a split for evaluation: tiles (when ``tiles``) are replaced by their original images.

    Args:
        image_files: The split's images (tiles and/or full images).
        root: Dataset root (``path`` of the data YAML).
        sidecars: Sidecar folder under ``root``.
        single_cls: Every class becomes class 0.
        tiles: Map tiles to their original images; when False every image is evaluated as itself.

    Returns:
        An :class:`EvalTruth`.
    """
    image_files = [Path(f) for f in image_files]
    out, plain, parents = EvalTruth(), [], {}
    for img in image_files:
        side = contract.read_sidecar(contract.sidecar_path(img, root, sidecars)) if tiles else None
        if side is None or not side.tile:
            plain.append(img)
            continue
        try:
            source, x0, y0 = str(side.tile["source"]), float(side.tile["x"]), float(side.tile["y"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{img}: its sidecar's 'tile' must be {{source, x, y}}, got {side.tile!r}") from err
        parent = img.parent / source
        if parent not in parents:
            parents[parent] = _parent_truth(parent, img, root, sidecars, single_cls)
        out.n_tiles += 1
        for k in _keys(img):
            out.tiles[k] = (parent, x0, y0)
    out.images = load_truth(plain, root, sidecars, single_cls) + list(parents.values())
    index = {t.file: i for i, t in enumerate(out.images)}
    out.tiles = {k: (index[p], x0, y0) for k, (p, x0, y0) in out.tiles.items()}
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
    try:
        boxes = np.asarray([o["box"] for o in side.objects], dtype=np.float64).reshape(-1, 4)
        cls = np.asarray([int(o["cls"]) for o in side.objects], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: every object needs 'cls' and 'box' [x1, y1, x2, y2] ({err})") from err
    return ImageTruth(parent, side.width, side.height, boxes, cls * 0 if single_cls else cls, side.ignore)


def to_originals(predictions, truth: EvalTruth, merge_iou: float = 0.5) -> tuple[list, dict]:
    """Move tile prediction rows to their original images and merge them there with class-wise NMS.

    Args:
        predictions: COCO result rows (``image_id``/``file_name``, ``category_id``, ``bbox`` xywh, ``score``).
        truth: The split's :class:`EvalTruth`.
        merge_iou: NMS IoU threshold (official 0.5).

    Returns:
        ``(rows, counts)``: rows naming evaluated images (tile rows moved and merged, other rows unchanged) and
        ``{"tiles": tile images, "det_tiles": rows that named a tile, "det_merged": rows the merge removed}``.
    """
    counts = {"tiles": truth.n_tiles, "det_tiles": 0, "det_merged": 0}
    if not truth.tiles:
        return list(predictions), counts
    rows, moved = [], {}
    for d in predictions:
        hit = truth.tiles.get(str(d.get("file_name"))) if "file_name" in d else None
        hit = truth.tiles.get(str(d.get("image_id"))) if hit is None else hit
        if hit is None:
            rows.append(d)
            continue
        i, x0, y0 = hit
        x, y, w, h = (float(v) for v in d["bbox"])
        moved.setdefault(i, []).append((x + x0, y + y0, x + x0 + w, y + y0 + h, float(d["score"]), d["category_id"]))
    for i, dets in moved.items():
        counts["det_tiles"] += len(dets)
        name, kept = truth.images[i].file.name, merge(dets, merge_iou)
        counts["det_merged"] += len(dets) - len(kept)
        for x1, y1, x2, y2, s, c in kept:
            rows.append({"image_id": Path(name).stem, "file_name": name, "category_id": c,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})  # fmt: skip
    return rows, counts


def merge(dets: list, iou: float) -> list:
    """Class-wise NMS of ``(x1, y1, x2, y2, score, category)`` tuples; the kept ones, best first."""
    import torch
    from torchvision.ops import batched_nms

    a = torch.tensor([d[:5] for d in dets], dtype=torch.float32).reshape(-1, 5)
    cats = [d[5] for d in dets]
    index = {c: k for k, c in enumerate(dict.fromkeys(cats))}  # category ids (any hashable) -> batched_nms groups
    keep = batched_nms(a[:, :4], a[:, 4], torch.tensor([index[c] for c in cats]), iou).tolist()
    return [(*map(float, a[j].tolist()), cats[j]) for j in keep]


def evaluate_split(truth: EvalTruth, predictions, protocol, names=None):
    """:func:`~so_det_ultra.metrics.coco.evaluate` on ``truth.images`` after :func:`to_originals`.

    The result's ``counts`` add ``tiles``, ``det_tiles`` and ``det_merged``.
    """
    from so_det_ultra.metrics.coco import evaluate

    rows, counts = to_originals(predictions, truth, protocol.merge_iou)
    result = evaluate(truth.images, rows, protocol, names)
    result.counts.update(counts)
    return result
