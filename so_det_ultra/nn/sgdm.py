"""SGDM and RDConv: spatial attention whose convolution kernel is generated from the input (dynamic), cheaply.

Source: "SGDM: Static-Guided Dynamic Module Make Stronger Visual Models" (Xing, Cui, Qi; arXiv 2403.18282), abstract
only: no code and no equations are public. Its argument: spatial attention (CBAM-style ``sigmoid(conv([mean_c,
max_c]))``) uses a static convolution; a dynamic one adapts to content but (1) its kernel generator is heavy and (2) the
generator ignores spatial information; dynamic kernels are also sensitive to high-frequency noise. Razor Dynamic
Convolution (RDConv) answers (1) with a "razor" operation and (2) with a spatial branch; SGDM answers the noise with
weight-shared asymmetric static kernels (1xk, kx1, kxk) that guide the dynamic kernel.
Everything below is an **interpretation of the abstract**, including where the modules go: the abstract reports
"backbones equipped with SGDM" at "+0.19M on YOLOv8n" (and +0.33M on YOLOv5n). ``cfg/models/yolov8-sgdm.yaml`` reads
that as one SGDM (k=7, razor=1) after each of YOLOv8's four backbone stages: +183,796 params on YOLOv8n (-3% of the
abstract's figure). ``razor=1`` keeps the razor conv at C channels; the razor that makes the generator cheap is then the
pooling of the whole map into two m-vectors (channel and spatial branch) before any kernel weight is generated, so the
generator's size does not grow with H x W. ``cfg/models/yolov8-sgdm-neck.yaml`` (SGDM on the neck outputs, razor=16,
+11,875) is the light variant. See docs/blocks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv

from so_det_ultra import channels
from so_det_ultra.registry import register_block, register_safe_global

GUIDES = ("mul", "add")


def dynamic_conv(u: torch.Tensor, weight: torch.Tensor, cin: int, k: int) -> torch.Tensor:
    """Per-sample convolution ``y[b] = conv2d(u[b], weight[b], padding=k//2)`` with one output channel, export-friendly.

    Written as static one-hot convolutions plus one batched matrix product, so it traces to ONNX ``Conv`` /
    ``MatMul`` with any batch size (a grouped conv with ``groups=B`` would freeze the batch size in the graph)::

        T[b, c*k + v, h', w] = u_pad[b, c, h', w + v]            horizontal taps (one-hot 1xk conv, groups=cin)
        R[b, j, h', w]       = sum_{c,v} weight[b, c, j, v] T[b, c*k + v, h', w]   (batched MatMul)
        y[b, 0, h, w]        = sum_j R[b, j, h + j, w]            vertical taps (one-hot kx1 conv)

    Cost per pixel: 2 k^2 cin multiply-adds, instead of k^2 cin * k^2 for a full one-hot unfold.

    Args:
        u (torch.Tensor): (B, cin, H, W). weight (torch.Tensor): (B, cin, k, k). cin (int), k (int): the same sizes as
            Python ints (sizes read from tensors would be traced as unknown and ONNX needs static conv kernels); k odd.

    Returns:
        (torch.Tensor): (B, 1, H, W).
    """
    b, p = weight.shape[0], k // 2
    eye = torch.eye(k, dtype=u.dtype, device=u.device)  # a constant in the exported graph
    t = F.conv2d(F.pad(u, (p, p, p, p)), eye.repeat(cin, 1).view(cin * k, 1, 1, k), groups=cin)  # (B, cin*k, H+2p, W)
    wm = weight.permute(0, 2, 1, 3).reshape(b, k, cin * k)  # [b, j, c*k + v] = weight[b, c, j, v]
    r = torch.matmul(wm, t.flatten(2)).view(b, k, t.shape[2], t.shape[3])
    return F.conv2d(r, eye.view(1, k, k, 1))


@register_safe_global  # a sub-module of SGDM, not a YAML layer: allowed so checkpoints load under safe loading
class RDConv(nn.Module):
    """Razor Dynamic Convolution: a kxk kernel for a ``cin``-channel map, generated per image from guide features x.

    Interpretation of the abstract::

        z     = Conv1x1_{C -> m}(x),  m = max(C // razor, 4)       "razor": shave C channels to a thin m first, so
                                                                    every generator weight scales with m, not C
        g     = GAP(z)                                              channel branch (what is present)
        p     = sum_{hw} softmax_{hw}(Conv1x1_{m -> 1}(z)) z_{hw}   spatial branch (attention pooling: where it is);
                                                                    the 1x1 conv has no bias: softmax over H*W
                                                                    ignores a shift shared by every position
        D     = reshape(Linear_c(g) + Linear_s(p)) in R^{cin x k x k}   dynamic kernel offsets
        W_s   = K + row(a) + col(a)      static guide: kxk kernel K plus ONE k-tap vector a per input channel used
                                         both as the 1xk (centre row) and the kx1 (centre column) kernel (shared)
        W(x)  = W_s * (1 + tanh(D))      guide="mul": the dynamic part rescales the static kernel by a factor in (0, 2)
              = W_s + D                  guide="add": free dynamic offsets (no damping)
        y     = conv(u, W(x)) + bias     stride 1, zero padding k//2, one output channel

    Why "mul" is the default: the abstract says the static kernels guide the dynamic one to damp high-frequency noise;
    a bounded multiplicative modulation keeps the kernel's shape that of the (smooth, shared-weight) static kernel.
    With a constant generator (D the same for every input) RDConv is exactly a static conv with kernel W_s(1+tanh D).

    Parameters: ``C*m + 2m`` (razor conv + BN) ``+ m`` (spatial branch) ``+ 2(m + 1) cin k^2`` (generators)
    ``+ cin k^2 + cin k + 1`` (static guide, shared taps, bias); for cin=2, k=7: ``C*m + 199m + 309``.

    Args:
        c1 (int): Guide-feature channels C. cin (int): Channels of the map being convolved. k (int): Odd kernel size.
        razor (int): Channel reduction of the razor (m = max(C // razor, 4); 1 keeps m = C).
        guide (str): "mul" or "add".
    """

    def __init__(self, c1: int, cin: int = 2, k: int = 7, razor: int = 16, guide: str = "mul"):
        super().__init__()
        if k < 1 or k % 2 == 0:
            raise ValueError(f"RDConv kernel size must be odd, got k={k}")
        if guide not in GUIDES:
            raise ValueError(f"RDConv guide must be one of {GUIDES}, got {guide!r}")
        if razor < 1:
            raise ValueError(f"RDConv razor must be >= 1, got {razor}")
        m = max(c1 // razor, 4)
        self.cin, self.k, self.mul = cin, k, guide == "mul"
        self.razor = Conv(c1, m, 1)
        self.where = nn.Conv2d(m, 1, 1, bias=False)  # a bias would shift every position's logit alike: no effect
        self.gen_c = nn.Linear(m, cin * k * k)
        self.gen_s = nn.Linear(m, cin * k * k)
        self.static = nn.Parameter(torch.empty(cin, k, k))
        self.shared = nn.Parameter(torch.zeros(cin, k))  # the 1xk == kx1 shared taps
        self.bias = nn.Parameter(torch.zeros(1))
        nn.init.kaiming_uniform_(self.static.view(1, cin, k, k), a=5**0.5)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Weights saved before ``where`` lost its bias still load strictly: that bias never changed the output."""
        state_dict.pop(f"{prefix}where.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def static_kernel(self) -> torch.Tensor:
        """W_s = K + row(a) + col(a), (cin, k, k)."""
        c = self.k // 2
        row = F.pad(self.shared[:, None, :], (0, 0, c, c))  # a in the centre row
        col = F.pad(self.shared[:, :, None], (c, c, 0, 0))  # a in the centre column
        return self.static + row + col

    def dynamic_offsets(self, x) -> torch.Tensor:
        """D, (B, cin, k, k)."""
        z = self.razor(x)
        g = z.mean((2, 3))
        att = self.where(z).flatten(2).softmax(-1)  # (B, 1, HW)
        p = (z.flatten(2) * att).sum(-1)  # (B, m)
        return (self.gen_c(g) + self.gen_s(p)).view(-1, self.cin, self.k, self.k)

    def kernel(self, x) -> torch.Tensor:
        """W(x), (B, cin, k, k)."""
        d, ws = self.dynamic_offsets(x), self.static_kernel()
        return ws * (1 + d.tanh()) if self.mul else ws + d

    def forward(self, x, u):
        return dynamic_conv(u, self.kernel(x), self.cin, self.k) + self.bias

    def forward_reference(self, x, u):
        """Same as :meth:`forward` with one ``F.conv2d`` per image (not exportable with a dynamic batch)."""
        w = self.kernel(x)
        return torch.cat([F.conv2d(u[i : i + 1], w[i : i + 1], padding=self.k // 2) for i in range(len(u))]) + self.bias


@register_block(channels=channels.same)
class SGDM(nn.Module):
    """Static-Guided Dynamic Module: spatial attention with an RDConv instead of CBAM's static 7x7 conv.

    Interpretation of the abstract::

        s   = [mean_c(x), max_c(x)]                  (B, 2, H, W), CBAM spatial descriptor
        a   = sigmoid(RDConv(x, s))                  (B, 1, H, W), kernel generated from x, guided by static kernels
        out = x * a

    Channel-preserving, so it drops in after any layer: a backbone stage (``[-1, 1, SGDM, [7, 1]]`` in
    ``yolov8-sgdm.yaml``, the abstract's "backbones equipped with SGDM" at its +0.19M budget) or a neck output
    (``[-1, 1, SGDM, []]`` in ``yolov8-sgdm-neck.yaml`` and ``so-det-sgdm-neck.yaml``).

    Args:
        channels (int): Input = output channels. k (int): Odd kernel size (CBAM: 7). razor (int): RDConv's channel
            reduction. guide (str): "mul" (bounded modulation of the static kernel) or "add".

    Examples:
        >>> SGDM(32)(torch.randn(2, 32, 16, 16)).shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(self, channels: int, k: int = 7, razor: int = 16, guide: str = "mul"):
        super().__init__()
        self.rd = RDConv(channels, 2, k, razor, guide)

    def forward(self, x):
        s = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)
        return x * self.rd(x, s).sigmoid()
