"""What ``so-det predict`` writes: COCO result rows, annotated images and videos, YOLO label files, MOT track files.

Every file is written under a temporary name in its own folder and moved into place with :func:`os.replace`, so a
reader (or a rerun after a kill) sees either the old file or the complete new one, never a part. Temporary files are
opened with :func:`open` and so get the permissions of the process' umask (0644 under umask 022).

Formats:
    - COCO detection results (``predictions.json``), as written by ``yolo val save_json=True``
      (``ultralytics/models/yolo/detect/val.py``, ``pred_to_json``): ``image_id`` the image's file stem (a video
      frame: ``<video stem>_<frame index, 6 digits>``), ``category_id`` the class index + 1 (Ultralytics' convention
      for non-COCO datasets, the one ``so-det eval`` reads), ``bbox`` ``[x, y, w, h]`` in pixels, ``score``.
    - MOT Challenge text (Milan et al., "MOT16: A Benchmark for Multi-Object Tracking", arXiv:1603.00831, section
      "Data format"): one line per box, ``frame,id,x,y,w,h,conf,-1,-1,-1``, frames counted from 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _tmp(path: Path) -> Path:
    """A temporary name next to ``path`` that keeps its suffix (OpenCV picks the encoder from it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and :func:`os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=None, separators=(",", ":")) + "\n")


def write_image(path, img: np.ndarray) -> Path:
    """Save a BGR image to ``path`` (format from its suffix) through a temporary file."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        if not cv2.imwrite(str(tmp), img):
            raise OSError(f"cannot write an image to {path} (unknown suffix {path.suffix!r}?)")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def coco_rows(result, image_id: str, file_name: str | None = None) -> list[dict]:
    """COCO detection rows of one Ultralytics ``Results`` (boxes rounded to 3 decimals, scores to 5, as Ultralytics).

    ``file_name`` (an image's file name) is added to each row when given, as ``yolo val save_json=True`` does.
    """
    boxes = result.boxes
    if boxes is None or not len(boxes):
        return []
    xyxy = boxes.xyxy.cpu().double().numpy()
    conf, cls = boxes.conf.cpu().tolist(), boxes.cls.cpu().tolist()
    rows = []
    for (x1, y1, x2, y2), s, c in zip(xyxy.tolist(), conf, cls):
        box = [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]
        row = {"image_id": image_id, "category_id": int(c) + 1, "bbox": box, "score": round(float(s), 5)}
        rows.append(row if file_name is None else {"image_id": image_id, "file_name": file_name, **row})
    return rows


def label_text(result) -> str:
    """YOLO label lines with confidences (``class xc yc w h conf``, normalised), as ``Results.save_txt``."""
    boxes = result.boxes
    if boxes is None or not len(boxes):
        return ""
    lines = []
    for c, conf, xywhn in zip(boxes.cls.tolist(), boxes.conf.tolist(), boxes.xywhn.tolist()):
        lines.append(" ".join([str(int(c)), *(f"{v:.6g}" for v in xywhn), f"{conf:.6g}"]))
    return "\n".join(lines) + "\n"


def mot_lines(frame: int, tracks: np.ndarray) -> list[str]:
    """MOT Challenge lines for one frame from tracker rows ``x1, y1, x2, y2, id, score, ...``; ``frame`` from 1."""
    out = []
    for x1, y1, x2, y2, tid, score in tracks[:, :6].tolist():
        out.append(f"{frame},{int(tid)},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.5f},-1,-1,-1")
    return out


class VideoSink:
    """An annotated video written frame by frame to a temporary file and moved into place by :meth:`commit`.

    Args:
        path: The final ``.mp4`` path (MPEG-4 Part 2, ``mp4v``, which every OpenCV build writes).
        fps (float): Frames per second of the written video.
    """

    def __init__(self, path, fps: float):
        self.path, self.fps = Path(path), float(fps) if fps and fps > 0 else 30.0
        self.tmp, self.writer = _tmp(self.path), None

    def write(self, frame: np.ndarray) -> None:
        import cv2

        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = frame.shape[:2]
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self.writer.isOpened():
                raise OSError(f"cannot write a video to {self.tmp}")
        self.writer.write(frame)

    def commit(self) -> Path | None:
        """Finish the file and move it to ``path``; None when no frame was written."""
        if self.writer is None:
            return None
        self.writer.release()
        self.writer = None
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        self.tmp.unlink(missing_ok=True)
