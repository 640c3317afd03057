"""Downsampling without strided convolution: space-to-depth, ECA, and SO-Det's CDown.

Sources:
    SO-Det (README and official code github magic524/SO-Det ``models/nn/CDown.py``): CDown = stride-1 conv ->
    space-to-depth -> ECA. SPD-Conv (Sunkara & Luo, ECML-PKDD 2022, sec. 3): space-to-depth, then a non-strided conv.
    ECA-Net (Wang et al., CVPR 2020, sec. 3.3, eq. 12): adaptive 1-D kernel size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv

from so_det_ultra import channels
from so_det_ultra.registry import register_block


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel blocks ordered [(0,0), (1,0), (0,1), (1,1)] as (row, col) offsets.

    The order is the official SO-Det/SPD-Conv one: ``x[::2, ::2], x[1::2, ::2], x[::2, 1::2], x[1::2, 1::2]``.
    H and W must be even (an odd size would silently drop a row/column, so it is an error).
    """
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(
            f"space-to-depth needs even height and width, got {h}x{w}; use an input size that is a multiple of the "
            "model stride (Ultralytics rounds imgsz to it)"
        )
    return torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1)


def _spd_rule(spec):
    return 4 * spec.c_in(), list(spec.args), spec.n


@register_block(channels=_spd_rule)
class SpaceToDepth(nn.Module):
    """Space-to-depth as a YAML layer (no arguments): (B, C, H, W) -> (B, 4C, H/2, W/2). See :func:`space_to_depth`."""

    def forward(self, x):
        return space_to_depth(x)


def eca_kernel_size(c: int, b: int = 1, gamma: int = 2) -> int:
    """ECA-Net eq. 12: k = |(log2(C) + b) / gamma|, made odd (k + 1 when even)."""
    k = int(abs((math.log2(c) + b) / gamma))
    return k if k % 2 else k + 1


@register_block(channels=channels.same)
class ECA(nn.Module):
    """Efficient Channel Attention: GAP -> 1-D conv (kernel k(C), no bias) across channels -> sigmoid -> x * w.

    Source: ECA-Net (Wang et al., CVPR 2020), sec. 3.3. ``k=None`` picks the adaptive size of :func:`eca_kernel_size`.

    Examples:
        >>> ECA(64)(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(self, channels: int, k: int | None = None, b: int = 1, gamma: int = 2):
        super().__init__()
        k = k or eca_kernel_size(channels, b, gamma)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        w = self.conv(x.mean((2, 3)).unsqueeze(1)).sigmoid()  # (B, 1, C)
        return x * w.transpose(1, 2).unsqueeze(-1)


def _cdown_rule(spec):
    c2, args, n = channels.scaled(spec)
    if c2 % 4:
        spec.fail(f"CDown output channels must be a multiple of 4 (space-to-depth makes 4 copies), got {c2}")
    return c2, args, n


@register_block(channels=_cdown_rule)
class CDown(nn.Module):
    """Channel-Optimized Downsampling (SO-Det): halves H and W with a stride-1 conv, space-to-depth and ECA.

    Source: SO-Det README/abstract (github magic524/SO-Det) and official ``models/nn/CDown.py``. Two orders exist:

    - ``order="conv_first"`` (default; official code): Conv(c1 -> c2/4, k, s=1) -> space-to-depth (-> c2) -> ECA(c2).
    - ``order="spd_first"`` (SPD-Conv paper; how the SO-Det README text reads): space-to-depth (c1 -> 4 c1) ->
      Conv(4 c1 -> c2, k, s=1) -> ECA(c2). More parameters and FLOPs (the conv runs on 4x the channels).

    Interpretations: the released ``CDown`` convolves to c2 and outputs 4*c2; we output c2 (conv to c2/4), which is the
    reading that reproduces the README parameter counts (docs/models.md). Kernel ``k=3`` (the released default is 1;
    3 matches a drop-in replacement of the 3x3 stride-2 Conv). ECA's kernel is sized on the output channels.

    Speed: in ONNX export (``torch.onnx.is_in_onnx_export()``), a narrow ``conv_first`` CDown exports conv ->
    space-to-depth as one equal stride-2 conv (:meth:`forward_folded_conv`); :meth:`forward_reference` is the plain
    form.

    Args:
        c1 (int): Input channels. c2 (int): Output channels (multiple of 4). k (int): Conv kernel.
        order (str): See above.

    Examples:
        >>> CDown(32, 64)(torch.randn(1, 32, 16, 16)).shape
        torch.Size([1, 64, 8, 8])
    """

    def __init__(self, c1: int, c2: int, k: int = 3, order: str = "conv_first"):
        super().__init__()
        if order not in {"conv_first", "spd_first"}:
            raise ValueError(f"CDown order must be 'conv_first' or 'spd_first', got {order!r}")
        if c2 % 4:
            raise ValueError(f"CDown output channels must be a multiple of 4, got {c2}")
        self.spd_first = order == "spd_first"
        self.conv = Conv(4 * c1, c2, k, 1) if self.spd_first else Conv(c1, c2 // 4, k, 1)
        self.eca = ECA(c2)
        # ONNX export only: fold conv -> space-to-depth into one stride-2 conv when the stride-1 conv is narrow
        # (< 16 outputs, where ONNX Runtime's blocked CPU layout pads its channels and then reorders the full-res
        # map; slower for wider convs since the folded kernel has 16/9 of the MACs; figures: docs/models.md)
        self.fold_spd = not self.spd_first and c2 // 4 < 16 and k % 2 == 1

    def forward(self, x):
        if self.fold_spd and not self.training and torch.onnx.is_in_onnx_export():
            return self.eca(self.forward_folded_conv(x))
        return self.forward_reference(x)

    def forward_reference(self, x):
        x = self.conv(space_to_depth(x)) if self.spd_first else space_to_depth(self.conv(x))
        return self.eca(x)

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (c2, c1, k+1, k+1) and bias (c2,) of the stride-2 conv equal to conv_first's conv -> space-to-depth.

        Space-to-depth phase (dy, dx) of a stride-1 k x k conv (padding k//2) is a stride-2 conv whose (k+1) x (k+1)
        kernel holds the k x k kernel shifted by (dy, dx), zeros elsewhere. BatchNorm (eval statistics) folds in.
        """
        conv = self.conv.conv
        w, b = conv.weight, conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        if hasattr(self.conv, "bn"):
            bn = self.conv.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            w, b = w * scale.view(-1, 1, 1, 1), (b - bn.running_mean) * scale + bn.bias
        c2, c1, k = conv.out_channels, conv.in_channels, conv.kernel_size[0]  # Python ints: constant-folded in ONNX
        row, col = torch.zeros(c2, c1, 1, k, dtype=w.dtype), torch.zeros(c2, c1, k + 1, 1, dtype=w.dtype)
        row, col = row.to(w.device), col.to(w.device)
        phases = []
        for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)):  # the space_to_depth channel order
            t = torch.cat((row, w) if dy else (w, row), 2)
            phases.append(torch.cat((col, t) if dx else (t, col), 3))
        return torch.cat(phases, 0), torch.cat((b, b, b, b))

    def forward_folded_conv(self, x):
        """Conv -> space-to-depth as one stride-2 conv (eval: BN uses running statistics); equal to the plain path."""
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            space_to_depth(x)  # raises the clear error
        weight, bias = self.folded_weights()
        return self.conv.act(F.conv2d(x, weight, bias, 2, self.conv.conv.kernel_size[0] // 2))
