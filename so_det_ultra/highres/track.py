"""Multi-object tracking of the high-resolution predictors' detections with Ultralytics' own trackers.

``yolo track`` wires its trackers into Ultralytics' predictor through callbacks (``ultralytics/trackers/track.py``,
``on_predict_postprocess_end``); the sparse and sliced predictors are not that predictor, so this module feeds each
frame's ``Results`` to the tracker the same way that callback does: ``tracker.update(result.boxes.cpu().numpy(),
frame)``, then keeps the tracked boxes with their ids. The trackers are Ultralytics' ByteTrack (Zhang et al.,
"ByteTrack: Multi-Object Tracking by Associating Every Detection Box", ECCV 2022) and BoT-SORT (Aharonov et al.,
"BoT-SORT: Robust Associations Multi-Pedestrian Tracking", arXiv:2206.14651), configured by their YAMLs
(``ultralytics/cfg/trackers/bytetrack.yaml``, ``botsort.yaml``) or a copy of them.

Track association uses the ``lap`` package (``ultralytics/trackers/utils/matching.py``), a dependency of
so-det-ultra so that tracking runs offline.
"""

from __future__ import annotations

from inspect import signature

import numpy as np

SUPPORTED = ("bytetrack", "botsort")  # tracker types that need nothing but boxes and the frame (no ReID model)


def make_tracker(config: str = "bytetrack.yaml", frame_rate: float = 30.0):
    """A fresh Ultralytics tracker (track ids from 1) built from a tracker YAML (a bare name is Ultralytics' own).

    Raises:
        ValueError: The YAML names a tracker other than ByteTrack or BoT-SORT, or asks for a ReID model.
    """
    from ultralytics.trackers.track import TRACKER_MAP
    from ultralytics.utils import YAML, IterableSimpleNamespace
    from ultralytics.utils.checks import check_yaml

    cfg = IterableSimpleNamespace(**YAML.load(check_yaml(config)))
    kind = getattr(cfg, "tracker_type", None)
    if kind not in SUPPORTED:
        raise ValueError(
            f"--tracker {config}: tracker_type {kind!r} is not supported; use bytetrack.yaml or botsort.yaml"
        )
    if getattr(cfg, "with_reid", False):
        raise ValueError(f"--tracker {config}: with_reid needs a ReID model, which so-det predict does not run")
    cls = TRACKER_MAP[kind]
    rate = {"frame_rate": max(int(round(frame_rate)), 1)} if "frame_rate" in signature(cls).parameters else {}
    tracker = cls(args=cfg, **rate)  # older Ultralytics scale track_buffer by frame_rate / 30
    tracker.reset()  # ids start at 1 for every video
    return tracker


def update(tracker, result) -> tuple[object, np.ndarray]:
    """Feed one frame's detections to ``tracker``.

    Returns:
        (Results, np.ndarray): The frame's tracked boxes (a ``Results`` whose boxes carry track ids, as ``yolo
            track`` returns them) and the tracker's rows ``x1, y1, x2, y2, id, score, cls, idx``.
    """
    import torch

    tracks = tracker.update(result.boxes.cpu().numpy(), result.orig_img)
    if len(tracks) == 0:
        return result[:0], np.zeros((0, 8))
    tracked = result[tracks[:, -1].astype(int)]
    tracked.update(boxes=torch.as_tensor(tracks[:, :-1], dtype=torch.float32))
    return tracked, tracks
