"""What ``so-det predict`` writes: COCO result rows, annotated images and videos, YOLO label files, MOT track files.

Every file goes through the save folder's :class:`~so_det_ultra.data.ownership.Ownership` (the one ownership model
of every so-det-ultra output folder): written under an exclusive temporary name in its own folder and moved into
place with :func:`os.replace`, so a reader (or a rerun after a kill) sees either the old file or the complete new
one, never a part; a file that replaces an old one is moved in only when its input's outputs are all complete.
Files get the permissions of the process' umask (0644 under umask 022).

Formats:
    - COCO detection results (``predictions.json``), as written by ``yolo val save_json=True``
      (``ultralytics/models/yolo/detect/val.py``, ``pred_to_json``): ``image_id`` the image's file stem (a video
      frame: ``<video stem>_<frame index, 6 digits>``), ``category_id`` the class index + 1 (Ultralytics' convention
      for non-COCO datasets, the one ``so-det eval`` reads), ``bbox`` ``[x, y, w, h]`` in pixels, ``score``.
    - MOT Challenge text (Milan et al., "MOT16: A Benchmark for Multi-Object Tracking", arXiv:1603.00831, section
      "Data format"): one line per box, ``frame,id,x,y,w,h,conf,-1,-1,-1``, frames counted from 1.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np


def write_image(owner, path, img: np.ndarray) -> Path:
    """Save a BGR image to ``path`` (format from its suffix) through ``owner``."""
    import cv2

    path = Path(path)
    ok, buf = cv2.imencode(path.suffix.lower(), img)
    if not ok:
        raise ValueError(f"cannot encode an image as {path.suffix!r} for {path}")
    owner.write_bytes(path, buf.tobytes())
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

    The file is checked before it replaces anything: a video the writer could not finish (a full disk leaves one
    without its index) is discarded with an OS error naming the path, and an earlier video of that name is kept.

    Args:
        owner: The save folder's :class:`~so_det_ultra.data.ownership.Ownership`.
        path: The final ``.mp4`` path (MPEG-4 Part 2, ``mp4v``, which every OpenCV build writes).
        fps (float): Frames per second of the written video (a usable one: :func:`~.sources.usable_fps`).
    """

    def __init__(self, owner, path, fps: float):
        self.owner, self.path, self.fps = owner, Path(path), float(fps)
        self.tmp, self.writer, self.frames = None, None, 0

    def write(self, frame: np.ndarray) -> None:
        import cv2

        if self.writer is None:
            self.tmp = self.owner.temp_for(self.path, keep_suffix=True)
            h, w = frame.shape[:2]
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self.writer.isOpened():
                raise OSError(f"cannot write a video to {self.path} (OpenCV could not open an mp4v writer)")
        self.writer.write(frame)
        self.frames += 1

    def commit(self) -> Path | None:
        """Finish the file, check it and hand it to the owner; None when no frame was written."""
        if self.writer is None:
            return None
        self.writer.release()
        self.writer = None
        if not _complete(self.tmp, self.frames):
            self.discard()
            full = shutil.disk_usage(self.path.parent).free < (1 << 20)
            why = "No space left on device" if full else "the video writer did not finish the file"
            raise OSError(errno.ENOSPC if full else errno.EIO, f"{why}: {str(self.path)!r}")
        self.owner.install(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        if self.tmp is not None:
            self.owner.discard(self.tmp)


def _complete(path: Path, frames: int) -> bool:
    """True when the video at ``path`` opens and holds ``frames`` frames (read from its index, nothing decoded)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        return cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    finally:
        cap.release()
