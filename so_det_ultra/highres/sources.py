"""What ``so-det predict`` reads: image files, folders, globs, ``.txt``/``.csv`` lists, video files and streams.

Files, folders, globs and lists are expanded by Ultralytics' own loader (``LoadImagesAndVideos`` in
``ultralytics/data/loaders.py``, the one ``yolo predict`` uses), so a source means the same here as there. The
expanded list is sorted by path and de-duplicated; each image and each video is one :class:`Input`, the unit that
``--shard`` splits and ``--resume`` skips. Expanding opens no file: a file that is not a regular file (a named pipe, a
device) is left out with a warning, never opened (reading a pipe would wait forever), and an unreadable image or
video is found, skipped and counted when its turn comes, wherever it sorts. Video frames are read by the same
loader (with ``--vid-stride``), streams (a camera index such as ``0``, or an ``rtsp://``/``rtmp://``/``http(s)://``/
``tcp://`` URL) by ``LoadStreams``; a video whose metadata gives no usable frame rate is written at 30 fps, with a
warning.

A video frame's index is its 0-based position in the file, so with ``--vid-stride 2`` the frames read are 1, 3, 5...
(Ultralytics' loader grabs ``vid_stride`` frames and keeps the last).
"""

from __future__ import annotations

import math
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STREAM_SCHEMES = {"rtsp", "rtmp", "http", "https", "tcp", "udp"}
DEFAULT_FPS = 30.0  # a video whose metadata gives no usable frame rate is written at this one
FPS_RANGE = (1.0, 1000.0)  # frame rates outside it are metadata errors


@dataclass(frozen=True)
class Input:
    """One unit of work: an image file, a video file or a stream.

    Attributes:
        path (str): Absolute file path, or the stream's URL / camera index as given.
        kind (str): ``"image"``, ``"video"`` or ``"stream"``.
        name (str): Output file name in the save folder, unique within the job (``a.jpg``, ``clip.mp4``, ``a_1.jpg``
            for a second ``a.jpg`` from another folder).
    """

    path: str
    kind: str
    name: str

    @property
    def stem(self) -> str:
        """The source's file stem, the ``image_id`` prefix of its predictions."""
        return Path(self.name).stem if self.kind == "stream" else Path(self.path).stem


def is_stream(source) -> bool:
    """A camera index (``0``) or a network URL (``rtsp://...``): read live by ``cv2.VideoCapture``."""
    s = str(source)
    return s.isnumeric() or urllib.parse.urlparse(s).scheme.lower() in STREAM_SCHEMES


def expand(sources) -> list[Input]:
    """The job's inputs from ``sources`` (paths, folders, globs, lists, streams), sorted by path, without duplicates.

    Raises:
        FileNotFoundError: A source does not exist, or nothing in it is an image or a video (Ultralytics' formats).
    """
    sources = [str(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
    streams = [s for s in sources if is_stream(s)]
    files = [s for s in sources if not is_stream(s)]
    found = set()
    for s in files:  # one at a time: the loader reads a .txt/.csv list only when it is the whole source
        found |= _listed(s)
    found = sorted((f, kind) for f, kind in found if _regular(f))
    items = found + [(s, "stream") for s in dict.fromkeys(streams)]
    names = unique_names([output_name(p, kind) for p, kind in items])
    return [Input(p, kind, name) for (p, kind), name in zip(items, names)]


def _listed(source: str) -> set:
    """``{(path, "image" | "video")}`` that Ultralytics' loader finds in ``source``, without opening any of them.

    Raises:
        FileNotFoundError: ``source`` does not exist, or holds no image or video (the loader's message).
    """
    from ultralytics.data.loaders import LoadImagesAndVideos

    class Lister(LoadImagesAndVideos):
        def _new_video(self, path):  # the loader opens the first video at once; a listing opens nothing
            self.cap = None

    loader = Lister(source)
    return {(f, "video" if v else "image") for f, v in zip(loader.files, loader.video_flag)}


def _regular(path: str) -> bool:
    """True for a regular file; anything else (a named pipe, a device, a socket) is left out with a warning."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True  # missing or unreadable: reported when its turn comes
    if stat.S_ISREG(mode):
        return True
    from ultralytics.utils import LOGGER

    LOGGER.warning(f"so-det predict: skipping {path}: not a regular file (a named pipe or a device is never read)")
    return False


def output_name(path: str, kind: str) -> str:
    """The annotated copy's name: the image's own name (``<stem>.jpg`` when OpenCV cannot write its format, e.g.
    ``.mpo``), ``<stem>.mp4`` for a video or a stream."""
    if kind == "stream":
        return (re.sub(r"[^\w.-]+", "_", path).strip("_") or "stream") + ".mp4"
    if kind != "image":
        return Path(path).stem + ".mp4"
    return Path(path).name if _writable(Path(path).suffix) else Path(path).stem + ".jpg"


def _writable(suffix: str) -> bool:
    import cv2

    return bool(suffix) and cv2.haveImageWriter(f"x{suffix.lower()}")


def unique_names(names: list[str]) -> list[str]:
    """``names`` with a repeat of a name renamed ``<stem>_<k><suffix>`` (k = 1, 2...) in list order."""
    seen, out = {}, []
    taken = set(names)
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        new = name
        while k and new in taken:
            new = f"{Path(name).stem}_{k}{Path(name).suffix}"
            k += 1
        taken.add(new)
        out.append(new)
    return out


def read_image(path: str) -> np.ndarray | None:
    """The image as a BGR array, or None when the file is not a regular file or not a readable image (whatever the
    decoder raises)."""
    from ultralytics.utils.patches import imread

    try:
        img = imread(path) if _regular(path) else None
    except Exception:  # any decoder error (OpenCV, Pillow) means "unreadable" to the caller
        img = None
    if img is not None and (img.ndim == 2 or img.shape[2] == 1):
        img = np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=2)
    return img


class Frames:
    """The frames of a video or a stream: iterate ``(index, BGR frame)``; ``fps`` and ``total`` (None: unknown).

    Args:
        inp (Input): A video or stream input.
        vid_stride (int): Read every ``vid_stride``-th frame.
    """

    def __init__(self, inp: Input, vid_stride: int = 1):
        from ultralytics.data.loaders import LoadImagesAndVideos, LoadStreams

        if vid_stride < 1:
            raise ValueError(f"--vid-stride must be >= 1, got {vid_stride}")
        self.stride = vid_stride
        if inp.kind == "stream":
            self.loader = LoadStreams(inp.path, vid_stride=vid_stride)
            fps, self.total = self.loader.fps[0], None
        else:
            if not _regular(inp.path):
                raise FileNotFoundError(f"{inp.path} is not a regular file")
            self.loader = LoadImagesAndVideos(inp.path, vid_stride=vid_stride)
            fps, self.total = self.loader.fps, self.loader.frames
        self.fps = usable_fps(fps, inp.path) / vid_stride
        self.stream = inp.kind == "stream"

    def __iter__(self):
        try:
            for k, (_, imgs, _) in enumerate(self.loader):
                yield (k if self.stream else self.loader.frame * self.stride - 1), imgs[0]
        finally:
            self.loader.close()


def usable_fps(fps, path: str) -> float:
    """``fps`` when it is a plausible frame rate (:data:`FPS_RANGE`), else :data:`DEFAULT_FPS` with a warning."""
    try:
        ok = math.isfinite(float(fps)) and FPS_RANGE[0] <= float(fps) <= FPS_RANGE[1]
    except (TypeError, ValueError):
        ok = False
    if ok:
        return float(fps)
    from ultralytics.utils import LOGGER

    LOGGER.warning(
        f"so-det predict: {path} gives no usable frame rate ({fps!r}); its video is written at {DEFAULT_FPS:g} fps"
    )
    return DEFAULT_FPS
