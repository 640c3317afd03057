"""ESOD's objectness-heatmap target and loss, added to Ultralytics' detection loss.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE Transactions on Image
Processing 2024 (arXiv 2407.16424), sec. 3; official code github alibaba/esod. Per ground-truth box an elliptical
Gaussian, 1 at the centre and 0.5 at the box edge, zero below 0.5, max-pooled to stride 8; ignored regions are neither
positive nor negative; loss = BCE(heatmap) x 0.2 added to YOLOv5's detection loss (ours: x ``gain`` added to
Ultralytics' v8 loss, the seeker's gradient share matched). Summary: docs/highres.md.

Per-cell weights (official ``scripts/data_prepare.py``, ``gen_mask``; the BCE in ``utils/loss.py``,
``compute_loss_seg``): every cell an object's Gaussian covers weighs ``1 + ln(max(r_size, r_cls))``, the map keeping
the largest weight per cell (1 elsewhere), with

- ``r_size = max(area_min / area, 1) ** 2``, ``area`` the box area rescaled to a 1920x1080 frame
  (``area = w * h / (width * height) * (1920 * 1080)``) and ``area_min = 4 * 4 * 100`` = 1600 px;
- ``r_cls = cls_ratio[c] ** 0.7``, ``cls_ratio`` the hard-coded ``[1.83, 5.35, 13.82, 1.00, 5.80, 11.25, 30.11,
  44.63, 24.45, 4.89]`` ("train set"), which is the count of the most frequent VisDrone class (car) over the count of
  each class. Here it is computed from the training labels the same way (``max count / count``) unless given.

The pixel weights are max-pooled to stride 8 with the target (``utils/datasets.py``, ``block_reduce(msk, (8, 8, 1),
np.max)``), and the BCE is the mean over cells of ``weight * bce`` (``F.binary_cross_entropy_with_logits(p, masks,
weight=weight)``).

Select it from a model YAML (the shared ``loss:`` mechanism, :mod:`so_det_ultra.losses.config`); the model's head
must be :class:`~so_det_ultra.nn.esod.SeekerDetect`, which hands the seeker's logits to the loss as ``preds["seek"]``::

    loss:
      type: ESODLoss
      gain: 4.0            # the official 0.2 rescaled to Ultralytics' detection-loss gains (docs/highres.md)
      weights: official    # or none: plain BCE
      cls_ratio: null      # null: from the training labels at train start; or a list, one value per class
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.ops import xywh2xyxy

from so_det_ultra.registry import register_loss

_HALF = math.sqrt(2 * math.log(2))  # sigma = (side / 2) / _HALF puts exp(-d^2 / 2 sigma^2) = 0.5 at the box edge
AREA_MIN = 4 * 4 * 100  # px in a 1920x1080 frame (official scripts/data_prepare.py, gen_mask: area_min)
REF_FRAME = (1920, 1080)  # the frame object areas are rescaled to (gen_mask: `* (1920 * 1080)`)
CLS_POWER = 0.7  # r_cls = cls_ratio ** 0.7 (gen_mask)
WEIGHTS = ("official", "none")
AREA_KEY = "esod_area"  # batch key: per image, (n, 2) object and frame areas in original-image pixels


def batch_areas(batch: dict) -> torch.Tensor | None:
    """(N, 2) original-image object and frame areas of a collated batch, in ``batch["cls"]`` order, or None.

    Ultralytics' data loader fills ``batch["esod_area"]`` (a tuple of one (n, 2) tensor per image) through the
    integration's dataset patch (:mod:`so_det_ultra.training.frames`).
    """
    areas = batch.get(AREA_KEY)
    if areas is None:
        return None
    return torch.cat(list(areas)) if isinstance(areas, (list, tuple)) else areas


def class_ratio(counts) -> list[float]:
    """``max(counts) / count`` per class (1.0 for a class without objects): the official ``cls_ratio``.

    Example:
        >>> class_ratio([100, 25, 0])
        [1.0, 4.0, 1.0]
    """
    top = max(counts) if len(counts) else 0
    return [float(top / c) if c > 0 else 1.0 for c in counts]


def box_weights(
    boxes: torch.Tensor,
    cls: torch.Tensor,
    frame_area: float,
    cls_ratio=None,
    area_min: float = AREA_MIN,
    cls_power: float = CLS_POWER,
    area: torch.Tensor | None = None,
) -> torch.Tensor:
    """Official heatmap weight ``1 + ln(max(r_size, r_cls))`` of each box (N,).

    ``r_size = max(area_min / area, 1) ** 2`` with ``area = w * h / frame_area * 1920 * 1080``; ``r_cls =
    cls_ratio[c] ** cls_power`` (1 without ``cls_ratio``).

    Args:
        boxes (torch.Tensor): (N, 4) xyxy boxes in pixels. cls (torch.Tensor): (N,) class indices.
        frame_area (float): Area in the same pixels of the frame the boxes belong to (rescaled to 1920x1080).
        cls_ratio (Sequence[float], optional): Per-class ratio (``max count / count``).
        area (torch.Tensor, optional): (N,) box areas already in 1920x1080 pixels (the original frame's, see
            :func:`frame_areas`); then ``boxes`` and ``frame_area`` are not used for the size.

    Example:
        >>> w = box_weights(torch.tensor([[0., 0., 10., 10.]]), torch.tensor([0]), 1920 * 1080)
        >>> round(w.item(), 3)  # 1 + ln((1600 / 100) ** 2)
        6.545
    """
    if area is None:
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
        area = wh.prod(1) / frame_area * (REF_FRAME[0] * REF_FRAME[1])
    r = (area_min / area.to(boxes.device).float().clamp(min=1e-6)).clamp(min=1.0) ** 2
    if cls_ratio is not None and len(cls):
        ratio = torch.as_tensor(cls_ratio, dtype=r.dtype, device=r.device)
        idx = cls.long().view(-1)
        if int(idx.max()) >= len(ratio):
            raise ValueError(f"ESODLoss cls_ratio has {len(ratio)} values but a label has class {int(idx.max())}")
        r = torch.maximum(r, ratio[idx] ** cls_power)
    return 1.0 + torch.log(r)


def heatmap_target(
    boxes: torch.Tensor,
    shape: tuple[int, int],
    stride: float,
    ignore: torch.Tensor | None = None,
    floor: float = 0.5,
    chunk: int = 256,
    box_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objectness target and loss weight of one image on a (H, W) grid of ``stride``-pixel cells.

    For a box with centre (cx, cy) and size (w, h), ``g(x, y) = exp(-(x-cx)^2 / 2 sx^2 - (y-cy)^2 / 2 sy^2)`` with
    ``sx = (w/2) / sqrt(2 ln 2)`` (so g = 0.5 on the box edge along each axis), set to 0 where g < ``floor``. A cell's
    target is the maximum of g over the cell and over all boxes. With ``box_weight`` (N,), a cell's weight is the
    largest weight of the boxes whose Gaussian covers it (g >= ``floor``), and 1 where none does (official
    ``gen_mask``: ``np.maximum(weight, curr_wt * (gaussian > 0))`` on a map of ones, then max-pooled to stride 8).

    Interpretations: the stride-8 "max-pooling" is taken over the continuous cell area (g peaks at the point of the
    cell nearest the centre, so a box smaller than a cell still marks its cell with 1), not over pixel centres; a cell
    is ignored (weight 0) when its centre lies in an ignored region and no box marks it positive.

    Args:
        boxes (torch.Tensor): (N, 4) xyxy boxes in input pixels. shape (tuple): (H, W) cells. stride (float): Cell size.
        ignore (torch.Tensor, optional): (M, 4) xyxy ignored regions in input pixels.
        box_weight (torch.Tensor, optional): (N,) weight of each box's cells (:func:`box_weights`).

    Returns:
        (tuple[torch.Tensor, torch.Tensor]): target and weight, each (H, W), float.

    Example:
        >>> t, w = heatmap_target(torch.tensor([[8., 8., 24., 24.]]), (4, 4), 8)
        >>> t[2, 2].item(), t[0, 0].item()
        (1.0, 0.0)
    """
    h, w = shape
    dev = boxes.device
    target = torch.zeros(h, w, device=dev)
    weight = torch.ones(h, w, device=dev)
    x0 = torch.arange(w, device=dev, dtype=torch.float32) * stride  # cell left edges
    y0 = torch.arange(h, device=dev, dtype=torch.float32) * stride
    bw = box_weight.to(dev).float().split(chunk) if box_weight is not None else [None] * len(boxes.split(chunk))
    for b, wb in zip(boxes.float().split(chunk), bw):
        if not len(b):
            continue
        c = (b[:, :2] + b[:, 2:]) / 2
        sig = (b[:, 2:] - b[:, :2]).clamp(min=1e-3) / 2 / _HALF
        gx = _axis_gauss(x0, stride, c[:, 0:1], sig[:, 0:1])  # (n, W)
        gy = _axis_gauss(y0, stride, c[:, 1:2], sig[:, 1:2])  # (n, H)
        g = gy[:, :, None] * gx[:, None, :]  # (n, H, W)
        target = torch.maximum(target, g.amax(0))
        if wb is not None:
            weight = torch.maximum(weight, ((g >= floor) * wb[:, None, None]).amax(0))
    target = torch.where(target >= floor, target, torch.zeros_like(target))
    if ignore is not None and len(ignore):
        cx, cy = x0 + stride / 2, y0 + stride / 2
        ig = ignore.to(dev).float()
        inside_x = (cx[None] >= ig[:, 0:1]) & (cx[None] <= ig[:, 2:3])  # (M, W)
        inside_y = (cy[None] >= ig[:, 1:2]) & (cy[None] <= ig[:, 3:4])  # (M, H)
        ignored = (inside_y[:, :, None] & inside_x[:, None, :]).any(0)
        weight[ignored & (target == 0)] = 0
    return target, weight


def _axis_gauss(edges, stride, c, sig):
    nearest = torch.minimum(torch.maximum(c, edges[None]), edges[None] + stride)  # cell point nearest the centre
    return torch.exp(-0.5 * ((nearest - c) / sig) ** 2)


def frame_areas(areas: torch.Tensor, frame_area: float | None = None) -> torch.Tensor:
    """(N,) object areas in 1920x1080 pixels from (N, 2) original-image ``[object area, frame area]`` rows.

    ``area = w * h / (width * height) * (1920 * 1080)`` (``gen_mask``) with the original frame's ``width * height``,
    or ``frame_area`` when given (training images that are crops of larger frames).
    """
    frame = areas[:, 1] if frame_area is None else torch.full_like(areas[:, 1], float(frame_area))
    return areas[:, 0] / frame.clamp(min=1.0) * (REF_FRAME[0] * REF_FRAME[1])


def heatmap_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The heatmap loss: ``sum(weight * BCE(logits, target)) / (cells with weight > 0)``.

    The official ``F.binary_cross_entropy_with_logits(p, masks, weight=weight)`` (``utils/loss.py``,
    ``compute_loss_seg``) is the mean over all cells; ignored cells (weight 0) are left out of the count here, which
    is the same when nothing is ignored. ``target`` and ``weight`` come from :func:`heatmap_target`, shaped like
    ``logits``. Shared by :class:`ESODLoss` and seeker fitting (:mod:`so_det_ultra.training.seeker`).
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight, reduction="sum")
    return bce / (weight > 0).sum().clamp(min=1)


def _seeker_head(model):
    """The model's SeekerDetect head, checked to read the model's one ObjectSeeker layer; ValueError otherwise."""
    from so_det_ultra.nn.esod import SeekerDetect
    from so_det_ultra.nn.graph import seeker_index, sources

    k = seeker_index(
        model, "ESODLoss", "add `- [<P3 layer>, 1, ObjectSeeker, []]` to the model YAML (so-det-esod.yaml)"
    )
    head = model.model[-1]
    if not isinstance(head, SeekerDetect) or sources(head)[-1] != k:
        raise ValueError(
            f"ESODLoss reads the seeker's logits from the head's predictions, so the head must be SeekerDetect with "
            f"the ObjectSeeker (layer {k}) as its last input; got {type(head).__name__} from={head.f}. "
            f"Write the head row as `- [[<P2>, <P3>, <P4>, {k}], 1, SeekerDetect, [nc]]` "
            "(see so-det-esod.yaml)"
        )
    return head


@register_loss
class ESODLoss(v8DetectionLoss):
    """Ultralytics' ``v8DetectionLoss`` plus ``gain * BCE(seeker logits, heatmap target)`` (ESOD sec. 3).

    The logits are ``preds["seek"]``, put there by the model's :class:`~so_det_ultra.nn.esod.SeekerDetect` head in
    the same forward pass as the predictions being scored. The weighted BCE is averaged over the non-ignored cells of
    the batch (the official mean over all cells when nothing is ignored); the term is reported as ``seek_loss`` next to
    box/cls/dfl and, like them, multiplied by the batch size in the returned sum. The heatmap's stride is the input
    size over the logits' size (8 for the shipped models).

    Patch training (:mod:`so_det_ultra.training.esod`): when ``preds`` carries ``"patch_origin"``, the detection terms
    score the patches (each object goes to the patch holding its centre, in that patch's pixels) and are scaled by the
    number of images, not of patches, as the official loss (``loss * bs``, ``bs`` the image batch); the heatmap term
    stays on the full-frame logits.

    Ignored regions: Ultralytics' data loader carries none, so with the stock trainer every unmarked cell is negative
    (paint them out of the images when converting, as ESOD does: ``convert_visdrone(..., mask_ignored=True,
    mask_style="esod")``). A dataset that adds ``batch["ignore"]`` (a list with one (M, 4) normalised xywh tensor per
    image) gets them honoured.

    Interpretations (the official code works on whole frames at pixel resolution):
        - a box's area is ``w * h`` of its real-valued box (the official rounds the box outward to whole pixels first);
        - the area is that of the object in its original image, relative to that image (``gen_mask``), whatever the
          augmentation: the stock trainer's batches carry it (``batch["esod_area"]``,
          :mod:`so_det_ultra.training.frames`); ``frame_area`` given replaces the original image's area (training
          images that are native-resolution crops of ~1080p frames want ``frame_area: 2073600``). A batch without
          ``esod_area`` (a loss called outside the trainer) measures the boxes in the network input instead;
        - ``cls_ratio`` left out is computed from the training labels when training starts (a callback,
          :func:`so_det_ultra.training.esod.set_class_ratio`); without it (a loss built outside the trainer) every class
          has ratio 1.

    Args:
        model: The DetectionModel (one ObjectSeeker, a SeekerDetect head reading it). gain (float): Weight of the
            heatmap term: 4.0, the official 0.2 (``utils/loss.py`` line 189) rescaled so the seeker's share of the
            backbone gradient next to Ultralytics' v8 gains matches the official one next to YOLOv5's (measured with
            ``benchmarks/esod_recipe.py balance``).
        tal_topk (int): Top-k of the task-aligned assigner (Ultralytics' default 10).
        weights (str): ``official`` (per-cell weights above) or ``none`` (plain BCE).
        cls_ratio (list[float], optional): Per-class ratio ``max count / count``; None: from the training labels.
        area_min (float): ``area_min`` of ``r_size`` in 1920x1080 pixels (official 1600).
        frame_area (float, optional): Area (original-image pixels) of the frame box areas are rescaled from; None: the
            original image's (the network input's for a batch without ``esod_area``).
    """

    def __init__(
        self,
        model,
        gain: float = 4.0,
        tal_topk: int = 10,
        weights: str = "official",
        cls_ratio=None,
        area_min: float = AREA_MIN,
        frame_area: float | None = None,
    ):
        _seeker_head(model)
        super().__init__(model, tal_topk=tal_topk)
        if weights not in WEIGHTS:
            raise ValueError(f"ESODLoss weights must be one of {WEIGHTS}, got {weights!r}")
        if cls_ratio is not None and (
            isinstance(cls_ratio, str) or len(cls_ratio) != self.nc or min(cls_ratio, default=1) <= 0
        ):
            raise ValueError(
                f"ESODLoss cls_ratio must list one positive value per class ({self.nc}), got {cls_ratio!r}"
            )
        self.gain = float(gain)
        self.weights = weights
        self.cls_ratio = None if cls_ratio is None else [float(r) for r in cls_ratio]
        self.cls_ratio_given = cls_ratio is not None
        self.area_min = float(area_min)
        self.frame_area = frame_area

    def set_class_counts(self, counts):
        """Set ``cls_ratio`` from per-class label counts (``max / count``), unless the YAML gave it."""
        if not self.cls_ratio_given:
            self.cls_ratio = class_ratio(list(counts))

    def __call__(self, preds, batch):
        preds = preds[1] if isinstance(preds, tuple) else preds  # (inference, train dict) in eval mode
        bs = batch["img"].shape[0] if "img" in batch else preds["boxes"].shape[0]
        if "patch_origin" in preds:
            loss, items = self.loss(preds, patch_batch(batch, preds["patch_origin"], preds["patch_size"]))
            loss = loss * (bs / max(preds["boxes"].shape[0], 1))  # official: scaled by the image batch size
        else:
            loss, items = self.loss(preds, batch)
        seek = self.seek_loss(preds, batch) * self.gain
        loss = torch.cat((loss.reshape(-1), (seek * bs).reshape(1)))
        if isinstance(items, dict):
            return loss, {**items, "seek_loss": seek.detach()}
        return loss, torch.cat((items.reshape(-1), seek.detach().reshape(1)))

    def seek_loss(self, preds: dict, batch: dict) -> torch.Tensor:
        """Weighted BCE of ``preds["seek"]`` (B, 1, h, w) against the heatmap target of ``batch``, per cell."""
        from so_det_ultra.nn.esod import SEEK_KEY

        if SEEK_KEY not in preds:
            raise KeyError(
                f"ESODLoss: the predictions carry no {SEEK_KEY!r} entry; they must come from a SeekerDetect head"
            )
        logits = preds[SEEK_KEY]
        bs = logits.shape[0]
        if "img" in batch:
            imgsz = torch.tensor(batch["img"].shape[2:], device=self.device)
        else:  # (h, w) input pixels from the detection features
            imgsz = torch.tensor(preds["feats"][0].shape[2:], device=self.device) * self.stride[0]
        stride = float(imgsz[0]) / logits.shape[2]
        target, weight = self.targets(batch, bs, logits.shape[2:], stride, imgsz)
        return heatmap_bce(logits, target, weight)

    def targets(self, batch, bs, shape, stride, imgsz):
        scale = imgsz[[1, 0, 1, 0]].float()
        boxes = xywh2xyxy(batch["bboxes"].to(self.device).float()) * scale
        idx = batch["batch_idx"].to(self.device).long().view(-1)
        cls = batch["cls"].to(self.device).view(-1)
        bw = self.object_weights(batch, boxes, cls, imgsz) if self.weights == "official" else None
        ignores = batch.get("ignore")
        out = [
            heatmap_target(
                boxes[idx == i],
                shape,
                stride,
                xywh2xyxy(ignores[i].to(self.device).float()) * scale if ignores is not None else None,
                box_weight=None if bw is None else bw[idx == i],
            )
            for i in range(bs)
        ]
        target = torch.stack([t for t, _ in out])[:, None]
        weight = torch.stack([w for _, w in out])[:, None]
        return target, weight

    def object_weights(self, batch: dict, boxes: torch.Tensor, cls: torch.Tensor, imgsz) -> torch.Tensor:
        """(N,) official weight of each object of ``batch``, from its original-frame area when the batch carries it."""
        areas = batch_areas(batch)
        if areas is not None and len(areas) == len(boxes):
            area = frame_areas(areas.to(self.device).float(), self.frame_area)
            return box_weights(boxes, cls, 1.0, self.cls_ratio, self.area_min, area=area)
        frame = float(self.frame_area or torch.as_tensor(imgsz).prod())
        return box_weights(boxes, cls, frame, self.cls_ratio, self.area_min)


def patch_batch(batch: dict, origin: torch.Tensor, size: tuple[int, int]) -> dict:
    """The labels of ``batch`` moved into patches: each object goes to the patch of its image holding its centre.

    Args:
        batch (dict): Ultralytics batch (``img`` (B, 3, H, W), ``batch_idx``, ``cls``, normalised xywh ``bboxes``).
        origin (torch.Tensor): (P, 3) ``image index, y0, x0`` (pixels) of each patch.
        size (tuple[int, int]): Patch (h, w) in pixels.

    Returns:
        (dict): ``batch_idx`` (patch index), ``cls`` and ``bboxes`` (xywh normalised to the patch; a box cut by the
        patch border is kept whole, as the official ``build_patch_targets``, which assigns by centre only).
    """
    h, w = batch["img"].shape[2:]
    ph, pw = size
    dev = batch["bboxes"].device
    xywh = batch["bboxes"].float() * torch.tensor([w, h, w, h], device=dev)
    idx = batch["batch_idx"].to(dev).long().view(-1)
    o = origin.to(dev).long()
    inside = (
        (idx[:, None] == o[None, :, 0])
        & (xywh[:, None, 0] >= o[None, :, 2])
        & (xywh[:, None, 0] < o[None, :, 2] + pw)
        & (xywh[:, None, 1] >= o[None, :, 1])
        & (xywh[:, None, 1] < o[None, :, 1] + ph)
    )  # (N, P)
    p, t = inside.T.nonzero(as_tuple=True)  # grouped by patch: Ultralytics' target padding expects that order
    boxes = xywh[t].clone()
    boxes[:, 0] -= o[p, 2]
    boxes[:, 1] -= o[p, 1]
    boxes /= torch.tensor([pw, ph, pw, ph], device=dev, dtype=boxes.dtype)
    return {"batch_idx": p.to(batch["batch_idx"].dtype), "cls": batch["cls"].view(-1, 1)[t], "bboxes": boxes}
