"""Small-object evaluation: COCO-style AP by object size with ignored regions (docs/metrics.md).

Owns: the evaluation protocols, ground truth from a converted dataset, the Ultralytics validation callbacks and
``so-det eval``. May import: numpy, faster-coco-eval, matplotlib, Ultralytics, and :mod:`so_det_ultra.data.contract`
(layout, sidecars, label rows, size bins: never spelled here); no torch at module level, no model code.

- :mod:`.coco`: protocols (VisDrone, SODA-D), ground truth from a YOLO dataset + sidecars, :func:`evaluate`.
- :mod:`.ignore`: the VisDrone toolkit's ignored-region rule.
- :mod:`.tiles`: tiled evaluation (SODA-D): tile detections moved to their original image, merged, scored there.
- :mod:`.hooks`: Ultralytics callbacks (``yolo val``/``yolo train`` on a data YAML with a ``so_det:`` key).
- :mod:`.plots`: AP-by-size (and per-class) PNG.
- :mod:`.cli`: ``so-det eval``.
"""

from so_det_ultra.metrics.coco import PROTOCOLS, ImageTruth, Protocol, Result, evaluate, evaluate_dataset

__all__ = ["PROTOCOLS", "ImageTruth", "Protocol", "Result", "evaluate", "evaluate_dataset"]
