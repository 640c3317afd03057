"""MRAE, the MultiResolution Attention Extractor: fuse several pyramid levels into the finest one with learned weights.

Source: "MultiResolution Attention Extractor for Small Object Detection" (paper; summary in docs/blocks.md, "MRAE"),
sec. 3.1 (soft attention) and sec. 3.2 (attention-based feature interaction, MRAE). The paper fuses ResNet levels C1,
C2, C3 (strides s, 2s, 4s) for Faster R-CNN; here the levels are any YOLO feature maps listed in the YAML row's
``from``, finest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv

from so_det_ultra.registry import LayerSpec, register_block

MODES = ("cosine", "soft")


def multi_input_scaled(spec: LayerSpec):
    """Channel rule for ``[[f0, f1, ...], 1, Block, [c2, *rest]]``: ``Block([c_in...], c2*width capped, *rest)``."""
    cs = spec.c_ins()
    if not spec.args or not isinstance(spec.args[0], (int, float)):
        spec.fail(f"first argument must be the output channels, got args={spec.args}")
    c2 = spec.scale_channels(spec.args[0])
    return c2, [cs, c2, *spec.args[1:]], spec.n


def cosine_level_weights(vectors: torch.Tensor, template: int, tau: float = 1.0) -> torch.Tensor:
    """MRAE attention weights (sec. 3.2): ``a = softmax_i(cos(v_t, v_i) / tau)``.

    Args:
        vectors (torch.Tensor): (B, L, d) one descriptor per level. template (int): index t of the template level.
        tau (float): softmax temperature (paper: 1).

    Returns:
        (torch.Tensor): (B, L) weights, each row summing to 1; D_t = cos(v_t, v_t) = 1 for the template itself.
    """
    v = F.normalize(vectors, dim=-1, eps=1e-6)
    d = (v * v[:, template : template + 1]).sum(-1)  # (B, L) cosine similarities with the template
    return (d / tau).softmax(1)


@register_block(channels=multi_input_scaled)
class MRAE(nn.Module):
    """Fuse L feature levels into the finest level's resolution with attention weights that sum to 1.

    Source: "MultiResolution Attention Extractor for Small Object Detection", sec. 3.2, and sec. 3.1 for
    ``mode="soft"``. For levels F_1 (finest) ... F_L::

        mode="cosine" (sec. 3.2):
            v_i = FC(GAP(Conv1x1(F_i)))                    per-level descriptor in R^d
            D_i = cos(v_t, v_i) = v_t . v_i / (|v_t| |v_i|) (D_t = 1)
            a_i = exp(D_i / tau) / sum_k exp(D_k / tau)
        mode="soft" (sec. 3.1, the paper's weaker baseline):
            f_i = GMP(Conv1x1_{C_i -> 1}(F_i))              one salient value per level
            a_i = exp(f_i) / sum_k exp(f_k)
        A = sum_i a_i * Up(g_i(F_i)),  g_i = 1x1 Conv C_i -> c2, Up = nearest resize to F_1's size

    Interpretations (the paper leaves these open):
        - "1x1 conv + fc -> vector": Conv1x1 (C_i -> d, BN, SiLU), global average pooling, then a Linear d -> d, so the
          descriptor does not depend on the input size. ``d`` defaults to ``max(c2 // 4, 16)``.
        - The paper widens only the shallower levels to the deepest level's channels; here every level is projected
          to ``c2`` (the YAML's output width) by a 1x1 ``Conv`` (BN folds in ``fuse()``), so the block also works as
          a width-changing neck layer. The 1x1 projection runs before the upsampling (same result for nearest
          resizing, fewer FLOPs).
        - ``template`` indexes the ``from`` list (0 = finest). The paper's best template is its middle level C2, so
          the default is 1. ``tau`` (default 1, as in the paper) sharpens or flattens the level weights.
        - The weights are per image (one scalar per level and image), as in the paper.

    Args:
        c1 (list[int]): Channels of each input level, finest first. c2 (int): Output channels.
        template (int): Template level index into the inputs (cosine mode). mode (str): "cosine" or "soft".
        dim (int | None): Descriptor size d. tau (float): Softmax temperature (cosine mode).

    Examples:
        >>> m = MRAE([16, 32, 64], 24)
        >>> m([torch.randn(2, 16, 32, 32), torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8)]).shape
        torch.Size([2, 24, 32, 32])
    """

    def __init__(
        self, c1: list, c2: int, template: int = 1, mode: str = "cosine", dim: int | None = None, tau: float = 1.0
    ):
        super().__init__()
        if not isinstance(c1, (list, tuple)) or len(c1) < 2:
            raise ValueError(f"MRAE fuses two or more levels, got input channels {c1!r}; list them in `from`")
        if mode not in MODES:
            raise ValueError(f"MRAE mode must be one of {MODES}, got {mode!r}")
        if not -len(c1) <= template < len(c1):
            raise ValueError(f"MRAE template={template} is not an index into its {len(c1)} inputs")
        if tau <= 0:
            raise ValueError(f"MRAE tau must be positive, got {tau}")
        self.mode, self.template, self.tau = mode, template % len(c1), float(tau)
        self.align = nn.ModuleList(Conv(c, c2, 1) for c in c1)  # g_i
        if mode == "cosine":
            d = dim or max(c2 // 4, 16)
            self.embed = nn.ModuleList(Conv(c, d, 1) for c in c1)  # 1x1 conv of the descriptor net
            self.fc = nn.ModuleList(nn.Linear(d, d) for _ in c1)
        else:
            self.score = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in c1)  # 1x1 conv to one channel, then GMP

    def level_weights(self, xs) -> torch.Tensor:
        """(B, L) attention weights a_i of the input levels."""
        if self.mode == "soft":
            f = torch.cat([s(x).amax((2, 3)) for s, x in zip(self.score, xs)], 1)  # (B, L) global max pooling
            return f.softmax(1)
        v = torch.stack([fc(e(x).mean((2, 3))) for e, fc, x in zip(self.embed, self.fc, xs)], 1)  # (B, L, d)
        return cosine_level_weights(v, self.template, self.tau)

    def forward(self, xs):
        a = self.level_weights(xs)
        size = xs[0].shape[-2:]
        out = self.align[0](xs[0]) * a[:, 0, None, None, None]
        for i in range(1, len(xs)):
            out = out + F.interpolate(self.align[i](xs[i]), size=size, mode="nearest") * a[:, i, None, None, None]
        return out
