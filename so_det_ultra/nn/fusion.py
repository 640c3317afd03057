"""Feature fusion for SO-Det's cross-layer weighted architecture (CLWA): EAFusion and WeightedConcat.

Sources:
    SO-Det (README and official code github magic524/SO-Det, ``models/nn/EAFusion.py``): EAFusion = enhanced
    content-guided attention (ECGA) fusion.
    DEA-Net (Chen et al., IEEE TIP 2024, sec. III-C, eqs. 7-10; code ``cga.py``/``fusion.py``): CGA channel, spatial and
    pixel attention and the ``w*x + (1-w)*y`` fusion. SimAM (Yang et al., ICML 2021, eq. 5). SWS (Conv followed by
    SimAM on spatial windows). BiFPN fast normalised fusion (Tan et al., CVPR 2020, sec. 3.3) for WeightedConcat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv

from so_det_ultra import channels
from so_det_ultra.registry import register_block


def _windows_ok(x: torch.Tensor, parts: int) -> None:
    h, w = x.shape[-2:]
    if parts < 1 or h % parts or w % parts:
        raise ValueError(f"SimAM with parts={parts} needs height and width divisible by parts, got {h}x{w}")


def simam_reference(x: torch.Tensor, parts: int = 1, lam: float = 1e-4) -> torch.Tensor:
    """SimAM (eq. 5) written as in the paper, on each of ``parts x parts`` windows: x * sigmoid(e),
    e = d / (4 (sum(d)/n + lam)) + 0.5, d = (x - mean)^2 over the window, n = window pixels - 1.
    """
    _windows_ok(x, parts)
    b, c, h, w = x.shape
    xq = x.reshape(b, c, parts, h // parts, parts, w // parts)
    d = (xq - xq.mean((3, 5), keepdim=True)).pow(2)
    n = (h // parts) * (w // parts) - 1
    e = d / (4 * (d.sum((3, 5), keepdim=True) / n + lam)) + 0.5
    return (xq * e.sigmoid()).reshape(b, c, h, w)


def _simam_window(x: torch.Tensor, lam: float) -> torch.Tensor:
    """SimAM over the whole map (see :func:`simam`): two-pass variance, 1 / (4 (sum(d)/n + lam)) as one small scale."""
    n = x.shape[-2] * x.shape[-1] - 1
    d = x - x.mean((2, 3), keepdim=True)
    d = d * d
    s = 0.25 / (d.sum((2, 3), keepdim=True) / n + lam)  # (B, C, 1, 1)
    return x * (d * s + 0.5).sigmoid()


def simam(x: torch.Tensor, parts: int = 1, lam: float = 1e-4) -> torch.Tensor:
    """SimAM (eq. 5) on each of ``parts x parts`` spatial windows; equal to :func:`simam_reference`.

    Each window is a 4-D slice reduced over its last two axes, and the energy's denominator is a (B, C, 1, 1) scale
    (d * s + 0.5 with s = 1 / (4 (sum(d)/n + lam))) instead of a full-size division; the reference reduces over axes 3
    and 5 of a 6-D view, which ONNX Runtime runs as strided reductions with layout reorders (slower: docs/models.md).
    The variance stays two-pass (mean first): single-pass forms such as InstanceNormalization lose precision in ONNX
    Runtime when a window's mean is large against its spread. ``parts=1`` is plain SimAM. H and W must divide by parts.
    """
    _windows_ok(x, parts)
    if parts == 1:
        return _simam_window(x, lam)
    rows = [torch.cat([_simam_window(q, lam) for q in r.chunk(parts, 3)], 3) for r in x.chunk(parts, 2)]
    return torch.cat(rows, 2)


def channel_max(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(1, keepdim=True)`` as a tree of element-wise maxima over channel halves (exactly equal).

    ONNX Runtime's ReduceMax across channels is strided and slow on large maps; log2(C) element-wise Max ops over
    contiguous halves are faster there (docs/models.md). An odd channel count folds its last channel into the first.
    """
    while x.shape[1] > 1:
        c, h = x.shape[1], x.shape[1] // 2
        m = torch.maximum(x[:, :h], x[:, h : 2 * h])
        if c % 2:  # no empty slice m[:, 1:] when h == 1: NCNN's Crop layer crashes on an empty blob
            first = torch.maximum(m[:, :1], x[:, 2 * h :])
            x = torch.cat((first, m[:, 1:]), 1) if h > 1 else first
        else:
            x = m
    return x


@register_block(channels=channels.same)
class SimAM(nn.Module):
    """Parameter-free attention SimAM (Yang et al., ICML 2021, eq. 5), optionally per ``parts x parts`` windows."""

    def __init__(self, channels: int = 0, parts: int = 1, lam: float = 1e-4):
        super().__init__()
        self.parts, self.lam = parts, lam

    def forward(self, x):
        return simam(x, self.parts, self.lam)

    def forward_reference(self, x):
        return simam_reference(x, self.parts, self.lam)


@register_block(channels=channels.scaled)
class SWSConv(nn.Module):
    """Conv_SWS: 1x1 Conv (no bias) -> BN -> act, then SimAM on each of 2x2 spatial quadrants (SO-Det's EAFusion tail).

    Interpretation: "SWS" windows are the 2x2 quadrants of the map (``parts=2``); configurable.
    """

    def __init__(self, c1: int, c2: int, parts: int = 2):
        super().__init__()
        self.conv = Conv(c1, c2, 1)
        self.parts = parts

    def forward(self, x):
        return simam(self.conv(x), self.parts)

    def forward_reference(self, x):
        return simam_reference(self.conv(x), self.parts)


@register_block(channels=channels.same)
class CGAChannelAttention(nn.Module):
    """CGA channel attention (DEA-Net eq. 7, no sigmoid): GAP -> 1x1 C->C/r (bias) -> ReLU -> 1x1 C/r->C (bias)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        return self.fc(x.mean((2, 3), keepdim=True))


@register_block(channels=channels.same)
class CGASpatialAttention(nn.Module):
    """CGA spatial attention (DEA-Net eq. 8, no sigmoid): [mean_c, max_c] -> 7x7 conv 2->1 (reflect pad, bias).

    The channel mean is computed as a 1x1 convolution with weights 1/C (same maths; it runs as one fast Conv in
    ONNX Runtime/TensorRT instead of a ReduceMean across channels) and the channel max as a tree of element-wise
    maxima (:func:`channel_max`); :meth:`forward_reference` is the plain form.
    """

    def __init__(self, channels: int = 0, k: int = 7):
        super().__init__()
        self.c = channels  # 0 = unknown: plain ReduceMean
        self.conv = nn.Conv2d(2, 1, k, padding=k // 2, padding_mode="reflect")

    def forward(self, x):
        mean = F.conv2d(x, x.new_full((1, self.c, 1, 1), 1.0 / self.c)) if self.c else x.mean(1, keepdim=True)
        return self.conv(torch.cat((mean, channel_max(x)), 1))

    def forward_reference(self, x):
        return self.conv(torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1))


@register_block(channels=channels.same)
class CGAPixelAttention(nn.Module):
    """CGA pixel attention (DEA-Net eq. 9): sigmoid(GroupConv_7x7(interleave(x, p))), groups=C, reflect pad, bias.

    The reference interleaves channels (x_0, p_0, x_1, p_1, ...) into 2C and runs a grouped 2C->C conv. A grouped conv
    over interleaved pairs is the sum of two depthwise convs, one per member of the pair, so :meth:`forward` does that
    without the interleave copy; :meth:`forward_interleaved` is the reference (same weights, same result).
    :meth:`forward_factored` goes further for EAFusion, where p = s * c or s + c with a one-channel spatial map s
    and a per-channel vector c: the depthwise conv of p is then c * conv(s) (or conv(s) + c * sum(w)), so the C-channel
    p is never built or padded.
    """

    def __init__(self, channels: int, k: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, k, padding=k // 2, padding_mode="reflect", groups=channels)

    def _pad(self, t):
        p = self.conv.kernel_size[0] // 2
        return F.pad(t, (p, p, p, p), mode="reflect")

    def forward(self, x, p):
        w, c = self.conv.weight, self.conv.out_channels
        y = F.conv2d(self._pad(x), w[:, :1], None, groups=c) + F.conv2d(
            self._pad(p), w[:, 1:], self.conv.bias, groups=c
        )
        return y.sigmoid()

    def forward_factored(self, x, s, c, add: bool = False):
        """Same as ``forward(x, s * c)`` (or ``forward(x, s + c)`` with ``add``) for s (B,1,H,W) and c (B,C,1,1)."""
        w, n = self.conv.weight, self.conv.out_channels
        y = F.conv2d(self._pad(x), w[:, :1], self.conv.bias, groups=n)
        z = F.conv2d(self._pad(s), w[:, 1:])  # one input channel, C output channels
        y = y + z + c * w[:, 1:].sum((1, 2, 3)).view(1, -1, 1, 1) if add else y + c * z
        return y.sigmoid()

    def forward_interleaved(self, x, p):
        b, c, h, w = x.shape
        return self.conv(torch.stack((x, p), 2).reshape(b, 2 * c, h, w)).sigmoid()


@register_block(channels=channels.equal_inputs)
class EAFusion(nn.Module):
    """Enhanced Attention Fusion (SO-Det EAFusion / ECGA) of a backbone map x and a neck map y with equal channels.

    Source: SO-Det official ``EAFusion`` (github magic524/SO-Det ``models/nn/EAFusion.py``), built on DEA-Net's CGA
    fusion (eqs. 7-10)::

        i     = x + y
        p1    = SA(i) * CA(i)            (combine="mul", SO-Det; DEA-Net adds: combine="add")
        p2    = PA(i, p1)                (sigmoid inside)
        out   = act(w0 * i + p2 * x + (1 - p2) * y),  w0 learnable scalar (init 1.0)
        out   = SWSConv(out)             (1x1 Conv-BN-act, then SimAM per 2x2 quadrant)

    Interpretations: ``act`` is the model's activation (``activation:`` in the YAML; SiLU by default, as released);
    a single sigmoid on PA (the released code removed a second one); CA reduction 8.

    Args:
        channels (int): Channels of both inputs and of the output. reduction (int): CA reduction.
        combine (str): "mul" or "add" for p1. parts (int): SimAM windows per side in SWSConv.

    Examples:
        >>> m = EAFusion(32)
        >>> m([torch.randn(1, 32, 16, 16), torch.randn(1, 32, 16, 16)]).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(self, channels: int, reduction: int = 8, combine: str = "mul", parts: int = 2):
        super().__init__()
        if combine not in {"mul", "add"}:
            raise ValueError(f"EAFusion combine must be 'mul' or 'add', got {combine!r}")
        self.add = combine == "add"
        self.ca = CGAChannelAttention(channels, reduction)
        self.sa = CGASpatialAttention(channels)
        self.pa = CGAPixelAttention(channels)
        self.w0 = nn.Parameter(torch.tensor(1.0))
        self.act = Conv.default_act
        self.sws = SWSConv(channels, channels, parts)

    def forward(self, xs):
        x, y = xs
        i = x + y
        p2 = self.pa.forward_factored(i, self.sa(i), self.ca(i), self.add)  # = PA(i, SA(i) * CA(i))
        return self.sws(self.act(self.w0 * i + y + p2 * (x - y)))  # = w0 i + p2 x + (1 - p2) y, one pass fewer

    def forward_reference(self, xs):
        """The formula as written (builds p1 = SA(i) * CA(i) explicitly); equal to :meth:`forward`."""
        x, y = xs
        i = x + y
        p1 = self.sa.forward_reference(i) + self.ca(i) if self.add else self.sa.forward_reference(i) * self.ca(i)
        p2 = self.pa.forward_interleaved(i, p1)
        return self.sws.forward_reference(self.act(self.w0 * i + p2 * x + (1 - p2) * y))


def weighted_concat_channels(spec):
    """Channel rule of :class:`WeightedConcat`: output channels are the inputs' sum; initial weights from the row.

    Row forms (``args``): ``[]`` (all weights 1, the earlier form), ``[1]`` (Concat-style dimension, must be 1),
    ``[1, [w_1, ..., w_k]]`` (one initial weight per input, in ``from`` order) and the keyword forms
    ``[{weights: [...]}]`` / ``[1, {weights: [...]}]``.
    """
    cs, args = spec.c_ins(), list(spec.args)
    if args and not isinstance(args[0], (list, tuple, dict)):
        if args.pop(0) != 1:
            spec.fail(f"concatenates along channels only: the dimension must be 1, got args={spec.args}")
    init = args.pop(0) if args else None
    if isinstance(init, dict):
        if set(init) - {"weights"}:
            spec.fail(f"the only keyword is `weights`, got {sorted(init)}")
        init = init.get("weights")
    numbers = isinstance(init, (list, tuple)) and all(isinstance(v, (int, float)) for v in init)
    if args or not (init is None or (numbers and len(init) == len(cs))):
        spec.fail(
            f"expected [], [1] or [1, [one initial weight per input]] ({len(cs)} inputs, from={spec.f}), "
            f"got args={spec.args}"
        )
    return sum(cs), [cs, None if init is None else [float(v) for v in init]], spec.n


@register_block(channels=weighted_concat_channels)
class WeightedConcat(nn.Module):
    """Concatenate inputs after scaling each by a learnable, non-negative, normalised weight (SO-Det CLWA links).

    w_i = (relu(v_i) + eps) / sum_j (relu(v_j) + eps); out = cat_i(w_i * x_i) along channels.

    Source: SO-Det CLWA (README, github magic524/SO-Det); the class was not released, so the form is an
    interpretation: BiFPN's fast normalised fusion (Tan et al., CVPR 2020, eq. 3) applied before concatenation.
    ``eps`` is added per weight, so the weights always sum to exactly 1, even when every v_i is negative. ``init``
    sets v (default all ones); the model YAML gives it as ``[1, [v_1, ..., v_k]]`` (:func:`weighted_concat_channels`).

    Initial weights of SO-Det: the official ``models/SO-Det.py`` builds ``WeightedConcat(dimension=1, weights=[1,
    3])`` (line 43) and calls it on ``[z1, y1, x2]`` (line 73: the neck's downsampled P2, the neck's P3 and the
    backbone's P3, our rows 15, 11 and 4). The two weights do not match the three inputs, and the next ``C3k2``
    expects ``768 * width`` input channels (line 44), the width of two inputs (256w + 512w, the backbone P3 being one
    of them). Interpretation: the backbone's cross-layer link gets 3 and each neck input 1, ``[1, [1.0, 1.0, 3.0]]``
    in ``cfg/models/so-det.yaml``; all three inputs are concatenated, as the official forward passes them (line 73).

    Args:
        channels (list[int]): Channels of each input (output channels are their sum). init (list[float] | None).

    Examples:
        >>> WeightedConcat([8, 16])([torch.randn(1, 8, 4, 4), torch.randn(1, 16, 4, 4)]).shape
        torch.Size([1, 24, 4, 4])
    """

    def __init__(self, channels: list, init: list | None = None, eps: float = 1e-4):
        super().__init__()
        init = [1.0] * len(channels) if init is None else [float(v) for v in init]
        if len(init) != len(channels):
            raise ValueError(f"WeightedConcat got {len(channels)} inputs but {len(init)} initial weights")
        self.weight = nn.Parameter(torch.tensor(init))
        self.eps = eps

    def normalized_weights(self) -> torch.Tensor:
        w = self.weight.relu() + self.eps
        return w / w.sum()

    def forward(self, xs):
        w = self.normalized_weights()
        return torch.cat([w[k] * x for k, x in enumerate(xs)], 1)


@register_block(channels=channels.equal_inputs)
class Sum(nn.Module):
    """Element-wise sum of inputs with equal channels: the plain-fusion baseline for EAFusion in ablations."""

    def __init__(self, channels: int = 0):
        super().__init__()

    def forward(self, xs):
        return torch.stack(list(xs), 0).sum(0)
