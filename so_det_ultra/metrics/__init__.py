"""Small-object evaluation: COCO-style AP by object size with ignored regions (docs/metrics.md).

- :mod:`.coco`: protocols (VisDrone, SODA-D), ground truth from a YOLO dataset + sidecars, :func:`evaluate`.
- :mod:`.ignore`: the VisDrone toolkit's ignored-region rule.
- :mod:`.hooks`: Ultralytics callbacks (``yolo val``/``yolo train`` on a data YAML with a ``so_det:`` key).
- :mod:`.plots`: AP-by-size (and per-class) PNG.
- :mod:`.cli`: ``so-det eval``.
"""

from so_det_ultra.metrics.coco import PROTOCOLS, ImageTruth, Protocol, Result, evaluate, evaluate_dataset

__all__ = ["PROTOCOLS", "ImageTruth", "Protocol", "Result", "evaluate", "evaluate_dataset"]
