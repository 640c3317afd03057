"""Overlapping tiles of a large image: where they start, their windows, and mapping boxes between tile and frame.

One grid serves three uses: the SODA-D converter cuts training images into tiles (:mod:`.soda`), sliced inference
runs the detector on tiles (:mod:`so_det_ultra.highres.sliced`), and a SODA-D style evaluation runs the detector on
the same 800 x 800 / 150 px tiles, resizes each tile to the network input, maps the detections back with
:func:`to_frame` and merges them with class-wise NMS.

Sources:
    - SODA-D protocol: G. Cheng et al., "Towards Large-Scale Small Object Detection: Survey and Benchmarks", TPAMI
      2023 (800 x 800 patches, 150 px overlap), and github.com/shaunyuan22/SODA-mmdetection,
      ``tools/img_split/README.md`` and ``tools/img_split/split_configs/split_train.json`` (``patchH/patchW`` 800,
      ``stepSzH/stepSzW`` 150): :data:`SODA_D_TILE`, :data:`SODA_D_OVERLAP`.
    - SAHI (Akyon et al., ICIP 2022; ``sahi/slicing.py``, ``get_slice_bboxes``): the last row/column is shifted back
      to end on the border, so no tile holds pixels outside the image.

Interpretation: the repository's "stride of 150" (``stepSz``) is read as the paper's 150 px overlap, so the stride is
``tile - overlap``; a side not longer than ``tile`` gives one tile of that side; the
last tile is flush with the border (so it may overlap its neighbour by more than ``overlap``). Pure Python.

Examples:
    >>> from so_det_ultra.data.tiling import tile_starts, tile_windows
    >>> tile_starts(1920, 800, 150)
    [0, 650, 1120]
    >>> tile_windows(900, 1700, 800, 150)[:2]
    [(0, 0, 800, 800), (650, 0, 1450, 800)]
"""

from __future__ import annotations

Window = tuple  # (x0, y0, x1, y1) pixels, x1/y1 exclusive

SODA_D_TILE = 800  # SODA-D tile side, px
SODA_D_OVERLAP = 150  # SODA-D tile overlap, px


def tile_starts(length: int, tile: int = SODA_D_TILE, overlap: int = SODA_D_OVERLAP) -> list[int]:
    """Tile origins along one side of ``length`` px: stride ``tile - overlap``, the last tile flush with the edge.

    Args:
        length (int): Side length in pixels (>= 1).
        tile (int): Tile side in pixels (>= 1).
        overlap (int): Pixels shared by neighbouring tiles, in ``[0, tile)``.

    Returns:
        (list[int]): Sorted, distinct starts; ``[0]`` when ``length <= tile``.
    """
    if tile < 1 or length < 1:
        raise ValueError(f"tile and length must be >= 1, got tile={tile}, length={length}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def tile_windows(height: int, width: int, tile: int = SODA_D_TILE, overlap: int = SODA_D_OVERLAP) -> list[Window]:
    """``(x0, y0, x1, y1)`` windows covering a ``height`` x ``width`` image (``img.shape[:2]`` order), row by row.

    Every window is ``min(tile, height)`` x ``min(tile, width)`` and lies inside the image; ``overlap`` is in pixels.
    """
    th, tw = min(tile, height), min(tile, width)
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


def overlap_pixels(tile: int, ratio: float) -> int:
    """Overlap in pixels for an overlap ``ratio`` of ``tile`` (SAHI's ``overlap_*_ratio``), kept below ``tile``."""
    if tile < 1 or not 0 <= ratio < 1:
        raise ValueError(f"need tile >= 1 and 0 <= overlap ratio < 1, got tile={tile}, ratio={ratio}")
    return min(round(ratio * tile), tile - 1)


def crop(img, window: Window):
    """The pixels of ``window`` in an ``H x W [x C]`` array (a view, not a copy)."""
    x0, y0, x1, y1 = window
    return img[y0:y1, x0:x1]


def to_frame(boxes, window: Window, gain: float = 1.0):
    """Boxes ``(..., >=4)`` xyxy in a tile resized by ``gain`` -> frame pixels (a copy; extra columns kept).

    ``gain`` is network-input pixels per tile pixel (1 for a tile fed at native resolution). Works on numpy arrays
    and torch tensors alike.
    """
    out = boxes.clone() if hasattr(boxes, "clone") else boxes.copy()
    out[..., :4] /= gain
    out[..., [0, 2]] += window[0]
    out[..., [1, 3]] += window[1]
    return out
