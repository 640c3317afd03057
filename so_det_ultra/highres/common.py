"""What the high-resolution predictors share: model loading, letterboxing, merging boxes, building ``Results``.

Every predictor in :mod:`so_det_ultra.highres` takes the same inputs (a model, one or more images) and returns a list
of Ultralytics ``Results``, one per image, with boxes in the original image's pixels, so that plotting, saving and
tracking code written for ``YOLO.predict`` keeps working.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision

from so_det_ultra.data.contract import IMAGE_SUFFIXES, is_image
from so_det_ultra.nn.checkpoints import (
    CheckpointError,
    checkpoint_problem,
    model_kind,
    pt_alias,
    safe_checkpoint,
)
from so_det_ultra.registry import strict_yamls


def stock_model(model, unsafe_load: bool = False):
    """A ``YOLO`` for Ultralytics' own predictor (dense mode): a checkpoint (by content, whatever its name) is checked
    by :func:`safe_checkpoint` on a private copy and loaded from that copy, a YAML is built under
    :func:`~so_det_ultra.registry.strict_yamls`; other models as ``YOLO`` takes them."""
    from ultralytics import YOLO

    if isinstance(model, YOLO):
        return model
    kind = model_kind(model)
    if kind == "checkpoint" and Path(model).is_file():
        path = Path(model)
        if unsafe_load:
            with pt_alias(path) as alias:
                return YOLO(str(alias))
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
        with pt_alias(path, copy=True) as snapshot:
            safe_checkpoint(snapshot, shown=path)  # refuses a pickle that would run code, before YOLO loads it
            return YOLO(str(snapshot))
    if kind == "yaml":
        with strict_yamls():
            return YOLO(str(model))
    return YOLO(str(model))


def load_model(model, device="cpu", fuse: bool = True, unsafe_load: bool = False):
    """A ``DetectionModel`` in eval mode from a path (checkpoint or model YAML), a ``YOLO`` or a model.

    A checkpoint, recognised by its content whatever its name (:func:`model_kind`), is loaded with Ultralytics'
    restricted loader (``torch_safe_load(..., safe_only=True)`` in ultralytics/nn/tasks.py: ``torch.load(
    weights_only=True)`` with an allow-list of Ultralytics', torch's and the registered so-det-ultra classes), so a
    file whose pickle would run other code is refused with :class:`UnsafeCheckpointError` instead of running it, and
    a damaged one with a one-line :class:`CheckpointError`. ``unsafe_load=True`` loads it the stock way (full
    pickle, for files you trust). A model YAML is built under :func:`~so_det_ultra.registry.strict_yamls` (a plain
    ``activation:``).

    Returns:
        (nn.Module): The detection model (``model.names`` holds the class names), on ``device``, eval mode.
    """
    from ultralytics import YOLO

    kind = model_kind(model)
    if kind == "checkpoint" and Path(model).is_file() and not unsafe_load:
        model = safe_checkpoint(Path(model))
    elif kind in ("checkpoint", "yaml"):
        model = stock_model(model, unsafe_load)
    elif isinstance(model, (str, Path)):
        model = YOLO(str(model))
    if hasattr(model, "predictor") and hasattr(model, "model"):  # a YOLO wrapper
        model = model.model
    model = model.to(device).float().eval()
    return model.fuse(verbose=False) if fuse and hasattr(model, "fuse") else model  # fuse() skips fused models


def read_images(source) -> list[tuple[str, np.ndarray]]:
    """``(path, BGR array)`` pairs from a file, a folder, a list of those, or arrays (named ``image0.jpg``...).

    A file in a folder that is not a readable image (or not a regular file: a named pipe is never opened) is skipped
    with a warning; one named directly raises ``FileNotFoundError``.
    """
    items = source if isinstance(source, (list, tuple)) else [source]
    out = []
    for k, item in enumerate(items):
        if isinstance(item, np.ndarray):
            out.append((f"image{k}.jpg", item))
            continue
        p = Path(item)
        files = sorted(f for f in p.iterdir() if is_image(f)) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
        for f in files:
            img = cv2.imread(str(f)) if f.is_file() else None  # a named pipe or a device is never opened
            if img is None and p.is_dir():  # one bad file in a folder does not stop the others
                from ultralytics.utils import LOGGER

                LOGGER.warning(f"skipping {f}: not a readable image")
                continue
            if img is None:
                raise FileNotFoundError(f"cannot read image {f}")
            out.append((str(f), img))
    return out


def letterbox_image(img: np.ndarray, imgsz: int | None, stride: int) -> np.ndarray:
    """Resize the long side to ``imgsz`` (None: keep the native size) and pad each side to a multiple of ``stride``.

    This is the minimal rectangular letterbox Ultralytics' predictor uses (``LetterBox(auto=True)``), so dense
    predictions and ours see the same input. Returns the padded uint8 BGR image (H, W, 3).
    """
    from ultralytics.data.augment import LetterBox

    h, w = img.shape[:2]
    size = max(h, w) if imgsz is None else int(imgsz)
    size = int(np.ceil(size / stride) * stride)
    return LetterBox(new_shape=(size, size), auto=True, stride=stride)(image=img)


def letterbox(img: np.ndarray, imgsz: int | None, stride: int, device="cpu") -> torch.Tensor:
    """:func:`letterbox_image` as the network input: a (1, 3, H, W) float tensor in [0, 1], RGB."""
    lb = letterbox_image(img, imgsz, stride)
    x = torch.from_numpy(np.ascontiguousarray(lb[..., ::-1].transpose(2, 0, 1))).to(device)
    return x.float().div_(255).unsqueeze(0)


def nms_merge(det: torch.Tensor, iou: float = 0.5, agnostic: bool = False, max_det: int = 1000) -> torch.Tensor:
    """Class-aware (or agnostic) NMS over ``(N, 6)`` rows ``x1, y1, x2, y2, score, class``; best first."""
    if not len(det):
        return det
    keep = torchvision.ops.batched_nms(
        det[:, :4].float(), det[:, 4].float(), torch.zeros_like(det[:, 5]) if agnostic else det[:, 5], iou
    )
    return det[keep[:max_det]]


def nmm_merge(
    det: torch.Tensor, iou: float = 0.5, agnostic: bool = False, max_det: int = 1000, metric: str = "ios"
) -> torch.Tensor:
    """Greedy non-maximum merging (SAHI's GREEDYNMM): the best box absorbs every same-class box that overlaps it.

    Boxes are visited best first; each unvisited box overlapping the current one by more than ``iou`` (``metric``
    ``"ios"``: intersection over the smaller box, SAHI's default; or ``"iou"``) is removed and the current box grows to
    the union of both. The merged box keeps the highest score. Returns ``(M, 6)`` rows, best first.
    """
    if not len(det):
        return det
    det = det[det[:, 4].argsort(descending=True)]
    boxes = det[:, :4].float()
    inter = _intersection(boxes, boxes)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1)
    if metric == "iou":
        overlap = inter / (area[:, None] + area[None] - inter).clamp(min=1e-9)
    elif metric == "ios":
        overlap = inter / torch.minimum(area[:, None], area[None]).clamp(min=1e-9)
    else:
        raise ValueError(f"nmm_merge metric must be 'ios' or 'iou', got {metric!r}")
    if not agnostic:
        overlap = overlap * (det[:, 5:6] == det[:, 5][None])
    taken = torch.zeros(len(det), dtype=torch.bool)
    out = []
    for i in range(len(det)):
        if taken[i]:
            continue
        group = (overlap[i] > iou) & ~taken
        group[i] = True
        taken |= group
        row = det[i].clone()
        row[:2] = boxes[group, :2].min(0).values
        row[2:4] = boxes[group, 2:4].max(0).values
        out.append(row)
        if len(out) == max_det:
            break
    return torch.stack(out)


def _intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    return (rb - lt).clamp(min=0).prod(2)


MERGERS = {"nms": nms_merge, "nmm": nmm_merge}


def merge(det: torch.Tensor, how: str = "nms", **kwargs) -> torch.Tensor:
    if how not in MERGERS:
        raise ValueError(f"unknown merge {how!r}; choose one of {sorted(MERGERS)}")
    return MERGERS[how](det, **kwargs)


def to_results(det: torch.Tensor, img: np.ndarray, path: str, names: dict, input_shape=None, speed=None):
    """Ultralytics ``Results`` for one image from ``(N, 6)`` detections.

    ``input_shape`` (h, w) is the letterboxed network input the boxes are in; None means they are already in ``img``'s
    pixels. Boxes are clipped to the image.
    """
    from ultralytics.engine.results import Results
    from ultralytics.utils import ops

    det = det.detach().float().cpu().reshape(-1, 6).clone()
    if input_shape is not None and len(det):
        det[:, :4] = ops.scale_boxes(tuple(input_shape), det[:, :4], img.shape[:2])
    elif len(det):
        det[:, [0, 2]] = det[:, [0, 2]].clamp(0, img.shape[1])
        det[:, [1, 3]] = det[:, [1, 3]].clamp(0, img.shape[0])
    res = Results(img, path=path, names=names, boxes=det)
    if speed:
        res.speed = dict(speed)
    return res
