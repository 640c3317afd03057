"""Small-object evaluation: COCO-style AP by object size with ignored regions (docs/metrics.md).

Owns: the evaluation protocols, ground truth from a converted dataset, scoring, the Ultralytics validation callbacks
and ``so-det eval``. Reads files only through :mod:`so_det_ultra.data.contract`. One role per module:

- :mod:`.protocol`: protocols (VisDrone, SODA-D) and the ``so_det:`` key that picks one.
- :mod:`.truth`: ground truth of a split from labels + sidecars; tiles mapped onto their original images.
- :mod:`.predictions`: ``predictions.json`` checked and grouped per image.
- :mod:`.tiles`: tile detections moved to their original image and merged.
- :mod:`.evaluate`: AP by size (faster-coco-eval's COCOeval), :class:`Result`.
- :mod:`.ignore`: the VisDrone toolkit's ignored-region rule.
- :mod:`.hooks`: Ultralytics callbacks (``yolo val``/``yolo train`` on a data YAML with a ``so_det:`` key).
- :mod:`.plots`: AP-by-size (and per-class) PNG. :mod:`.cli`: ``so-det eval``.
"""

from so_det_ultra.metrics.evaluate import Result, evaluate, evaluate_dataset, evaluate_split
from so_det_ultra.metrics.predictions import load_predictions
from so_det_ultra.metrics.protocol import PROTOCOLS, Protocol, protocol_from_data
from so_det_ultra.metrics.truth import EvalTruth, ImageTruth, load_eval_truth

__all__ = [
    "PROTOCOLS",
    "EvalTruth",
    "ImageTruth",
    "Protocol",
    "Result",
    "evaluate",
    "evaluate_dataset",
    "evaluate_split",
    "load_eval_truth",
    "load_predictions",
    "protocol_from_data",
]
