"""Held-out seeker recall, and the heatmap threshold chosen from it.

Seeker recall is the share of objects whose centre lies in the core of a patch that sparse inference selects from
the heatmap, with the same selection code (:mod:`so_det_ultra.nn.slicer`: ESOD's AdaSlicer, Liu et al., IEEE TIP
2024, sec. 3; github alibaba/esod ``models/common.py`` ``HeatMapParser``). The rule that turns it into a threshold
(scan upwards, stop at the first drop below the target) is ours: an interpretation, docs/highres.md.
"""

from __future__ import annotations

import numpy as np

from so_det_ultra.nn.slicer import official_patch, patch_cores, select_patches

GRID = 0.01  # threshold step of choose_threshold


def seeker_recall(prob, centres, thr: float, patch=None, align: int = 1, prune: bool = True) -> tuple[int, int, int]:
    """``(covered, total, patches)`` for one frame: objects whose centre (``centres`` (N, 2) y, x in heatmap cells)
    lies in the core of a patch that sparse inference selects from heatmap ``prob`` (H, W) at ``thr``
    (:func:`~so_det_ultra.nn.slicer.select_patches` with the same ``patch``, ``align`` and ``prune``; ``patch`` None
    is ESOD's ``w/8 x h/8`` cells), and the number of those patches."""
    p = patch or official_patch(tuple(prob.shape), align)
    cores = patch_cores(select_patches(prob, thr, p, align, prune), tuple(prob.shape), p)
    inside = np.zeros(len(centres), bool)
    for y0, x0, y1, x1 in cores:
        inside |= (centres[:, 0] >= y0) & (centres[:, 0] < y1) & (centres[:, 1] >= x0) & (centres[:, 1] < x1)
    return int(inside.sum()), len(centres), len(cores)


def recall_at(frames, thr: float, **slicer) -> tuple[float, float]:
    """Held-out seeker recall and mean patches per frame at ``thr`` over ``frames`` ((prob, centres) pairs)."""
    got = [seeker_recall(prob, c, thr, **slicer) for prob, c in frames]
    total = sum(t for _, t, _ in got)
    return sum(c for c, _, _ in got) / max(total, 1), float(np.mean([p for _, _, p in got])) if got else 0.0


def choose_threshold(frames, target: float = 0.98, step: float = GRID, **slicer) -> tuple[float, list]:
    """The heatmap threshold that keeps seeker recall >= ``target`` on ``frames`` ((prob, centres) pairs).

    Rule (ours): scan thresholds ``step, 2 * step, ...`` upwards and keep the last one before recall first drops
    below ``target`` (recall is not monotonic in the threshold, since patches move with the activity, so the scan
    stops at the first drop rather than taking the highest passing one). When even the lowest misses the target,
    the lowest is returned. Returns the threshold and the scanned ``(thr, recall, patches per frame)`` rows.
    """
    rows, best = [], step
    for k in range(1, int(round(1 / step))):
        thr = round(k * step, 6)
        rec, n = recall_at(frames, thr, **slicer)
        rows.append((thr, rec, n))
        if rec < target:
            break
        best = thr
    return best, rows


def object_centres(boxes: np.ndarray, cell: int, keep: np.ndarray | None = None) -> np.ndarray:
    """(N, 2) y, x heatmap cells (fractional) of the centres of input-pixel xyxy ``boxes`` (those in ``keep``)."""
    b = boxes if keep is None else boxes[keep]
    return np.stack(((b[:, 1] + b[:, 3]) / 2 / cell, (b[:, 0] + b[:, 2]) / 2 / cell), 1).reshape(-1, 2)
