"""Patches as network runs: which crops sparse inference feeds the rest of the network, and in what batches.

ESOD (Liu et al., IEEE TIP 2024, sec. 3; github alibaba/esod) runs the layers after the seeker on one crop per patch.
Merging overlapping crops into one run where that adds no work, and rounding merged crops up to a few bucket shapes
so that ONNX Runtime, OpenVINO and TensorRT reuse their plans, are ours (interpretations: they change only the
context a core's predictions see beyond its margin). :mod:`.sparse` runs the plan.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import torch

BUCKET = 4  # merged runs are rounded up to multiples of this many cells (32 px at so-det-esod's 8-px cells)


class Run(NamedTuple):
    """One network input: a crop (y0, x0, y1, x1 cells) and the patch cores whose predictions it gives."""

    crop: tuple
    cores: tuple


def _area(b) -> int:
    return (b[2] - b[0]) * (b[3] - b[1])


def _fit(box, bucket: int, shape, align: int) -> tuple:
    """``box`` (y0, x0, y1, x1 cells) grown to sides that are multiples of ``bucket`` (at most the frame's), with
    frame context: it grows down and right, and slides back inside the frame (corners stay on ``align``)."""
    if bucket <= 1 or shape is None:
        return tuple(box)
    out = []
    for lo, hi, limit in ((box[0], box[2], shape[0]), (box[1], box[3], shape[1])):
        side = min(math.ceil((hi - lo) / bucket) * bucket, limit // align * align)
        start = min(lo, (limit - side) // align * align)
        out.append((start, start + side))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def merge_crops(patches, max_grow: int = 4, bucket: int = 1, shape=None, align: int = 2) -> list:
    """Patches as network runs, overlapping crops merged: two crops become their bounding box when the box (rounded
    up to ``bucket`` cells, :func:`_fit`; needs the heatmap ``shape``) is no larger than the two crops' areas together
    (so no work is added, and the overlap is computed once) and at most ``max_grow`` times the largest patch crop
    (bounding global layers such as C2PSA's attention, which cost more per cell on larger inputs). Boxes of aligned
    crops stay aligned, so predictions stay those of the dense model (for a receptive field within the margin)."""
    runs = [Run(p.crop, (p.core,)) for p in patches]
    limit = max_grow * max((_area(p.crop) for p in patches), default=0)
    merged = True
    while merged:
        merged = False
        for i, j in itertools.combinations(range(len(runs)), 2):
            a, b = runs[i].crop, runs[j].crop
            box = _fit((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])), bucket, shape, align)
            if _area(box) <= min(_area(a) + _area(b), limit):
                runs[i], merged = Run(box, runs[i].cores + runs[j].cores), True
                del runs[j]
                break
    return runs


def plan_runs(patches, shape, merge: bool = True, bucket: int = BUCKET, align: int = 2) -> list:
    """The network runs for ``patches`` on a heatmap of ``shape`` cells: one crop per patch (all of one size,
    :func:`~so_det_ultra.highres.patches.make_patches`), or with ``merge`` overlapping crops merged where that adds no
    work (:func:`merge_crops`), merged crops rounded up to multiples of ``bucket`` cells, so that a few input shapes
    recur and ONNX Runtime, OpenVINO and TensorRT reuse their plans for them."""
    if not merge:
        return [Run(p.crop, (p.core,)) for p in patches]
    return merge_crops(patches, bucket=bucket, shape=shape, align=align)


def crop(t, f: int, runs):
    """The crops of ``runs`` (in heatmap cells) from a stem output (torch or NumPy) with ``f`` map cells per heatmap
    cell, as one batch."""
    parts = [t[..., r.crop[0] * f : r.crop[2] * f, r.crop[1] * f : r.crop[3] * f] for r in runs]
    if isinstance(t, torch.Tensor):
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # one crop: a view, no copy
    return np.ascontiguousarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)


def placement(runs, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Each run's crop origin (B, 2) x, y in frame pixels and its ``keep`` mask (B, 1, h, w): 1 on its cores."""
    h, w = runs[0].crop[2] - runs[0].crop[0], runs[0].crop[3] - runs[0].crop[1]
    origin = np.array([(r.crop[1] * cell, r.crop[0] * cell) for r in runs], np.float32)
    keep = np.zeros((len(runs), 1, h, w), np.float32)
    for k, r in enumerate(runs):
        for y0, x0, y1, x1 in r.cores:
            keep[k, 0, y0 - r.crop[0] : y1 - r.crop[0], x0 - r.crop[1] : x1 - r.crop[1]] = 1
    return origin, keep


def batches(runs, batch: int) -> list:
    """``runs`` grouped by crop shape, at most ``batch`` per group, in a fixed order."""
    groups = {}
    for r in runs:
        groups.setdefault((r.crop[2] - r.crop[0], r.crop[3] - r.crop[1]), []).append(r)
    return [same[i : i + batch] for same in groups.values() for i in range(0, len(same), batch)]
