"""Better Sampling for RT-DETR: scale-aligned target (ST), sample reweighting (SR), sample point refinement (SPR).

Source: Huang, Zhang, Jin, Wu, Liu and Jin, "Better Sampling, towards Better End-to-end Small Object Detection",
sec. 4, eqs. 5-22 (summary and our readings in docs/detr.md). Switched on and tuned from the model YAML (the shared
``loss:`` mechanism, ``so_det_ultra/losses/config.py``); a switch that is absent (or ``false``) is off, ``true``
takes the defaults::

    loss:
      type: BetterSampling
      st: {beta: 0.73, theta: 6.0, s: predicted}        # eqs. 12-15 (s: predicted | target)
      sr: {alpha: 0.5, gamma: 1.5}                       # eqs. 16-21
      spr: {eta: [1.5, 1.3, 1.2, 1.1, 1.05, 1.0], w_offset: 1.0, w_atten: 1.0}   # eqs. 5-6

With no switch on, :class:`BetterSampling` equals Ultralytics' ``RTDETRDetectionLoss(nc, use_vfl=True)`` (a test).
ST works on any RT-DETR; SR and SPR need the decoder to be :class:`~so_det_ultra.nn.detr.SamplingRTDETRDecoder`, which
returns its sampling records in ``dn_meta["sampling"]``; SR also needs the generator built by the decoder's YAML row
(``[..., SamplingRTDETRDecoder, [nc, ..., {sr: true}]]``). The formulas are plain functions
(:func:`scale_aligned_target`, :func:`sample_reweight`, :func:`spr_losses`) so they can be tested on hand-computed
values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ultralytics.models.utils.loss import RTDETRDetectionLoss
from ultralytics.utils.metrics import bbox_iou

from so_det_ultra.nn.detr import SAMPLING_KEY, SamplingRTDETRDecoder
from so_det_ultra.registry import register_loss

ST_DEFAULTS = {"beta": 0.73, "theta": 6.0, "s": "predicted"}
ST_S = ("predicted", "target")  # what ``s`` of eq. 15 is: the predicted confidence (eqs. 2, 19) or the target (1)
SR_DEFAULTS = {"alpha": 0.5, "gamma": 1.5}
SPR_DEFAULTS = {"eta": (1.5, 1.3, 1.2, 1.1, 1.05, 1.0), "w_offset": 1.0, "w_atten": 1.0}


def scale_aligned_target(
    pred_xywh: torch.Tensor,
    gt_xywh: torch.Tensor,
    beta: float = 0.73,
    theta: float = 6.0,
    s: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """ST target score (paper eqs. 7-15): ``t = u^beta * v^(1 - beta) * s``.

    ``u = IoU(pred, gt)``, ``rho = area(pred) / area(gt)``, ``v = exp(-theta * (sqrt(rho) - 1)^2)``.

    ``s`` of eq. 15 is the prediction confidence: eq. 2 defines ``s_i = H^cls(z_i)``, the classification head's
    output for query ``i``, and sec. 4.3 (eq. 19) calls ``s`` "prediction confidence" beside the target confidence
    ``t``. :class:`BetterSampling` passes the predicted probability of the object's class (``st: {s: predicted}``,
    the default), detached. ``st: {s: target}`` passes ``s = 1`` (the classification target), an earlier reading
    in which ``beta = 1`` gives ``t = IoU``, the IoU-aware varifocal target of Ultralytics' RT-DETR. Either way
    ``t <= s``.

    Args:
        pred_xywh (torch.Tensor): (N, 4) predicted boxes, normalised xywh. gt_xywh (torch.Tensor): (N, 4) matched gts.
        beta (float): Weight of IoU vs. scale agreement, in [0, 1]. theta (float): Sharpness of the scale term (>= 0).
        s (float | torch.Tensor): Prediction confidence per row (N,), or a scalar (1 for the target reading).

    Returns:
        (torch.Tensor): (N,) targets in [0, s], without gradient.
    """
    pred_xywh, gt_xywh = pred_xywh.detach(), gt_xywh.detach()
    u = bbox_iou(pred_xywh, gt_xywh, xywh=True).squeeze(-1).clamp(0, 1)
    rho = pred_xywh[:, 2:].prod(-1).clamp(min=0) / gt_xywh[:, 2:].prod(-1).clamp(min=1e-12)
    v = torch.exp(-theta * (rho.sqrt() - 1) ** 2)
    s = s.detach() if isinstance(s, torch.Tensor) else s
    return u.pow(beta) * v.pow(1 - beta) * s


def sample_reweight(w: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """SR weight (paper eq. 19): ``r = w^(1 - |t - s|)``; ``r = w`` when ``t = s``, ``r -> 1`` as ``|t - s| -> 1``.

    Args:
        w (torch.Tensor): Generator weights in (0, 1]. t (torch.Tensor): Targets. s (torch.Tensor): Predicted
            confidences (sigmoid of the object class's logit); ``|t - s|`` carries no gradient.
    """
    return w.pow(1 - (t - s).detach().abs())


def spr_losses(offsets: torch.Tensor, attn_logits: torch.Tensor, eta: float, n_points: int):
    """SPR losses of positive queries at one decoder layer (paper eqs. 5-6), per query.

    A sampling point of RT-DETR's deformable attention sits at ``ref_xy + offsets / n_points * ref_wh / 2``, where
    ``ref`` is the box the previous layer predicted for that query (paper: "w_i, h_i ... of the previous layer"). In
    units of that box the point is at ``d = offsets / (2 * n_points)``; it is inside the box iff
    ``|d_x|, |d_y| <= 1/2``.

    ::

        L_offset(i) = mean_{m,l,k} ( sum_{x,y} max(|d_milk| - eta / 2, 0) )^2            (0 for points inside the box)
        L_atten(i)  = mean_{m,l,k} 1[milk outside] * max(A_milk - max_{k' inside, same m, l} A_mil k', 0)

    Interpretation: eq. 5 writes ``||dp - eta [w, h]||_1^2``; read literally it pulls every outside point towards one
    fixed corner. We read it as the paper's text and Fig. 2 describe it: outside points are pulled back to the box
    enlarged by ``eta`` (a buffer; points within it cost nothing), per axis, measured in units of the box size (so
    small objects are not ignored), squared L1 as written. Both sums are averaged over the ``nh * nl * ndp`` points
    of a query (the caller averages over positives). In eq. 6 a (head, level) without any point inside the box adds
    nothing (there is no ``max A_in`` to compare with). ``eta >= 1`` so points inside the box are never penalised.

    Args:
        offsets (torch.Tensor): (P, nh, nl * ndp, 2) raw ``sampling_offsets`` outputs of P positive queries.
        attn_logits (torch.Tensor): (P, nh, nl * ndp) raw ``attention_weights`` outputs (softmax over the last axis).
        eta (float): Expansion of the box for this layer. n_points (int): Sampling points per head and level (ndp).

    Returns:
        (tuple[torch.Tensor, torch.Tensor]): (P,) L_offset and (P,) L_atten.
    """
    d = offsets / (2 * n_points)
    excess = (d.abs() - eta / 2).clamp(min=0).sum(-1)  # (P, nh, nl*ndp); 0 inside the eta-box
    l_offset = excess.pow(2).flatten(1).mean(1)
    a = attn_logits.softmax(-1)
    inside = (d.detach().abs() <= 0.5).all(-1)  # (P, nh, nl*ndp)
    p, nh, lp = a.shape
    a_lvl, in_lvl = a.view(p, nh, -1, n_points), inside.view(p, nh, -1, n_points)
    max_in = a_lvl.masked_fill(~in_lvl, -1.0).amax(-1, keepdim=True)
    max_in = torch.where(max_in < 0, torch.ones_like(max_in), max_in)  # no inside point: no loss for that level
    l_atten = ((a_lvl - max_in).clamp(min=0) * (~in_lvl)).flatten(1).mean(1)
    return l_offset, l_atten


def _switch(value, defaults: dict, name: str) -> dict | None:
    """``None``/``False`` -> off; ``True`` -> defaults; mapping -> defaults updated (unknown keys raise)."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(defaults)
    if name == "sr" and isinstance(value, dict) and "detach_features" in value:
        raise ValueError(
            "BetterSampling `sr: detach_features` is an option of the decoder now, not of the loss: write it in the "
            "decoder's YAML row, e.g. `[nc, ..., {sr: true, sr_detach: false}]`"
        )
    if not isinstance(value, dict) or set(value) - set(defaults):
        raise ValueError(
            f"BetterSampling `{name}:` must be true/false or a mapping with keys {sorted(defaults)}, got {value!r}"
        )
    return {**defaults, **value}


@register_loss
class BetterSampling(RTDETRDetectionLoss):
    """Ultralytics' RT-DETR loss (Hungarian matching, VFL, L1 + GIoU, denoising) with Better Sampling's ST, SR, SPR.

    Per prediction layer (encoder top-k, each decoder layer, each denoising layer), with matched positives ``i``,
    their target ``t_i`` and ``num_gts`` objects in the batch::

        L_cls = [ sum_pos q_i BCE(p_i, t_i) + alpha sum_neg p^gamma BCE(p, 0) ] / num_gts * gain_class     (VFL)
        L_l1  = sum_pos r_reg,i |b_i - b^_i|_1 / num_gts * gain_bbox,   L_giou likewise * gain_giou

    - **ST** (``st``): ``t_i`` = :func:`scale_aligned_target` instead of IoU; ``q_i = t_i`` (eq. 15 in VFL, eq. 3),
      with ``s`` the positive's predicted probability of its object's class (``st.s: predicted``, default) or 1
      (``st.s: target``).
    - **SR** (``sr``): positives' ``q_i = r_cls,i`` and box terms weighted by ``r_reg,i`` (eqs. 19-21), on the
      decoder layers' object queries; negatives keep ``alpha p^gamma`` with the paper's ``alpha = 0.5, gamma = 1.5``
      (everywhere, as the paper's Table 6 tunes them with SR). Without SR, ``r = 1`` and Ultralytics'
      ``alpha = 0.25``.
    - **SPR** (``spr``): adds ``w_offset * L_offset + w_atten * L_atten`` (:func:`spr_losses`), averaged over each
      decoder layer's positive object queries and summed over decoder layers; ``eta[j]`` for layer ``j``.

    The sampling records SR and SPR need (offsets, attention logits, SR weights) come with the predictions, in
    ``dn_meta["sampling"]`` (see :class:`~so_det_ultra.nn.detr.SamplingRTDETRDecoder`); a batch without them (no
    objects, so no denoising groups and no positives) gets the ST/VFL terms only.

    Interpretation (SR): the paper does not say how the generator learns. Here its parameters get the gradient of the
    reweighted loss (``r`` is not detached; ``|t - s|`` is), and its inputs ``H_cls``/``H_reg`` are detached
    (the decoder row's ``sr_detach``, default true), so SR cannot reshape the detector's features. Since
    ``w = sigmoid(ReLU(.)) >= 0.5`` the generator can discount an easy positive at most 2x. ``H_cls`` is the decoder
    layer's output (the input of Ultralytics' one-layer score head) and ``H_reg`` the last hidden activation of the box
    MLP. ``s`` of eq. 19 is the predicted probability of the object's class.
    Interpretation (SPR): only the object queries' positives (not denoising queries); if ``eta`` has more entries than
    the decoder has layers, the *last* ``ndl`` are used (the final layer keeps eta = 1.0).
    Extra keys ``loss_offset``/``loss_atten`` are added to the returned dict (RT-DETR's model sums every key).

    Args:
        model: The RTDETRDetectionModel. st, sr, spr: switches (see module docstring).
        gains (dict): ``{class: 1, bbox: 5, giou: 2}`` (Ultralytics' defaults) weights of the stock terms.
    """

    def __init__(self, model, st=None, sr=None, spr=None, gains=None):
        self.st, self.sr, self.spr = (
            _switch(v, d, n)
            for v, d, n in ((st, ST_DEFAULTS, "st"), (sr, SR_DEFAULTS, "sr"), (spr, SPR_DEFAULTS, "spr"))
        )
        gains = {"class": 1.0, "bbox": 5.0, "giou": 2.0, **(gains or {})}
        a, g = (self.sr["alpha"], self.sr["gamma"]) if self.sr else (0.25, 1.5)
        head = model.model[-1]
        super().__init__(nc=head.nc, loss_gain=gains, use_vfl=True, gamma=g, alpha=a)
        self._check_head(head)
        self.ndl = head.num_decoder_layers  # the last ndl prediction layers are the decoder's
        if self.spr:
            self.eta = [float(e) for e in self.spr["eta"]][-self.ndl :]
            self.n_points = head.decoder.layers[0].cross_attn.n_points

    def _check_head(self, head):
        """The decoder can provide what the switches need; ValueError naming the YAML change otherwise."""
        if (self.sr or self.spr) and not isinstance(head, SamplingRTDETRDecoder):
            raise ValueError(
                f"BetterSampling sr/spr need the decoder to be SamplingRTDETRDecoder, got "
                f"{type(head).__name__}: replace RTDETRDecoder by SamplingRTDETRDecoder in the model YAML "
                "(same arguments), or use only `st`"
            )
        if self.sr and head.sr_gen is None:
            raise ValueError(
                "BetterSampling `sr` is on but the decoder was built without SR's weight generator: end the "
                "decoder's YAML row with `{sr: true}`, e.g. `- [[21, 17, 20], 1, SamplingRTDETRDecoder, "
                "[nc, 256, 500, {sr: true}]]`, and rebuild the model from the YAML"
            )
        if (self.sr or self.spr) and head.num_denoising <= 0:
            raise ValueError(
                "BetterSampling sr/spr read the decoder's sampling records from the denoising metadata, which exists "
                f"only with denoising queries; the decoder has nd={head.num_denoising}, set nd > 0 (RT-DETR: 100)"
            )
        if self.st and not (0 <= self.st["beta"] <= 1 and self.st["theta"] >= 0 and self.st["s"] in ST_S):
            raise ValueError(f"BetterSampling st needs 0 <= beta <= 1, theta >= 0 and s in {ST_S}, got {self.st}")
        if self.spr:
            eta, ndl = [float(e) for e in self.spr["eta"]], head.num_decoder_layers
            if len(eta) < ndl or min(eta) < 1:
                raise ValueError(
                    f"BetterSampling spr.eta needs >= {ndl} values (one per decoder layer), all >= 1; got {eta}"
                )

    def _target(self, pb: torch.Tensor, gb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Positives' target scores: ST's ``t`` (eq. 15) with ``s`` per ``st.s``, or plain IoU with ST off.

        Args:
            pb, gb (torch.Tensor): (n, 4) matched predicted and ground-truth boxes (xywh). logits (torch.Tensor): (n,)
                the positives' logits of their object's class.
        """
        if not self.st:
            return bbox_iou(pb.detach(), gb, xywh=True).squeeze(-1)
        s = logits.detach().float().sigmoid() if self.st["s"] == "predicted" else 1.0
        return scale_aligned_target(pb, gb, beta=self.st["beta"], theta=self.st["theta"], s=s)

    def forward(self, preds, batch, dn_bboxes=None, dn_scores=None, dn_meta=None):
        """Same inputs and outputs as ``RTDETRDetectionLoss.forward``, plus ``loss_offset``/``loss_atten`` with SPR.

        ``dn_meta["sampling"]``, when present, holds the decoder's sampling records for these predictions.
        """
        sampling = _object_queries((dn_meta or {}).get(SAMPLING_KEY), dn_meta)
        pred_bboxes, pred_scores = preds
        self.device = pred_bboxes.device
        gts = batch["cls"], batch["bboxes"], batch["gt_groups"]
        first_dec = len(pred_bboxes) - self.ndl  # encoder top-k layer(s) come first
        loss, spr = self._all_layers(pred_bboxes, pred_scores, gts, "", None, sampling, first_dec)
        if dn_meta is not None:
            match = self.get_dn_match_indices(dn_meta["dn_pos_idx"], dn_meta["dn_num_group"], dn_meta["dn_gt_idx"])
            loss.update(self._all_layers(dn_bboxes, dn_scores, gts, "_dn", match, None, 0)[0])
        else:
            loss.update({f"{k}_dn": torch.tensor(0.0, device=self.device) for k in loss})
        if self.spr:
            zero = pred_bboxes.sum() * 0
            loss["loss_offset"] = sum((x[0] for x in spr), zero) * self.spr["w_offset"]
            loss["loss_atten"] = sum((x[1] for x in spr), zero) * self.spr["w_atten"]
        return loss

    def _all_layers(self, bboxes, scores, gts, postfix, match_indices, sampling, first_dec):
        """Main (last layer) and auxiliary (summed over the others) terms, named as Ultralytics names them.

        Returns:
            (tuple[dict, list]): The loss terms, and the per-decoder-layer SPR terms ``(L_offset, L_atten)``.
        """
        out, aux, spr = {}, torch.zeros(3, device=self.device), []
        last = len(bboxes) - 1
        for k in [last, *range(last)] if self.aux_loss else [last]:
            layer = k - first_dec if sampling is not None and k >= first_dec else None
            terms, spr_k = self._layer_loss(bboxes[k], scores[k], gts, postfix, match_indices, sampling, layer)
            spr += [spr_k] if spr_k is not None else []
            if k == last:
                out.update(terms)
            else:
                aux += torch.stack([terms[f"loss_{n}{postfix}"] for n in ("class", "bbox", "giou")])
        if self.aux_loss:
            out.update({f"loss_{n}_aux{postfix}": aux[j] for j, n in enumerate(("class", "bbox", "giou"))})
        return out, spr

    def _layer_loss(self, pred_bboxes, pred_scores, gts, postfix, match_indices, sampling, layer):
        """One prediction layer: match, targets (ST), weights (SR), VFL + L1 + GIoU, and its SPR terms.

        Args:
            gts (tuple): ``(cls, bboxes, gt_groups)`` of the batch. sampling (dict | None): The decoder's records for
                the object queries. layer (int | None): Decoder layer index of this prediction layer (None: encoder
                top-k, denoising, or no records), selecting its records.

        Returns:
            (tuple[dict, tuple | None]): Loss terms, and ``(L_offset, L_atten)`` averaged over positives (SPR on and
            records present) or None.
        """
        gt_cls, gt_bboxes, gt_groups = gts
        if match_indices is None:
            match_indices = self.matcher(pred_bboxes, pred_scores, gt_bboxes, gt_cls, gt_groups)
        idx, gt_idx = self._get_index(match_indices)
        pb, gb, gc = pred_bboxes[idx], gt_bboxes[gt_idx], gt_cls[gt_idx]
        bs, nq, nc = pred_scores.shape
        n = len(gb)

        t = self._target(pb, gb, pred_scores[idx[0], idx[1], gc])
        one_hot = torch.zeros((bs, nq, nc), device=pred_scores.device)
        one_hot[idx[0], idx[1], gc] = 1.0
        q = torch.zeros((bs, nq, nc), device=pred_scores.device)
        q[idx[0], idx[1], gc] = t.to(q.dtype)
        pos_w, r_reg = q, None
        if self.sr and layer is not None and n:
            s = pred_scores[idx[0], idx[1], gc].sigmoid()
            r = sample_reweight(sampling["sr_w"][layer][idx], t[:, None], s[:, None])  # (n, 2): r_cls, r_reg
            pos_w = torch.zeros_like(q).index_put((idx[0], idx[1], gc), r[:, 0].to(q.dtype))
            r_reg = r[:, 1]
        if n:
            weight = self.vfl.alpha * pred_scores.sigmoid().pow(self.vfl.gamma) * (1 - one_hot) + pos_w * one_hot
            bce = F.binary_cross_entropy_with_logits(pred_scores.float(), q, reduction="none")
            loss_cls = (bce * weight).sum() / n
        else:
            loss_cls = self.fl(pred_scores, one_hot) * nq  # no objects: focal loss on all-negative targets, as stock
        losses = {f"loss_class{postfix}": loss_cls * self.loss_gain["class"]}

        if not n:
            losses[f"loss_bbox{postfix}"] = losses[f"loss_giou{postfix}"] = pred_bboxes[..., :0].sum()
            return losses, None
        l1 = (pb - gb).abs().sum(-1)
        giou = 1.0 - bbox_iou(pb, gb, xywh=True, GIoU=True).squeeze(-1)
        if r_reg is not None:
            l1, giou = l1 * r_reg, giou * r_reg
        losses[f"loss_bbox{postfix}"] = l1.sum() / n * self.loss_gain["bbox"]
        losses[f"loss_giou{postfix}"] = giou.sum() / n * self.loss_gain["giou"]

        if not (self.spr and layer is not None):
            return losses, None
        l_off, l_att = spr_losses(
            sampling["offsets"][layer][idx], sampling["attn"][layer][idx], self.eta[layer], self.n_points
        )
        return losses, (l_off.sum() / n, l_att.sum() / n)


def _object_queries(sampling: dict | None, dn_meta: dict | None) -> dict | None:
    """The sampling records of the object queries (the denoising queries come first and are dropped)."""
    if sampling is None:
        return None
    n_dn = dn_meta["dn_num_split"][0]
    return {k: None if v is None else v[:, :, n_dn:] for k, v in sampling.items()}
