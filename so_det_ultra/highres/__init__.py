"""High-resolution inference: ESOD sparse (seeker-guided patches) and sliced (tiled) prediction.

- :func:`sparse_predict` / :class:`SparseModel` (:mod:`.sparse`), patch selection in :mod:`.patches`;
- :func:`sliced_predict` (:mod:`.sliced`);
- shared helpers (loading, letterbox, NMS/NMM merging, ``Results``) in :mod:`.common`.

Both predictors return one Ultralytics ``Results`` per image. See docs/highres.md.
"""

from so_det_ultra.highres.patches import Patch, find_centres, make_patches, select_patches
from so_det_ultra.highres.sliced import sliced_predict, tile_windows
from so_det_ultra.highres.sparse import SparseModel, sparse_predict

__all__ = ("Patch", "SparseModel", "find_centres", "make_patches", "select_patches", "sliced_predict",
           "sparse_predict", "tile_windows")
