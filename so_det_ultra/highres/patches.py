"""ESOD's patches as sparse inference runs them: the slicer's corners (:mod:`so_det_ultra.nn.slicer`) and the crops.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3
("AdaSlicer"); official code github alibaba/esod ``models/common.py`` ``HeatMapParser.ada_slicer_fast``;
docs/highres.md. Which patches a heatmap gives (centres, the ``w/8 x h/8`` grid, the margin shift, pruning) is
:mod:`so_det_ultra.nn.slicer`, re-exported here, so that seeker fitting (``so_det_ultra.training``, which does not
import this package) picks exactly the patches sparse inference runs. This module adds :class:`Patch` and
:func:`make_patches`: each patch's core and the crop (core plus context margin) the network sees.

Everything here is in units of heatmap cells and works on one frame. A cell is the seeker's stride in input pixels:
:class:`~so_det_ultra.highres.sparse.SparseModel` measures it from the model (``SparseModel.cell``);
:data:`so_det_ultra.nn.esod.SEEKER_STRIDE` (8, backbone P3) is the value for the shipped YAMLs.
"""

from __future__ import annotations

from dataclasses import dataclass

from so_det_ultra.nn.slicer import (  # noqa: F401 (re-exported: the selection sparse inference uses)
    SHIFTS,
    THRESHOLD,
    _pair,
    find_centres,
    official_patch,
    patch_cores,
    select_patches,
)


@dataclass(frozen=True)
class Patch:
    """A patch in heatmap cells: ``core`` (y0, x0, y1, x1) is what it answers for, ``crop`` what the network sees."""

    core: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]


def make_patches(corners, shape, patch: int | tuple[int, int], margin: int = 0, align: int = 2) -> list[Patch]:
    """:class:`Patch` objects for top-left ``corners``: core ``patch`` cells (int or (h, w)), crop widened by
    ``margin`` cells.

    Every crop has the same size, ``patch + 2 * margin`` (at most the frame), so the patches can be batched: near a
    border the crop slides inward instead of shrinking. ``shape`` is the heatmap's (H, W). A ``margin`` that is not a
    multiple of ``align`` is rounded up to one (a stride-32 model's crops start on its 4-cell grid: the default 2
    cells become 4), so the crops stay aligned with the deepest feature grid.
    """
    h, w = shape
    ph, pw = _pair(patch)
    margin = -(-margin // align) * align
    ch, cw = min(ph + 2 * margin, h // align * align), min(pw + 2 * margin, w // align * align)
    out = []
    for core in patch_cores(corners, shape, (ph, pw)):
        cy0, cx0 = _slide(core[0] - margin, ch, h, align), _slide(core[1] - margin, cw, w, align)
        out.append(Patch(core, (cy0, cx0, cy0 + ch, cx0 + cw)))
    return out


def _slide(v, size, limit, align):
    return min(max(v, 0), (limit - size) // align * align)
