"""ESOD's adaptive slicer (AdaSlicer): from an objectness heatmap to the top-left corners of a few fixed-size patches.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3
("AdaSlicer"); official code github alibaba/esod ``models/common.py`` ``HeatMapParser.ada_slicer_fast`` (lines
459-509); docs/highres.md. Centres are heatmap cells >= a threshold (0.3) that are 3x3 local maxima; the map is cut
into a grid of ``w/8 x h/8``-cell patches (each side rounded up to a multiple of 4 cells); only grid cells holding a
centre are kept, each shifted by the larger of its two empty margins (the columns, then the rows, without an
activated cell on either side) and clamped to the frame.

Pure tensor code on one frame, in units of heatmap cells (a cell is the seeker's stride in input pixels, 8 for the
shipped models). It lives below both of its users, which must pick the same patches: sparse inference
(:mod:`so_det_ultra.highres.patches` re-exports it and adds the crops the network sees) and the seeker fitting that
chooses the heatmap threshold from held-out recall (:mod:`so_det_ultra.training.seeker`).

Options (the official reading is the default):
    - ``shift="margin"`` (official) or ``"centre"`` (ours before: the patch centred on the bounding box of the cells
      >= ``thr`` in its grid cell widened by half a patch, or in the grid cell alone when that box is wider than a
      patch);
    - patch corners are rounded down to multiples of ``align`` cells (the model's largest stride / the cell), so the
      deeper feature grids of a patch line up with those of the full frame and sparse predictions equal dense ones;
    - two grid cells whose shifted patches land on the same place give one patch (the official keeps both);
    - ``prune`` (default on, ours): a patch none of whose active cells is outside the other kept cores is dropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

THRESHOLD = 0.3  # official heatmap threshold (HeatMapParser, ada_slicer_fast(threshold=0.3); Detect.get_indices)
SHIFTS = ("margin", "centre")


def find_centres(prob: torch.Tensor, thr: float = 0.5) -> torch.Tensor:
    """(K, 2) integer (y, x) cells of ``prob`` (H, W) that are >= ``thr`` and maxima of their 3x3 neighbourhood."""
    peak = F.max_pool2d(prob[None, None], 3, 1, 1)[0, 0]
    return torch.nonzero((prob >= thr) & (prob == peak))


def official_patch(shape: tuple[int, int], align: int = 2, ratio: int = 8) -> tuple[int, int]:
    """ESOD's patch (h, w) in cells for a (H, W) heatmap: ``make_divisible(side / ratio, 4)`` per side (official
    ``ada_slicer_fast``), then rounded up to ``align``.

    Example:
        >>> official_patch((135, 240))
        (20, 32)
    """

    def side(n):
        c = math.ceil(n / ratio / 4) * 4
        return min(math.ceil(c / align) * align, max(n // align * align, align))

    return side(shape[0]), side(shape[1])


def _pair(patch) -> tuple[int, int]:
    return (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))


def select_patches(
    prob: torch.Tensor,
    thr: float = THRESHOLD,
    patch: int | tuple[int, int] = 24,
    align: int = 2,
    prune: bool = True,
    shift: str = "margin",
) -> list[tuple[int, int]]:
    """Top-left (y0, x0) cells of the kept patches (``patch`` cells, an int for squares or (h, w)), sorted, for a
    heatmap ``prob`` (H, W) of probabilities in [0, 1].

    ``shift`` places a grid cell's patch: ``margin`` (official) or ``centre`` (see the module docstring). With
    ``prune`` (ours, not in the paper), a patch whose active cells all lie in the cores of the other kept patches is
    dropped (largest patches by active cells kept first), since the predictions for those cells come from the other
    patches anyway.

    Example:
        >>> heat = torch.zeros(60, 90); heat[30, 40] = 0.9
        >>> select_patches(heat, patch=24), select_patches(heat, patch=24, shift="centre")
        ([(30, 40)], [(18, 28)])
    """
    ph, pw = _pair(patch)
    if ph % align or pw % align:
        raise ValueError(f"patch ({ph}x{pw} cells) must be a multiple of align ({align} cells)")
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
    h, w = prob.shape
    active = prob >= thr
    kept = set()
    for gy, gx in {(int(y) // ph, int(x) // pw) for y, x in find_centres(prob, thr)}:
        if shift == "margin":
            y0, x0 = _shift_by_margin(active, gy * ph, gx * pw, (ph, pw), align)
        else:
            y0, x0 = _centre_on_activity(active, gy * ph, gx * pw, max(ph, pw))
        kept.add((_clamp(y0, h, ph, align), _clamp(x0, w, pw, align)))
    return sorted(_prune(active, kept, (ph, pw)) if prune else kept)


def _shift_by_margin(active, y0, x0, size, align=1):
    """Official ``ada_slicer_fast``: the grid cell's patch moved by the larger of its empty margins, per axis.

    ``dx1`` = empty columns on the left (move right), ``dx2`` = minus the empty columns on the right (move left);
    ``dx = dx1 if |dx1| > |dx2| else dx2``; the same for rows. The shift is rounded toward zero to ``align`` cells, so
    the active cells stay inside the patch.
    """
    ph, pw = size
    cell = active[y0 : y0 + ph, x0 : x0 + pw]
    out = []
    for on, start, n in ((cell.any(1), y0, ph), (cell.any(0), x0, pw)):  # rows, then columns, with an active cell
        idx = on.nonzero().flatten()
        first, last = int(idx[0]), n - 1 - int(idx[-1])  # empty margins before and after (beyond the frame: empty)
        out.append(start + (first // align * align if first > last else -(last // align * align)))
    return out[0], out[1]


def _prune(active, corners, patch):
    """Drop patches that add no active cell to the union of the others' cores (greedy, most active cells first)."""
    ph, pw = _pair(patch)
    area = {c: int(active[c[0] : c[0] + ph, c[1] : c[1] + pw].sum()) for c in corners}
    kept = sorted(corners, key=lambda c: (-area[c], c))
    for c in sorted(kept, key=lambda c: (area[c], c)):  # try the emptiest first
        others = torch.zeros_like(active)
        for o in kept:
            if o != c:
                others[o[0] : o[0] + ph, o[1] : o[1] + pw] = True
        mine = active[c[0] : c[0] + ph, c[1] : c[1] + pw]
        if not (mine & ~others[c[0] : c[0] + ph, c[1] : c[1] + pw]).any():
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


def patch_cores(corners, shape, patch) -> list[tuple[int, int, int, int]]:
    """The core (y0, x0, y1, x1) of each patch at top-left ``corners``, cut at the (H, W) heatmap ``shape``: the cells
    a patch answers for (:class:`so_det_ultra.highres.patches.Patch` ``core``)."""
    h, w = shape
    ph, pw = _pair(patch)
    return [(y0, x0, min(y0 + ph, h), min(x0 + pw, w)) for y0, x0 in corners]
