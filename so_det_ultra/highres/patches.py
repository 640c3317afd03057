"""ESOD's adaptive patch slicing: from an objectness heatmap to a few fixed-size patches of the frame.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3
("AdaSlicer"; official code github alibaba/esod; docs/highres.md): centres are heatmap cells >= a threshold that are
3x3 local maxima; the seeker's map is cut into a fixed grid of patches; only grid cells holding a centre are kept,
each shifted toward its activated cells and clamped to the frame.

Everything here is in units of heatmap cells and works on one frame. A cell is the seeker's stride in input pixels:
:class:`~so_det_ultra.highres.sparse.SparseModel` measures it from the model (``SparseModel.cell``);
:data:`so_det_ultra.nn.esod.SEEKER_STRIDE` (8, backbone P3) is the value for the shipped YAMLs.

Interpretations (the sources leave these open):
    - "shifted toward its activated cells": the patch is centred on the bounding box of the cells >= ``thr`` that lie
      in its grid cell widened by half a patch on every side (so a cluster straddling a grid line pulls the patch
      over it); when that box is wider than a patch (dense activity), on the active cells of the grid cell alone
      (so a uniformly active area is tiled by the grid itself); then clamped into the frame;
    - patch corners are rounded down to multiples of ``align`` cells (the model's largest stride / the cell), so the
      deeper feature grids of a patch line up with those of the full frame and sparse predictions equal dense ones;
    - two grid cells whose shifted patches land on the same place give one patch;
    - ``prune`` (default on): a patch none of whose active cells is outside the other kept cores is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Patch:
    """A patch in heatmap cells: ``core`` (y0, x0, y1, x1) is what it answers for, ``crop`` what the network sees."""

    core: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]


def find_centres(prob: torch.Tensor, thr: float = 0.5) -> torch.Tensor:
    """(K, 2) integer (y, x) cells of ``prob`` (H, W) that are >= ``thr`` and maxima of their 3x3 neighbourhood."""
    peak = F.max_pool2d(prob[None, None], 3, 1, 1)[0, 0]
    return torch.nonzero((prob >= thr) & (prob == peak))


def select_patches(
    prob: torch.Tensor, thr: float = 0.5, patch: int = 24, align: int = 2, prune: bool = True
) -> list[tuple[int, int]]:
    """Top-left (y0, x0) cells of the kept ``patch`` x ``patch`` patches, sorted, for a heatmap ``prob`` (H, W).

    ``prob`` holds probabilities in [0, 1]. With ``prune`` (ours, not in the paper), a patch whose active cells all lie
    in the cores of the other kept patches is dropped (largest patches by active cells kept first), since the
    predictions for those cells come from the other patches anyway.

    Example:
        >>> heat = torch.zeros(60, 90); heat[30, 40] = 0.9
        >>> select_patches(heat, patch=24)
        [(18, 28)]
    """
    if patch % align:
        raise ValueError(f"patch ({patch} cells) must be a multiple of align ({align} cells)")
    h, w = prob.shape
    active = prob >= thr
    kept = set()
    for gy, gx in {(int(y) // patch, int(x) // patch) for y, x in find_centres(prob, thr)}:
        y0, x0 = _centre_on_activity(active, gy * patch, gx * patch, patch)
        kept.add((_clamp(y0, h, patch, align), _clamp(x0, w, patch, align)))
    return sorted(_prune(active, kept, patch) if prune else kept)


def _prune(active, corners, patch):
    """Drop patches that add no active cell to the union of the others' cores (greedy, most active cells first)."""
    area = {c: int(active[c[0] : c[0] + patch, c[1] : c[1] + patch].sum()) for c in corners}
    kept = sorted(corners, key=lambda c: (-area[c], c))
    for c in sorted(kept, key=lambda c: (area[c], c)):  # try the emptiest first
        others = torch.zeros_like(active)
        for o in kept:
            if o != c:
                others[o[0] : o[0] + patch, o[1] : o[1] + patch] = True
        mine = active[c[0] : c[0] + patch, c[1] : c[1] + patch]
        if not (mine & ~others[c[0] : c[0] + patch, c[1] : c[1] + patch]).any():
            kept.remove(c)
    return kept


def _centre_on_activity(active, y0, x0, patch):
    """Top-left of a patch centred on the activity around grid cell (y0, x0): the bounding box of the active cells in
    the cell widened by half a patch, or, when that box is larger than a patch, of those in the cell itself."""
    half = patch // 2
    for pad in (half, 0):
        oy, ox = max(0, y0 - pad), max(0, x0 - pad)
        ys, xs = torch.nonzero(active[oy : y0 + patch + pad, ox : x0 + patch + pad], as_tuple=True)
        if len(ys) and max(ys.max() - ys.min(), xs.max() - xs.min()) < patch:
            break
    cy = (int(ys.min()) + int(ys.max()) + 1) / 2 + oy
    cx = (int(xs.min()) + int(xs.max()) + 1) / 2 + ox
    return round(cy - patch / 2), round(cx - patch / 2)


def _clamp(v, size, patch, align):
    v = min(max(v, 0), max(size - patch, 0))
    return v // align * align


def make_patches(corners, shape, patch: int, margin: int = 0, align: int = 2) -> list[Patch]:
    """:class:`Patch` objects for top-left ``corners``: core ``patch`` cells wide, crop widened by ``margin`` cells.

    Every crop has the same size, ``patch + 2 * margin`` (at most the frame), so the patches can be batched: near a
    border the crop slides inward instead of shrinking. ``shape`` is the heatmap's (H, W).
    """
    h, w = shape
    if margin % align:
        raise ValueError(f"margin ({margin} cells) must be a multiple of align ({align} cells)")
    ch, cw = min(patch + 2 * margin, h // align * align), min(patch + 2 * margin, w // align * align)
    out = []
    for y0, x0 in corners:
        cy0, cx0 = _slide(y0 - margin, ch, h, align), _slide(x0 - margin, cw, w, align)
        out.append(Patch((y0, x0, min(y0 + patch, h), min(x0 + patch, w)), (cy0, cx0, cy0 + ch, cx0 + cw)))
    return out


def _slide(v, size, limit, align):
    return min(max(v, 0), (limit - size) // align * align)
