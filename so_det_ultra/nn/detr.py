"""RT-DETR decoder that hands the Better Sampling losses their inputs: sampling offsets, attention weights, SR weights.

Source: Huang, Zhang, Jin, Wu, Liu and Jin, "Better Sampling, towards Better End-to-end Small Object Detection",
sec. 4 (docs/detr.md). The losses live in :mod:`so_det_ultra.losses.better_sampling`; this module only *exposes*
training-time tensors of Ultralytics' ``RTDETRDecoder`` and holds the one trainable part of the method, SR's weight
generator (paper eqs. 16-18, Fig. 4).

- :class:`SamplingRTDETRDecoder` is ``RTDETRDecoder`` unchanged at inference (same parameters, same graph, same
  outputs; ONNX export and ``YOLO``/``RTDETR`` dispatch behave as for the stock head). In training, forward hooks that
  exist only for the duration of one forward call record, per decoder layer, the raw outputs of each deformable
  cross-attention's ``sampling_offsets`` and ``attention_weights`` projections (still in the autograd graph, so losses
  on them train those projections) and the hidden features of the score and box heads. The records travel with the
  training outputs, as ``dn_meta["sampling"]`` (the denoising metadata that ``RTDETRDetectionModel.loss`` passes to
  the criterion); nothing is kept on the module.
- :class:`SampleWeightGenerator` is SR's weight generator. It is built only when the decoder's YAML row switches SR on
  (``{sr: true}``), runs only in training, and is never part of the inference graph, so exported models do not grow
  because of it (a test compares ONNX initializer counts).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from ultralytics.nn.modules import Conv, RTDETRDecoder

from so_det_ultra.registry import LayerSpec, register_block

# RTDETRDecoder's constructor arguments after (nc, ch), in order, as the YAML row and `decoder_scales:` name them.
DECODER_ARGS = (
    "hd",
    "nq",
    "ndp",
    "nh",
    "ndl",
    "d_ffn",
    "dropout",
    "act",
    "eval_idx",
    "nd",
    "label_noise_ratio",
    "box_noise_scale",
    "learnt_init_query",
)


# Keyword options of the decoder's YAML row (a mapping as its last argument), with their defaults.
DECODER_OPTIONS = {"sr": False, "sr_detach": True}
SAMPLING_KEY = "sampling"  # key of the sampling records in the training-time dn_meta


def decoder_channels(spec: LayerSpec):
    """Channel rule for :class:`SamplingRTDETRDecoder`: ``[nc, hd, nq, ..., {sr: true}]`` as for ``RTDETRDecoder``.

    Like Ultralytics' own branch for ``RTDETRDecoder``, the list of input channels is inserted as the second argument.
    Two so-det-ultra extensions:

    - a model-YAML key ``decoder_scales: {<scale>: {hd: 256, ndl: 3, ...}}`` overrides decoder arguments per scale
      (RT-DETR's r18 variant has 3 decoder layers, its x variant a 384-wide decoder); names as in :data:`DECODER_ARGS`;
    - a mapping as the row's last argument sets the options of :data:`DECODER_OPTIONS`: ``sr`` builds SR's weight
      generator, ``sr_detach`` stops its gradient into the decoder's features, e.g. ``[nc, 256, 500, {sr: true}]``.
    """
    if not spec.args:
        spec.fail("needs at least the number of classes, e.g. args=[nc]")
    opts = spec.args[-1] if isinstance(spec.args[-1], dict) else {}
    if set(opts) - set(DECODER_OPTIONS):
        spec.fail(f"the options mapping takes the keys {sorted(DECODER_OPTIONS)}, got {opts!r}")
    nc, rest = spec.args[0], list(spec.args[1 : len(spec.args) - bool(opts)])
    if len(rest) > len(DECODER_ARGS):
        spec.fail(f"takes at most {len(DECODER_ARGS) + 1} arguments (nc, {', '.join(DECODER_ARGS)}), got {spec.args}")
    defaults = dict(zip(DECODER_ARGS, (256, 300, 4, 8, 6, 1024, 0.0, None, -1, 100, 0.5, 1.0, False)))
    kw = {**defaults, **dict(zip(DECODER_ARGS, rest))}
    table = spec.yaml.get("decoder_scales") or {}
    over = table.get(str(spec.scale), {})
    if not isinstance(over, dict) or set(over) - set(DECODER_ARGS):
        spec.fail(f"decoder_scales.{spec.scale} must map names from {DECODER_ARGS} to values, got {over!r}")
    kw.update(over)
    opts = {**DECODER_OPTIONS, **opts}
    args = [nc, spec.c_ins(), *(kw[k] for k in DECODER_ARGS), bool(opts["sr"]), bool(opts["sr_detach"])]
    return kw["hd"], args, 1


class SampleWeightGenerator(nn.Module):
    """SR weight generator (paper sec. 4.3, eqs. 16-18, Fig. 4): per-query weights ``w_cls``, ``w_reg`` in [0.5, 1).

    ::

        A     = sigmoid(BN-ReLU(Conv1(cat(H_reg, H_cls))))       Conv1: C x 2C x 1 x 1
        w_cls = sigmoid(BN-ReLU(Conv3_cls(H_cls * Conv2(A))))      Conv2: C x C x 1 x 1, Conv3: 1 x C x 1 x 1
        w_reg = sigmoid(BN-ReLU(Conv3_reg(H_reg * Conv2(A))))

    Queries are laid out as the spatial axis of a (1, C, M, 1) map, so each conv is a 1x1 conv per query and BN
    normalises over all M queries of the batch (always > 1 of them). Built from Ultralytics ``Conv`` (conv + BN + act).

    Interpretation: Fig. 4 lists three kernels; we give the two tasks their own ``Conv3`` (the paper writes
    "w_reg likewise") and share Conv1/Conv2. ``sigmoid(ReLU(.))`` puts every weight in [0.5, 1): the paper's form,
    kept, since it bounds how much SR can discount a positive.

    Args:
        c (int): Hidden width of the decoder (H_cls and H_reg have c channels).
        detach (bool): Stop gradients from SR into the decoder's features (the generator itself is still trained).

    Example:
        >>> g = SampleWeightGenerator(256)
        >>> g(torch.randn(2, 300, 256), torch.randn(2, 300, 256)).shape
        torch.Size([2, 300, 2])
    """

    def __init__(self, c: int, detach: bool = True):
        super().__init__()
        self.shared = Conv(2 * c, c, 1, act=nn.ReLU())
        self.mix = nn.Conv2d(c, c, 1)
        self.cls = Conv(c, 1, 1, act=nn.ReLU())
        self.reg = Conv(c, 1, 1, act=nn.ReLU())
        self.detach = detach

    def forward(self, h_cls: torch.Tensor, h_reg: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden features of the score and box heads -> (..., 2) weights ``[w_cls, w_reg]``."""
        lead, c = h_cls.shape[:-1], h_cls.shape[-1]
        hc, hr = (h.detach() if self.detach else h for h in (h_cls, h_reg))
        hc, hr = (h.reshape(1, -1, c).transpose(1, 2).unsqueeze(-1) for h in (hc, hr))  # (1, C, M, 1)
        a = self.mix(self.shared(torch.cat([hr, hc], 1)).sigmoid())
        w = torch.cat([self.cls(hc * a), self.reg(hr * a)], 1).sigmoid()  # (1, 2, M, 1)
        return w[0, :, :, 0].transpose(0, 1).reshape(*lead, 2)


@register_block(channels=decoder_channels)
class SamplingRTDETRDecoder(RTDETRDecoder):
    """Ultralytics ``RTDETRDecoder`` that returns, in training only, what the Better Sampling losses need.

    YAML: ``[[P2, P3, P4], 1, SamplingRTDETRDecoder, [nc, hd, nq, ndp, nh, ndl, d_ffn]]`` (any suffix of the stock
    ``RTDETRDecoder`` arguments may be omitted), optionally ending with ``{sr: true, sr_detach: true}``. Identical to
    ``RTDETRDecoder`` in eval/export mode.

    In training the output is the stock ``(dec_bboxes, dec_scores, enc_bboxes, enc_scores, dn_meta)``; whenever the
    batch has denoising groups (every batch with at least one object, unless ``nd=0``), ``dn_meta`` also holds
    ``dn_meta["sampling"]`` (``ndl`` = decoder layers, ``N`` = denoising + object queries)::

        offsets   (ndl, B, N, nh, nl * ndp, 2)  raw sampling_offsets output; a point is at
                                               ref_xy + offsets / ndp * ref_wh / 2 (RT-DETR's 4-d reference boxes)
        attn      (ndl, B, N, nh, nl * ndp)     attention logits (softmax over the last axis gives A of paper eq. 1)
        sr_w      (ndl, B, N, 2) or None        SR weights [w_cls, w_reg] (only when SR is on)

    A batch without objects has no denoising groups and ``dn_meta`` stays ``None``, as in the stock decoder (so
    Ultralytics' own RT-DETR loss, which reads ``dn_meta is None`` as "no denoising", keeps working); SR and SPR act
    on matched positives only, so such a batch has nothing for them to do.

    Args: as ``RTDETRDecoder``, plus
        sr (bool): Build SR's :class:`SampleWeightGenerator` (training-only parameters).
        sr_detach (bool): See :class:`SampleWeightGenerator`.
    """

    def __init__(
        self,
        nc=80,
        ch=(512, 1024, 2048),
        hd=256,
        nq=300,
        ndp=4,
        nh=8,
        ndl=6,
        d_ffn=1024,
        dropout=0.0,
        act=None,
        eval_idx=-1,
        nd=100,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        learnt_init_query=False,
        sr=False,
        sr_detach=True,
    ):
        super().__init__(
            nc,
            ch,
            hd,
            nq,
            ndp,
            nh,
            ndl,
            d_ffn,
            dropout,
            act,
            eval_idx,
            nd,
            label_noise_ratio,
            box_noise_scale,
            learnt_init_query,
        )
        self.sr_gen = SampleWeightGenerator(hd, sr_detach) if sr else None

    def forward(self, x, batch=None):
        """Stock forward; in training, the sampling records are added to ``dn_meta`` (see class docstring)."""
        if not self.training:
            return super().forward(x, batch)
        with self._record() as rec:
            *out, dn_meta = super().forward(x, batch)
        if dn_meta is None:
            return (*out, None)
        h_cls, h_reg = torch.stack(rec["h_cls"]), torch.stack(rec["h_reg"])
        sr_w = self.sr_gen(h_cls, h_reg) if self.sr_gen is not None else None
        sampling = {"offsets": torch.stack(rec["offsets"]), "attn": torch.stack(rec["attn"]), "sr_w": sr_w}
        return (*out, {**dn_meta, SAMPLING_KEY: sampling})

    @contextlib.contextmanager
    def _record(self):
        """Forward hooks on every decoder layer, alive only inside the ``with`` block."""
        rec = {k: [] for k in ("offsets", "attn", "h_cls", "h_reg")}
        handles = []
        for i, layer in enumerate(self.decoder.layers):
            ca = layer.cross_attn
            n_heads, n_pts = ca.n_heads, ca.n_levels * ca.n_points

            def keep(key, shape):
                return lambda m, args, out: rec[key].append(out.view(*out.shape[:2], *shape))

            handles += [
                ca.sampling_offsets.register_forward_hook(keep("offsets", (n_heads, n_pts, 2))),
                ca.attention_weights.register_forward_hook(keep("attn", (n_heads, n_pts))),
                self.dec_score_head[i].register_forward_pre_hook(lambda m, args: rec["h_cls"].append(args[0])),
                self.dec_bbox_head[i]
                .layers[-1]
                .register_forward_pre_hook(lambda m, args: rec["h_reg"].append(args[0])),
            ]
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()
