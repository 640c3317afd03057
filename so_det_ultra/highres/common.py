"""What the high-resolution predictors share: model loading, letterboxing, merging boxes, building ``Results``.

Every predictor in :mod:`so_det_ultra.highres` takes the same inputs (a model, one or more images) and returns a list
of Ultralytics ``Results``, one per image, with boxes in the original image's pixels, so that plotting, saving and
tracking code written for ``YOLO.predict`` keeps working.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision

from so_det_ultra.data.contract import IMAGE_SUFFIXES, is_image
from so_det_ultra.registry import strict_yamls


class UnsafeCheckpointError(ValueError):
    """A checkpoint that safe (weights-only) loading refuses: it names code outside the known model classes."""


class CheckpointError(ValueError):
    """A file that is not a checkpoint safe loading can read (empty, truncated, text, not a pickle); the message is one
    line naming the file and what is wrong."""


YAML_SUFFIXES = (".yaml", ".yml")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", "")  # names that mean a checkpoint when the bytes do not tell
UNSAFE_HINT = "load it only if you trust where it came from: --unsafe-load (Python: unsafe_load=True)"


def model_kind(model) -> str:
    """``"checkpoint"``, ``"yaml"``, ``"export"`` (for ``AutoBackend``) or ``"object"``, by content where it tells.

    A file that is a ``torch.save`` zip archive or a pickle is a checkpoint whatever it is called (``evil.PT``,
    ``best.pth``, no suffix), so it always goes through the safe loader; a TorchScript archive is an export. Other
    files go by their name: ``.yaml``/``.yml`` a model YAML, ``.pt``/``.pth``/``.ckpt``/none a (damaged) checkpoint
    that :func:`safe_checkpoint` then describes, anything else an export.
    """
    if not isinstance(model, (str, Path)):
        return "object"
    p = Path(model)
    suffix = p.suffix.lower()
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            return "export" if _torchscript(p) else "checkpoint"
        if head[:1] == b"\x80":  # a pickle (protocol 2 and later): torch's legacy format
            return "checkpoint"
    elif p.is_dir():
        return "export"
    if suffix in YAML_SUFFIXES:
        return "yaml"
    return "checkpoint" if suffix in CHECKPOINT_SUFFIXES else "export"


def _torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` unreadable as a checkpoint before torch sees it (empty, text, not a zip or pickle, a
    damaged zip), or None."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty (0 bytes)"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"a damaged or truncated zip archive ({err})"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "a zip archive without a torch checkpoint in it (no data.pkl)"
        return None
    if head[:1] == b"\x80":
        return None
    try:
        head.decode("utf-8")
        return "text, not a PyTorch checkpoint (a model YAML needs a .yaml or .yml name)"
    except UnicodeDecodeError:
        return "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"


@contextmanager
def _as_pt(path: Path, copy: bool = False):
    """``path`` under a name ending in ``.pt`` (what Ultralytics' loaders take): itself, or a link (``copy``: a
    private copy, so that the bytes checked are the bytes loaded) in a fresh private folder."""
    if not copy and path.suffix.lower() == ".pt":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="so-det-") as tmp:
        alias = Path(tmp) / f"{path.stem or 'model'}.pt"
        if copy:
            shutil.copyfile(path, alias)
        else:
            try:
                os.symlink(path.resolve(), alias)
            except OSError:  # no symbolic links (Windows without the privilege)
                shutil.copyfile(path, alias)
        yield alias


def _one_line(err: BaseException, alias: Path, path: Path) -> str:
    """The first line of ``err``'s message, naming ``path`` where it named ``alias``, without Ultralytics' emoji."""
    text = str(err).replace(str(alias), str(path)).strip().splitlines()
    text = (text[0] if text else type(err).__name__).replace("ERROR ❌️", "").strip()
    return text if str(path) in text else f"{path}: {text}"


def _load_error(err: Exception, alias: Path, path: Path) -> ValueError:
    """The error to raise for ``err`` from Ultralytics' safe loader: refused code, or a one-line damaged-file error."""
    import pickle
    import re

    text = str(err.__cause__ or err)
    names = sorted(set(re.findall(r"unsupported(?: global:)? GLOBAL ([\w.]+)", text, re.IGNORECASE)))
    refused = isinstance(err, ModuleNotFoundError) or (
        names and isinstance(err.__cause__ or err, pickle.UnpicklingError)
    )
    if refused:
        cause = f"it names {', '.join(names) or 'code'} outside the allow-list of model classes"
        return UnsafeCheckpointError(f"{path}: safe loading refused it ({cause}); {UNSAFE_HINT}")
    if type(err).__module__.startswith("so_det_ultra"):  # e.g. a checkpoint naming blocks this version lacks
        return CheckpointError(_one_line(err, alias, path))
    cause = err.__cause__ or err
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(cause))  # torch's reason, after its preamble
    why = found.group(1) if found else _one_line(cause, alias, path).split(": ", 1)[-1]
    why = "the file ends early" if why in ("", type(cause).__name__) else why[:200]
    return CheckpointError(f"{path}: not a loadable checkpoint ({type(cause).__name__}: {why})")


def safe_checkpoint(path: Path, shown: Path | None = None):
    """The model of checkpoint ``path`` loaded weights-only, set up as ``load_checkpoint`` (ultralytics/nn/tasks.py).

    Any name works (``.pt``, ``.PT``, ``.pth``, none). Raises :class:`UnsafeCheckpointError` for a pickle that names
    code outside the allow-list and :class:`CheckpointError` (one line naming ``shown``, default ``path``) for a file
    that is no checkpoint or a damaged one.
    """
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn import tasks

    path = Path(path)
    shown = Path(shown or path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{shown}: {problem}")
    with _as_pt(path) as alias:
        try:
            ckpt, _ = tasks.torch_safe_load(str(alias), safe_only=True)
        except Exception as err:  # torch and Ultralytics raise a dozen types for one condition: an unusable file
            raise _load_error(err, alias, shown) from err
    candidate = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(candidate, torch.nn.Module):
        raise CheckpointError(f"{shown} holds no model that safe loading can rebuild (no 'model' or 'ema' module)")
    model = candidate.float()
    model.args = {**DEFAULT_CFG_DICT, **(ckpt.get("train_args") or {})}
    model.pt_path = str(shown)
    model.task = getattr(model, "task", "detect")
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    return model


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
            with _as_pt(path) as alias:
                return YOLO(str(alias))
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
        with _as_pt(path, copy=True) as snapshot:
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


def letterbox(img: np.ndarray, imgsz: int | None, stride: int, device="cpu") -> torch.Tensor:
    """Resize the long side to ``imgsz`` (None: keep the native size) and pad each side to a multiple of ``stride``.

    This is the minimal rectangular letterbox Ultralytics' predictor uses (``LetterBox(auto=True)``), so dense
    predictions and ours see the same input. Returns a (1, 3, H, W) float tensor in [0, 1], RGB.
    """
    from ultralytics.data.augment import LetterBox

    h, w = img.shape[:2]
    size = max(h, w) if imgsz is None else int(imgsz)
    size = int(np.ceil(size / stride) * stride)
    lb = LetterBox(new_shape=(size, size), auto=True, stride=stride)(image=img)
    x = torch.from_numpy(np.ascontiguousarray(lb[..., ::-1].transpose(2, 0, 1))).to(device)
    return x.float().div_(255).unsqueeze(0)


def model_stride(model) -> int:
    return int(max(model.stride.tolist())) if hasattr(model, "stride") else 32


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
