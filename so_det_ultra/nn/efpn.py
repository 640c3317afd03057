"""E-FPN-BS blocks: CEM (context enhancement from the deepest level) and FBSM (foreground/background gating).

Source: the E-FPN-BS paper's abstract (our reading in docs/blocks.md, "E-FPN-BS"). Only the abstract is public: no
code, no equations, no numbers. Everything below is an **interpretation of the abstract**, written out as equations so
that it can be checked and changed. The abstract's argument: the deepest levels (P5/P6) get few or no positive
anchors on tiny objects, so their semantics are "stranded"; CEM routes them into the shallow levels that do get
positives, FBSM gates those levels spatially. DCLoss, the third part, is in :mod:`so_det_ultra.losses.dcloss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv

from so_det_ultra import channels
from so_det_ultra.nn.mrae import multi_input_scaled
from so_det_ultra.registry import register_block

CEM_FUSE = ("add", "gate")
FBSM_MODES = ("amplify", "separate")


@register_block(channels=multi_input_scaled)
class CEM(nn.Module):
    """Context Enhancement Module: fuse the deepest features, globally and locally, into a shallower level.

    Interpretation of the abstract ("dual-branch processing to align and compress high-level features for effective
    global-local fusion"). For a shallow map S (the level to enhance, output resolution) and a deep map D::

        Z = Conv1x1_{C_d -> c2}(D)                    compress the deep channels (shared by both branches)
        L = Up(DWConv3x3(Z))                          local branch: spatial context, aligned to S's size (nearest)
        G = Conv1x1_{c2 -> c2}(GAP(Z))                global branch: one context vector per image (B, c2, 1, 1)
        fuse="add":  out = Conv3x3(Conv1x1(S) + L + G)
        fuse="gate": out = Conv3x3(Conv1x1(S) + sigmoid(G) * L)   (global context selects which local channels pass)

    All Conv are Ultralytics ``Conv`` (BN + model activation; BN folds in ``fuse()``) except the global branch's last
    1x1, a plain biased conv (no BN on a 1x1 map of batch statistics). ``from`` lists the shallow level first.

    Args:
        c1 (list[int]): ``[C_shallow, C_deep]``. c2 (int): Output channels. fuse (str): "add" or "gate".

    Examples:
        >>> CEM([32, 64], 32)([torch.randn(1, 32, 16, 16), torch.randn(1, 64, 4, 4)]).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(self, c1: list, c2: int, fuse: str = "add"):
        super().__init__()
        if not isinstance(c1, (list, tuple)) or len(c1) != 2:
            raise ValueError(f"CEM takes two inputs [shallow, deep], got input channels {c1!r}")
        if fuse not in CEM_FUSE:
            raise ValueError(f"CEM fuse must be one of {CEM_FUSE}, got {fuse!r}")
        self.gate = fuse == "gate"
        self.shallow = Conv(c1[0], c2, 1)
        self.compress = Conv(c1[1], c2, 1)
        self.local = Conv(c2, c2, 3, g=c2)
        self.glob = nn.Conv2d(c2, c2, 1)
        self.out = Conv(c2, c2, 3)

    def forward(self, xs):
        s, d = xs
        z = self.compress(d)
        local = F.interpolate(self.local(z), size=s.shape[-2:], mode="nearest")
        g = self.glob(z.mean((2, 3), keepdim=True))
        return self.out(self.shallow(s) + (g.sigmoid() * local if self.gate else local + g))


@register_block(channels=channels.same)
class FBSM(nn.Module):
    """Foreground-Background Separation Module: a spatial gating mask M in [0, 1] that amplifies likely objects.

    Interpretation of the abstract ("generates spatial gating masks that dynamically amplify discriminative regions")::

        M = sigmoid(Conv1x1_{h -> 1}(Conv3x3_{C -> h}(x)))      (B, 1, H, W), h = max(C // reduction, 8)
        mode="amplify":  out = x * (1 + M)                      foreground up to x2, background kept (default)
        mode="separate": out = Conv1x1_{2C -> C}([x * M, x * (1 - M)])   separate foreground/background paths

    The mask is learned only through the detection loss (the abstract names no mask supervision). "amplify" never
    suppresses a location completely, so an untrained mask (M ~ 0.5 everywhere) scales features uniformly.

    Args:
        channels (int): Input = output channels. reduction (int): Hidden width divisor. mode (str): see above.

    Examples:
        >>> FBSM(32)(torch.randn(1, 32, 16, 16)).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(self, channels: int, reduction: int = 4, mode: str = "amplify"):
        super().__init__()
        if mode not in FBSM_MODES:
            raise ValueError(f"FBSM mode must be one of {FBSM_MODES}, got {mode!r}")
        if reduction < 1:
            raise ValueError(f"FBSM reduction must be >= 1, got {reduction}")
        h = max(channels // reduction, 8)
        self.hidden = Conv(channels, h, 3)
        self.logit = nn.Conv2d(h, 1, 1)
        self.separate = Conv(2 * channels, channels, 1) if mode == "separate" else None

    def mask(self, x) -> torch.Tensor:
        """The gating mask M, (B, 1, H, W), values in [0, 1]."""
        return self.logit(self.hidden(x)).sigmoid()

    def forward(self, x):
        m = self.mask(x)
        if self.separate is not None:  # a module choice fixed at build time, not a branch on tensor values
            return self.separate(torch.cat((x * m, x * (1 - m)), 1))
        return x * (1 + m)
