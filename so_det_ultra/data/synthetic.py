"""A deterministic synthetic tiny-object dataset in YOLO layout, for tests, benchmarks and smoke training.

Objects are small (2-32 px by default) filled shapes with a class-specific shape *and* colour, drawn on textured
clutter (smoothed noise plus random distractor strokes in muted colours), so a detector can learn them in a few
epochs while background alone is not trivially separable.

Examples:
    >>> from so_det_ultra.data.synthetic import make_dataset
    >>> yaml_path = make_dataset("/tmp/tiny", n_train=16, n_val=8, imgsz=128, seed=0)
    >>> # yolo train model=so-det-n.yaml data=/tmp/tiny/data.yaml imgsz=128 epochs=1
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from so_det_ultra.data.contract import IMAGES, LABELS, split_dir, write_data_yaml

SHAPES = ("square", "disc", "triangle", "cross", "ring", "diamond")
COLOURS = ((230, 40, 40), (40, 200, 40), (40, 80, 240), (240, 220, 30), (220, 40, 220), (30, 220, 220))


def _background(rng, h, w):
    noise = rng.normal(110, 40, (h // 4 + 1, w // 4 + 1, 3)).clip(0, 255).astype(np.uint8)
    img = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    for _ in range(int(h * w / 2500)):  # distractor strokes: thin, muted, not class colours
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in np.clip(np.array(p1) + rng.integers(-20, 21, 2), 0, [w - 1, h - 1]))
        grey = int(rng.integers(60, 180))
        cv2.line(img, p1, p2, (grey, grey, grey), 1)
    return img


def _draw(img, cls, cx, cy, s, colour):
    r = max(s / 2, 1.0)
    x0, y0, x1, y1 = int(round(cx - r)), int(round(cy - r)), int(round(cx + r)) - 1, int(round(cy + r)) - 1
    shape = SHAPES[cls % len(SHAPES)]
    if shape == "square":
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, -1)
    elif shape == "disc":
        cv2.circle(img, (int(cx), int(cy)), int(max(r, 1)), colour, -1)
    elif shape == "ring":
        cv2.circle(img, (int(cx), int(cy)), int(max(r, 1)), colour, max(int(r / 2.5), 1))
    elif shape == "cross":
        t = max(int(r / 2), 1)
        cv2.rectangle(img, (x0, int(cy) - t // 2), (x1, int(cy) + (t + 1) // 2), colour, -1)
        cv2.rectangle(img, (int(cx) - t // 2, y0), (int(cx) + (t + 1) // 2, y1), colour, -1)
    else:
        pts = (
            [(int(cx), y0), (x1, y1), (x0, y1)]
            if shape == "triangle"
            else [(int(cx), y0), (x1, int(cy)), (int(cx), y1), (x0, int(cy))]
        )
        cv2.fillPoly(img, [np.array(pts, np.int32)], colour)
    return x0, y0, x1 + 1, y1 + 1


def make_image(rng, imgsz, nc, objects, size_range):
    """One image (BGR uint8, square ``imgsz``) and its labels as rows ``[cls, xc, yc, w, h]`` (normalised)."""
    h = w = imgsz
    img = _background(rng, h, w)
    labels, boxes = [], []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        for _attempt in range(20):  # avoid overlapping objects so every label is visible
            s = float(rng.uniform(*size_range))
            cx, cy = rng.uniform(s / 2 + 1, w - s / 2 - 1), rng.uniform(s / 2 + 1, h - s / 2 - 1)
            box = (cx - s / 2 - 1, cy - s / 2 - 1, cx + s / 2 + 1, cy + s / 2 + 1)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(nc))
        x0, y0, x1, y1 = _draw(img, cls, cx, cy, s, COLOURS[cls % len(COLOURS)][::-1])
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        boxes.append(box)
        labels.append([cls, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
    return img, labels


def check_options(n_train, n_val, imgsz, nc, objects, size_range) -> None:
    """Raise ValueError naming the option (as ``so-det synthetic`` spells it) that :func:`make_dataset` cannot use."""
    if not 1 <= nc <= len(SHAPES):
        raise ValueError(f"--nc (classes) must be 1..{len(SHAPES)} (one distinct shape and colour per class), got {nc}")
    for flag, n in (("--train", n_train), ("--val", n_val)):
        if n < 0:
            raise ValueError(f"{flag} (images) must be 0 or more, got {n}")
    if imgsz < 8:
        raise ValueError(f"--imgsz (image side, px) must be at least 8, got {imgsz}")
    lo, hi = objects
    if not 0 <= lo <= hi:
        raise ValueError(f"--objects MIN MAX (objects per image) needs 0 <= MIN <= MAX, got {lo} {hi}")
    smin, smax = size_range
    if not (math.isfinite(smin) and math.isfinite(smax) and 0 < smin <= smax <= imgsz - 4):
        raise ValueError(
            f"--sizes MIN MAX (object side, px) needs finite 0 < MIN <= MAX <= imgsz - 4 = {imgsz - 4}, "
            f"got {smin} {smax}"
        )


def make_dataset(
    root,
    n_train: int = 32,
    n_val: int = 16,
    imgsz: int = 160,
    nc: int = 3,
    objects: tuple = (3, 12),
    size_range: tuple = (4.0, 24.0),
    seed: int = 0,
    force: bool = False,
    lock_timeout: float | None = None,
) -> Path:
    """Write ``root/images/{train,val}``, ``root/labels/{train,val}`` and ``root/data.yaml``; return the YAML path.

    Deterministic for a given seed and arguments. ``size_range`` is the object side in pixels (2-32 is typical).
    ``root`` is owned, locked and written as every so-det-ultra output folder (:mod:`.ownership`): a non-empty folder
    that no ``make_dataset`` wrote is refused unless ``force`` (then only the files it writes are replaced), a rerun
    replaces its own files and removes those of its earlier runs it no longer writes, and ``lock_timeout`` (seconds)
    gives up waiting for another run writing ``root``.
    """
    from so_det_ultra.data.ownership import Ownership, check_lock_timeout, dst_lock

    check_options(n_train, n_val, imgsz, nc, objects, size_range)
    check_lock_timeout(lock_timeout)
    root = Path(root)
    options = dict(n_train=n_train, n_val=n_val, imgsz=imgsz, nc=nc, objects=list(objects), seed=seed)
    options["size_range"] = [float(v) for v in size_range]
    Ownership.check(root, "synthetic", force)  # refuse before the lock file is created
    with dst_lock(root, lock_timeout):
        owner = Ownership.start(root, "synthetic", options, force)
        try:
            with owner.transaction(f"nothing of this run was kept: {root} holds what it held before"):
                path = _write(owner, root, n_train, n_val, imgsz, nc, objects, size_range, seed)
                owner.finish()
        finally:
            owner.close()
    return path


def _write(owner, root: Path, n_train, n_val, imgsz, nc, objects, size_range, seed) -> Path:
    """The images, labels and data YAML of :func:`make_dataset` through ``owner``; earlier files not rewritten are
    marked stale."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        images, labels_dir = split_dir(root, IMAGES, split), split_dir(root, LABELS, split)
        owner.mkdir(images)
        owner.mkdir(labels_dir)
        for k in range(count):
            img, labels = make_image(rng, imgsz, nc, objects, size_range)
            _, png = cv2.imencode(".png", img)
            rows = "".join(f"{c} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, x, y, bw, bh in labels)
            owner.write_bytes(images / f"{split}_{k:05d}.png", png.tobytes())
            owner.write_text(labels_dir / f"{split}_{k:05d}.txt", rows)
        for folder, suffix in ((images, ".png"), (labels_dir, ".txt")):
            owner.remove_stale(folder, {f"{split}_{k:05d}{suffix}" for k in range(count)})
    return write_data_yaml(root, dict(enumerate(SHAPES[:nc])), write=owner.write_text)
