"""High-resolution inference: ESOD sparse (seeker-guided patches) and sliced (tiled) prediction.

- :func:`sparse_predict` / :class:`SparseModel` (:mod:`.sparse`), patch selection in :mod:`.patches`;
- :func:`sliced_predict` (:mod:`.sliced`);
- shared helpers (loading, letterbox, NMS/NMM merging, ``Results``) in :mod:`.common`.

Both predictors return one Ultralytics ``Results`` per image. See docs/highres.md.

Owns: high-resolution inference (ESOD's patch training is in :mod:`so_det_ultra.training`); ``so-det predict``
(:mod:`.cli`), a dense baseline (:mod:`.dense`). May import: torch, Ultralytics, OpenCV, :mod:`so_det_ultra.nn`
(the ObjectSeeker) and :mod:`so_det_ultra.data` (the tile grid, image suffixes). The names below load on first use,
so importing :mod:`.cli` costs no torch.
"""


def __getattr__(name: str):
    """Load the predictors (they import torch) on first use, so ``so_det_ultra.highres.cli`` stays cheap (PEP 562)."""
    if name not in __all__:  # also keeps the submodule imports below from recursing into this function
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from so_det_ultra.highres import patches, sliced, sparse

    return next(getattr(m, name) for m in (patches, sliced, sparse) if hasattr(m, name))


__all__ = (
    "Patch",
    "SparseModel",
    "find_centres",
    "make_patches",
    "select_patches",
    "sliced_predict",
    "sparse_predict",
    "tile_windows",
)
