"""What seeker fitting trains on: native-resolution frames, their heatmap targets, and the stride-8 features.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3; official
code github alibaba/esod (the target and weights: ``scripts/data_prepare.py`` ``gen_mask``, see
:mod:`so_det_ultra.losses.esod`). Used by :mod:`so_det_ultra.training.seeker`; the recipe is in docs/highres.md,
"Sparse inference for a model you already trained".

- :func:`load_frames`: the images and labels of a data YAML's split through Ultralytics' own dataset class (so every
  layout ``yolo train`` reads works), plus the ignored regions of the so-det sidecars when the YAML has a ``so_det:``
  key (``so-det convert`` writes them).
- :func:`frame_input`: one frame as the network sees it at inference (long side at its own size or ``imgsz``,
  letterboxed to a multiple of the model's stride by Ultralytics' ``LetterBox``, as sparse inference does), times a
  scale factor and optionally flipped (the augmentations).
- :func:`frame_target`: ESOD's heatmap target and official per-cell weights for that input
  (:func:`~so_det_ultra.losses.esod.heatmap_target`, :func:`~so_det_ultra.losses.esod.box_weights`).
- :class:`FeatureCache`: the seeker's input (the frozen stem's stride-8 output) per frame and augmentation, computed
  once and kept in memory (fp16) or in a folder, or recomputed at every use.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from so_det_ultra.data.contract import SO_DET_KEY, read_sidecar, sidecar_folder, sidecar_path
from so_det_ultra.losses.esod import box_weights, heatmap_target
from so_det_ultra.nn.graph import run_layers


@dataclass
class Frame:
    """One training image: file, (N, 4) xyxy boxes and (N,) classes in its pixels, (M, 4) ignored regions."""

    path: str
    boxes: np.ndarray
    cls: np.ndarray
    ignore: np.ndarray
    hw: tuple[int, int]


def load_frames(data, split: str = "train", fraction: float = 1.0) -> tuple[list[Frame], dict]:
    """The frames of ``split`` of data YAML ``data`` (a path or a name Ultralytics resolves) and the loaded YAML.

    Labels come through Ultralytics' ``YOLODataset`` (its label cache is written as ``yolo train`` writes it);
    ignored regions from the so-det sidecars (:mod:`so_det_ultra.data.contract`) when the YAML has ``so_det:``.
    """
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    cfg = check_det_dataset(str(data))
    if not cfg.get(split):
        raise ValueError(
            f"data {data} has no split {split!r}; it has {[k for k in ('train', 'val', 'test') if k in cfg]}"
        )
    ds = YOLODataset(img_path=cfg[split], data=cfg, augment=False, fraction=fraction, prefix="fit-seeker: ")
    sidecars = sidecar_folder(cfg) if cfg.get(SO_DET_KEY) else None
    frames = []
    for lb in ds.labels:
        h, w = (int(v) for v in lb["shape"])
        xywh = np.asarray(lb["bboxes"], np.float64).reshape(-1, 4) * [w, h, w, h]
        boxes = np.concatenate((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        side = read_sidecar(sidecar_path(lb["im_file"], cfg["path"], sidecars)) if sidecars else None
        ignore = side.ignore if side is not None else np.zeros((0, 4))
        frames.append(Frame(lb["im_file"], boxes, np.asarray(lb["cls"]).reshape(-1).astype(int), ignore, (h, w)))
    return frames, cfg


def input_size(hw: tuple[int, int], imgsz: int | None, stride: int, scale: float = 1.0) -> int:
    """Long side of the network input: the frame's own (``imgsz`` None) or ``imgsz``, times ``scale``, rounded up
    to ``stride`` (what sparse inference letterboxes to at ``scale`` 1)."""
    return int(math.ceil((imgsz or max(hw)) * scale / stride) * stride)


def frame_geometry(frame: Frame, size: int, stride: int, flip: bool = False):
    """``(boxes, ignore, (H, W))``: ``frame``'s boxes and ignored regions in the pixels of its network input at long
    side ``size`` (:func:`frame_input`), and that input's size."""
    lb, r, (left, top), hw = _letterbox(frame.hw, size, stride)
    off = np.array([left, top] * 2, np.float64)
    boxes, ignore = frame.boxes * r + off, frame.ignore * r + off
    if flip:
        boxes, ignore = (np.stack((hw[1] - b[:, 2], b[:, 1], hw[1] - b[:, 0], b[:, 3]), 1) for b in (boxes, ignore))
    return boxes, ignore, hw


def frame_input(img: np.ndarray, size: int, stride: int, flip: bool = False) -> torch.Tensor:
    """The (1, 3, H, W) float RGB input of BGR ``img`` letterboxed to long side ``size`` (Ultralytics'
    ``LetterBox(auto=True)``: the minimal padding to a multiple of ``stride``, centred, as sparse inference), flipped
    left to right if ``flip``."""
    out = _letterbox(img.shape[:2], size, stride)[0](image=img)
    out = out[:, ::-1] if flip else out
    return torch.from_numpy(np.ascontiguousarray(out[..., ::-1].transpose(2, 0, 1))).float().div_(255)[None]


def _letterbox(hw, size: int, stride: int):
    """Ultralytics' ``LetterBox`` for an ``hw`` image and its geometry: ratio, (left, top) padding, output (H, W)."""
    from ultralytics.data.augment import LetterBox

    lb = LetterBox(new_shape=(size, size), auto=True, stride=stride)
    g = lb.get_params({"img": np.broadcast_to(np.uint8(0), (*hw, 3))})  # reads the shape only
    out_hw = (g["new_unpad"][1] + g["top"] + g["bottom"], g["new_unpad"][0] + g["left"] + g["right"])
    return lb, g["ratio"][0], (g["left"], g["top"]), out_hw


def frame_target(boxes, ignore, frame: Frame, shape, cell: int, weights: str, cls_ratio, frame_area=None):
    """ESOD's heatmap target and per-cell weight, each (1, 1, H, W), for input-pixel ``boxes``/``ignore`` of
    ``frame`` on a ``shape`` grid of ``cell``-px cells. ``weights="official"``: each object's weight from its area in
    the original frame (``frame_area``, default the image's own), as ``gen_mask``; ``"none"``: plain BCE."""
    bw = None
    if weights == "official" and len(frame.boxes):
        area = float(frame_area or frame.hw[0] * frame.hw[1])
        bw = box_weights(torch.as_tensor(frame.boxes), torch.as_tensor(frame.cls), area, cls_ratio)
    t, w = heatmap_target(torch.as_tensor(boxes), tuple(shape), cell, torch.as_tensor(ignore), box_weight=bw)
    return t[None, None], w[None, None]


class FeatureCache:
    """The stem's output that the seeker reads (layer ``src``), per ``(frame, size, flip)``.

    ``where="ram"``: computed once, kept as fp16 tensors; a folder path: computed once, saved there as ``.npy`` files
    (fp16) named by a digest of the stem's weights, the image file and the augmentation (so another fit of the same
    model reuses them) and read back memory-mapped; ``"none"``: recomputed at every use (decoding, letterboxing and
    the stem included). docs/highres.md gives the measured costs that chose the default.
    """

    def __init__(self, layers, src: int, stride: int, where="ram", device="cpu"):
        self.stem, self.src, self.stride, self.device = list(layers)[: src + 1], src, stride, device
        self.where = where if where in ("ram", "none") else Path(where)
        self.mem = {}
        if isinstance(self.where, Path):
            self.where.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha1()
            for k, v in sorted(torch.nn.Sequential(*self.stem).state_dict().items()):
                digest.update(k.encode() + v.detach().cpu().float().numpy().tobytes())
            self.digest = digest.hexdigest()

    def get(self, i: int, frame: Frame, size: int, flip: bool) -> torch.Tensor:
        """Features (1, C, h, w), float on the device, of frame ``i`` at long side ``size``, flipped or not."""
        key = (i, size, flip)
        if key not in self.mem:
            self.mem[key] = self._store(frame, size, flip)
        stored = self.mem[key]
        if stored is None:
            return self.compute(frame, size, flip)
        if isinstance(stored, Path):
            return torch.from_numpy(np.load(stored, mmap_mode="r").astype(np.float32)).to(self.device)
        return stored.to(self.device).float()

    @torch.no_grad()
    def compute(self, frame: Frame, size: int, flip: bool) -> torch.Tensor:
        """The stem's layer-``src`` output (1, C, h, w) for one frame, from the image file."""
        img = cv2.imread(frame.path)
        if img is None:
            raise FileNotFoundError(f"cannot read image {frame.path}")
        y = []
        run_layers(self.stem, frame_input(img, size, self.stride, flip).to(self.device), y)
        return y[self.src].float()

    def _store(self, frame: Frame, size: int, flip: bool):
        if self.where == "none":
            return None
        if self.where == "ram":
            return self.compute(frame, size, flip).half()
        name = hashlib.sha1(f"{self.digest}|{Path(frame.path).resolve()}|{size}|{flip}".encode()).hexdigest()
        file = self.where / f"{name[:20]}.npy"
        if not file.is_file():
            tmp = file.with_name(f"{file.stem}.tmp.npy")
            np.save(tmp, self.compute(frame, size, flip).half().cpu().numpy())
            tmp.replace(file)
        return file

    def nbytes(self) -> int:
        """Bytes of features held in memory (0 for a folder or ``none``)."""
        return sum(f.numel() * f.element_size() for f in self.mem.values() if isinstance(f, torch.Tensor))
