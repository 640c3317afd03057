"""Tile merging (SODA-D protocol): detections on tiles moved to their original image and merged with class-wise NMS.

Source: github.com/shaunyuan22/SODA-mmdetection, ``mmdet/datasets/sodad.py``: ``SODADDataset.merge_dets`` adds each
patch's ``start_coord`` to its detections (``translate``) and collects them per original image (``ori_id``);
``_merge_func`` runs NMS per class (``mmcv.ops.nms``, IoU ``nms_iou_thr=0.5`` set in ``evaluate``) over the union.
Which tile lies where comes from :class:`~so_det_ultra.metrics.truth.EvalTruth`.

Interpretations (docs/metrics.md):

- The merge is one ``torchvision.ops.batched_nms`` call in float32, grouped by class: the same greedy rule as
  ``mmcv.ops.nms`` per class with its default ``offset=0`` (a box is suppressed when its IoU with a kept,
  higher-scoring box of its class is above the threshold).
- Rows that name an original image directly (already merged elsewhere, e.g. by :func:`so_det_ultra.highres.sliced`)
  are kept as they are; only rows naming a tile are moved and merged.
"""

from __future__ import annotations

from pathlib import Path


def to_originals(predictions, truth, merge_iou: float = 0.5) -> tuple[list, dict]:
    """Move tile prediction rows to their original images and merge them there with class-wise NMS.

    Args:
        predictions: COCO result rows (``image_id``/``file_name``, ``category_id``, ``bbox`` xywh, ``score``).
        truth: The split's :class:`~so_det_ultra.metrics.truth.EvalTruth`.
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
