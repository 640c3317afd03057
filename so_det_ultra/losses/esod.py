"""ESOD's objectness-heatmap target and loss, added to Ultralytics' detection loss.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE Transactions on Image
Processing 2024 (arXiv 2407.16424), sec. 3; official code github alibaba/esod. Per ground-truth box an elliptical
Gaussian, 1 at the centre and 0.5 at the box edge, zero below 0.5, max-pooled to stride 8; ignored regions are neither
positive nor negative; loss = BCE(heatmap) x 0.2 added to the detector loss. Summary: docs/highres.md.

Select it from a model YAML (the shared ``loss:`` mechanism, ``so_det_ultra/integration/losses.py``); the model's head
must be :class:`~so_det_ultra.nn.esod.SeekerDetect`, which hands the seeker's logits to the loss as ``preds["seek"]``::

    loss:
      type: ESODLoss
      gain: 0.2
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.ops import xywh2xyxy

from so_det_ultra.registry import register_loss

_HALF = math.sqrt(2 * math.log(2))  # sigma = (side / 2) / _HALF puts exp(-d^2 / 2 sigma^2) = 0.5 at the box edge


def heatmap_target(
    boxes: torch.Tensor,
    shape: tuple[int, int],
    stride: float,
    ignore: torch.Tensor | None = None,
    floor: float = 0.5,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objectness target and loss weight of one image on a (H, W) grid of ``stride``-pixel cells.

    For a box with centre (cx, cy) and size (w, h), ``g(x, y) = exp(-(x-cx)^2 / 2 sx^2 - (y-cy)^2 / 2 sy^2)`` with
    ``sx = (w/2) / sqrt(2 ln 2)`` (so g = 0.5 on the box edge along each axis), set to 0 where g < ``floor``. A cell's
    target is the maximum of g over the cell and over all boxes.

    Interpretations: the stride-8 "max-pooling" is taken over the continuous cell area (g peaks at the point of the
    cell nearest the centre, so a box smaller than a cell still marks its cell with 1), not over pixel centres; a cell
    is ignored (weight 0) when its centre lies in an ignored region and no box marks it positive.

    Args:
        boxes (torch.Tensor): (N, 4) xyxy boxes in input pixels. shape (tuple): (H, W) cells. stride (float): Cell size.
        ignore (torch.Tensor, optional): (M, 4) xyxy ignored regions in input pixels.

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
    x0 = torch.arange(w, device=dev, dtype=torch.float32) * stride  # cell left edges
    y0 = torch.arange(h, device=dev, dtype=torch.float32) * stride
    for b in boxes.float().split(chunk):
        c = (b[:, :2] + b[:, 2:]) / 2
        sig = (b[:, 2:] - b[:, :2]).clamp(min=1e-3) / 2 / _HALF
        gx = _axis_gauss(x0, stride, c[:, 0:1], sig[:, 0:1])  # (n, W)
        gy = _axis_gauss(y0, stride, c[:, 1:2], sig[:, 1:2])  # (n, H)
        g = (gy[:, :, None] * gx[:, None, :]).amax(0) if len(b) else target
        target = torch.maximum(target, g)
    target = torch.where(target >= floor, target, torch.zeros_like(target))
    weight = torch.ones_like(target)
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


def _seeker_head(model):
    """The model's SeekerDetect head, checked to read the model's one ObjectSeeker layer; ValueError otherwise."""
    from so_det_ultra.nn.esod import ObjectSeeker, SeekerDetect

    seekers = [m.i for m in model.modules() if isinstance(m, ObjectSeeker)]
    if len(seekers) != 1:
        raise ValueError(
            f"ESODLoss needs a model with exactly one ObjectSeeker layer, found {len(seekers)}; "
            "add `- [<P3 layer>, 1, ObjectSeeker, []]` to the model YAML (see so-det-esod.yaml)"
        )
    head = model.model[-1]
    last = head.f[-1] if isinstance(head.f, (list, tuple)) else head.f
    last = head.i + last if last < 0 else last
    if not isinstance(head, SeekerDetect) or last != seekers[0]:
        raise ValueError(
            f"ESODLoss reads the seeker's logits from the head's predictions, so the head must be SeekerDetect with "
            f"the ObjectSeeker (layer {seekers[0]}) as its last input; got {type(head).__name__} from={head.f}. "
            f"Write the head row as `- [[<P2>, <P3>, <P4>, {seekers[0]}], 1, SeekerDetect, [nc]]` "
            "(see so-det-esod.yaml)"
        )
    return head


@register_loss
class ESODLoss(v8DetectionLoss):
    """Ultralytics' ``v8DetectionLoss`` plus ``gain * BCE(seeker logits, heatmap target)`` (ESOD sec. 3).

    The logits are ``preds["seek"]``, put there by the model's :class:`~so_det_ultra.nn.esod.SeekerDetect` head in
    the same forward pass as the predictions being scored. The BCE is averaged over the non-ignored cells of the batch;
    the term is reported as ``seek_loss`` next to box/cls/dfl and, like them, multiplied by the batch size in the
    returned sum. The heatmap's stride is the input size over the logits' size (8 for the shipped models).

    Ignored regions: Ultralytics' data loader carries none, so with the stock trainer every unmarked cell is negative
    (convert VisDrone with ``--mask-ignored`` to grey them out of the images instead, as ESOD does). A dataset that
    adds ``batch["ignore"]`` (a list with one (M, 4) normalised xywh tensor per image) gets them honoured.

    Args:
        model: The DetectionModel (one ObjectSeeker, a SeekerDetect head reading it). gain (float): Weight of the
            heatmap term (0.2). tal_topk (int): Top-k of the task-aligned assigner (Ultralytics' default 10).
    """

    def __init__(self, model, gain: float = 0.2, tal_topk: int = 10):
        _seeker_head(model)
        super().__init__(model, tal_topk=tal_topk)
        self.gain = float(gain)

    def __call__(self, preds, batch):
        loss, items = super().__call__(preds, batch)
        preds = preds[1] if isinstance(preds, tuple) else preds  # (inference, train dict) in eval mode
        seek = self.seek_loss(preds, batch) * self.gain
        bs = preds["boxes"].shape[0]
        loss = torch.cat((loss.reshape(-1), (seek * bs).reshape(1)))
        if isinstance(items, dict):
            return loss, {**items, "seek_loss": seek.detach()}
        return loss, torch.cat((items.reshape(-1), seek.detach().reshape(1)))

    def seek_loss(self, preds: dict, batch: dict) -> torch.Tensor:
        """Mean BCE of ``preds["seek"]`` (B, 1, h, w) against the heatmap target of ``batch``."""
        from so_det_ultra.nn.esod import SEEK_KEY

        if SEEK_KEY not in preds:
            raise KeyError(
                f"ESODLoss: the predictions carry no {SEEK_KEY!r} entry; they must come from a SeekerDetect head"
            )
        logits, feats = preds[SEEK_KEY], preds["feats"]
        bs = feats[0].shape[0]
        imgsz = torch.tensor(feats[0].shape[2:], device=self.device) * self.stride[0]  # (h, w) input pixels
        stride = float(imgsz[0]) / logits.shape[2]
        target, weight = self.targets(batch, bs, logits.shape[2:], stride, imgsz)
        bce = F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight, reduction="sum")
        return bce / weight.sum().clamp(min=1)

    def targets(self, batch, bs, shape, stride, imgsz):
        scale = imgsz[[1, 0, 1, 0]].float()
        boxes = xywh2xyxy(batch["bboxes"].to(self.device).float()) * scale
        idx = batch["batch_idx"].to(self.device).long().view(-1)
        ignores = batch.get("ignore")
        out = [
            heatmap_target(
                boxes[idx == i],
                shape,
                stride,
                xywh2xyxy(ignores[i].to(self.device).float()) * scale if ignores is not None else None,
            )
            for i in range(bs)
        ]
        target = torch.stack([t for t, _ in out])[:, None]
        weight = torch.stack([w for _, w in out])[:, None]
        return target, weight
