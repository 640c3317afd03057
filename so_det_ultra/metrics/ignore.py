"""Ignored regions: which boxes lie mostly inside them (VisDrone toolkit rule).

Source: VisDrone2018-DET-toolkit, ``utils/dropObjectsInIgr.m`` (github.com/VisDrone/VisDrone2018-DET-toolkit). The
toolkit paints every ignored region (category 0) into one binary image, and for each ground-truth box and each
detection sums that image over the box with an integral image; a box is dropped when
``covered / (w * h) >= 0.5``, i.e. when at least half of its area lies inside the *union* of the ignored regions.
Both the ground truth and the detections are filtered this way before matching.

Interpretation: the toolkit works on a rounded pixel grid (1-based, inclusive ends, so a region of width w paints
w + 1 columns). Here the covered area is computed exactly in continuous pixel coordinates (x1, y1, x2, y2), so a box
straddling a region border can fall on the other side of the 0.5 line than in the MATLAB code by about one pixel
row or column. The threshold is a parameter (``DROP_FRACTION``).
"""

from __future__ import annotations

import numpy as np

DROP_FRACTION = 0.5  # VisDrone toolkit: a box stays only if less than half of its area is ignored
SLACK = 1e-6  # YOLO labels hold ~6 decimals: a box exactly on the threshold must not flip side on the round trip


def covered_fraction(boxes, regions) -> np.ndarray:
    """Fraction of each box's area that lies inside the union of ``regions``.

    Exact: the region edges cut the plane into a grid of cells, each cell either inside some region or not; a box's
    covered area is the sum of its overlaps with the covered cells (no double counting where regions overlap).

    Args:
        boxes: (N, 4) pixel ``x1, y1, x2, y2``.
        regions: (K, 4) pixel ``x1, y1, x2, y2`` ignored regions.

    Returns:
        (N,) float array in [0, 1]; 0 for boxes of zero area or when there are no regions.

    Example:
        >>> covered_fraction([[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 5, 10], [3, 0, 8, 10]])
        array([0.8, 0. ])
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    regions = np.asarray(regions, dtype=np.float64).reshape(-1, 4)
    out = np.zeros(len(boxes))
    if not len(boxes) or not len(regions):
        return out
    xs, ys = np.unique(regions[:, [0, 2]]), np.unique(regions[:, [1, 3]])  # cell edges
    cx1, cx2, cy1, cy2 = xs[:-1], xs[1:], ys[:-1], ys[1:]
    mx, my = (cx1 + cx2) / 2, (cy1 + cy2) / 2  # cell centres decide coverage
    inside_x = (regions[:, None, 0] <= mx) & (mx <= regions[:, None, 2])  # (K, nx)
    inside_y = (regions[:, None, 1] <= my) & (my <= regions[:, None, 3])  # (K, ny)
    covered = (inside_y[:, :, None] & inside_x[:, None, :]).any(0).astype(np.float64)  # (ny, nx)
    ox = np.clip(np.minimum(boxes[:, 2:3], cx2) - np.maximum(boxes[:, 0:1], cx1), 0, None)  # (N, nx)
    oy = np.clip(np.minimum(boxes[:, 3:4], cy2) - np.maximum(boxes[:, 1:2], cy1), 0, None)  # (N, ny)
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    inter = np.einsum("ni,ij,nj->n", oy, covered, ox)
    np.divide(inter, area, out=out, where=area > 0)
    return out.clip(0.0, 1.0)


def in_ignored(boxes, regions, fraction: float = DROP_FRACTION) -> np.ndarray:
    """Boolean (N,): True for boxes with at least ``fraction`` of their area inside the ignored ``regions``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"ignore fraction must be in (0, 1], got {fraction}")
    return covered_fraction(boxes, regions) >= fraction - SLACK
