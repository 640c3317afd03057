"""DCLoss, E-FPN-BS's Dynamic Gradient-Balanced Loss: Ultralytics' detection loss with scale-aware per-object weights.

Source: the E-FPN-BS paper's abstract (our reading in docs/blocks.md, "E-FPN-BS"): "a Dynamic Gradient-Balanced
Loss (DCLoss) that automatically modulates loss contributions via scale-aware gradient equilibrium". No formula is
public; what follows is an **interpretation of the abstract**.

Select it from a model YAML (the shared ``loss:`` mechanism, ``so_det_ultra/losses/config.py``)::

    loss:
      type: DCLoss
      gamma: 0.5
"""

from __future__ import annotations

import torch
from ultralytics.utils.loss import v8DetectionLoss

from so_det_ultra.registry import register_loss


def scale_weights(
    target_bboxes: torch.Tensor,
    fg_mask: torch.Tensor,
    gamma: float = 0.5,
    ref: float = 32.0,
    max_weight: float = 4.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Per-anchor loss weights from the size of the object each positive anchor was assigned to.

    The scale curve, for an assigned box of size ``s = sqrt(w * h)`` in input pixels::

        f(s) = clamp((ref / s) ** gamma, 1 / max_weight, max_weight)
        w_a  = f(s_a) / mean_{positive anchors a' in the batch} f(s_a')     (normalize=True; "dynamic": per batch)
        w_a  = 1 for background anchors

    Args:
        target_bboxes (torch.Tensor): (B, A, 4) assigned boxes, xyxy pixels. fg_mask (torch.Tensor): (B, A) bool.
        gamma (float): Curve exponent (0 = no reweighting). ref (float): Size with f = 1. max_weight (float): Clamp.
        normalize (bool): Divide by the positives' mean so the total loss magnitude is unchanged.

    Returns:
        (torch.Tensor): (B, A) detached weights.
    """
    wh = (target_bboxes[..., 2:] - target_bboxes[..., :2]).clamp(min=1e-3)
    f = (ref / wh.prod(-1).sqrt()).pow(gamma).clamp(1.0 / max_weight, max_weight)
    if normalize:
        fg = fg_mask.to(f.dtype)
        f = f / ((f * fg).sum() / fg.sum().clamp(min=1)).clamp(min=1e-12)
    return torch.where(fg_mask, f, torch.ones_like(f)).detach()


@register_loss
class DCLoss(v8DetectionLoss):
    """Ultralytics' ``v8DetectionLoss`` (TAL assignment, BCE + CIoU + DFL) with scale-aware weights per positive anchor.

    Interpretation of the abstract. Small objects get fewer positive anchors and lower IoU, and in FPN-style detectors
    their share of the gradient is small next to large objects; DCLoss rescales each positive anchor's terms by
    :func:`scale_weights` (larger for small objects, smaller for large ones, mean 1 over the batch's positives)::

        L_cls = sum_a w_a * BCE(p_a, t_a) / sum(t)        (background anchors keep w = 1)
        L_box = sum_{a in fg} w_a * t_a * (1 - CIoU_a) / sum(t),   L_dfl likewise

    With ``gamma=0`` every weight is 1 and DCLoss equals ``v8DetectionLoss`` exactly. The gains ``box``, ``cls``,
    ``dfl`` of the training arguments apply as usual; ``(loss_sum, loss_items)`` are returned as by the stock loss.
    Implementation: the stock loss is reused unchanged; its assigner, BCE and box-loss members are wrapped so the
    weights computed from the assignment reach the two loss terms (no Ultralytics code is copied).

    Args:
        model: The DetectionModel (de-paralleled). gamma, ref, max_weight, normalize: see :func:`scale_weights`.
        tal_topk (int): Top-k of the task-aligned assigner (Ultralytics' default 10).
    """

    def __init__(
        self,
        model,
        gamma: float = 0.5,
        ref: float = 32.0,
        max_weight: float = 4.0,
        normalize: bool = True,
        tal_topk: int = 10,
    ):
        if getattr(model.model[-1], "one2one_cv2", None) is not None:
            raise ValueError(
                "DCLoss supports Detect heads without a one-to-one (end2end) branch; "
                "remove `loss: type: DCLoss` or use a non-end2end head"
            )
        if gamma < 0 or ref <= 0 or max_weight < 1:
            raise ValueError(f"DCLoss needs gamma >= 0, ref > 0, max_weight >= 1; got {gamma}, {ref}, {max_weight}")
        super().__init__(model, tal_topk=tal_topk)
        self.gamma, self.ref, self.max_weight, self.normalize = float(gamma), float(ref), float(max_weight), normalize
        self.weights = None  # (B, A) weights of the current batch, set by the assigner wrapper
        self._assigner, self._bce, self._bbox_loss = self.assigner, self.bce, self.bbox_loss
        self.assigner, self.bce, self.bbox_loss = self._assign, self._weighted_bce, self._weighted_bbox_loss

    def _assign(self, *args, **kwargs):
        out = self._assigner(*args, **kwargs)  # (labels, target_bboxes, target_scores, fg_mask, target_gt_idx)
        self.weights = scale_weights(out[1], out[3], self.gamma, self.ref, self.max_weight, self.normalize)
        return out

    def _weighted_bce(self, pred, target):
        return self._bce(pred, target) * self.weights[..., None].to(pred.dtype)

    def _weighted_bbox_loss(self, pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, *rest):
        return self._bbox_loss(
            pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores * self.weights[..., None], *rest
        )
