"""ESOD's object seeker: an objectness heatmap on the stride-8 backbone features.

Source: ESOD, "Efficient Small Object Detection on High-Resolution Images" (Liu et al., IEEE TIP 2024; seed 002;
SPEC sec. 3; official code github alibaba/esod, YOLOv5-based). The seeker reuses the detector's backbone: a
depthwise 13x13 Conv+BN+SiLU on P3 (stride 8), then a 1x1 conv to one objectness logit per cell. The training target
and loss are in :mod:`so_det_ultra.losses.esod`; patch selection and sparse inference in :mod:`so_det_ultra.highres`.

In a model YAML the seeker is a side branch nothing else reads::

    - [4, 1, ObjectSeeker, []]   # 5: objectness logits (B, 1, H/8, W/8) of backbone P3 (layer 4)
    - [4, 1, CDown, [512]]       # 6: the backbone continues from layer 4, not from the seeker
"""

from __future__ import annotations

import math

import torch
from torch import nn
from ultralytics.nn.modules import Conv

from so_det_ultra.registry import register_block


def _seeker_rule(spec):
    return 1, [spec.c_in(), *spec.args], spec.n


@register_block(channels=_seeker_rule)
class ObjectSeeker(nn.Module):
    """Depthwise kxk Conv+BN+SiLU -> 1x1 conv to one objectness logit per cell (ESOD sec. 3, "object seeker").

    The logits of the latest forward are kept in ``self.logits`` (not saved in checkpoints) so that the ESOD loss can
    read them after the model's usual forward; the layer's own output is the same tensor.

    Interpretations (the paper and SPEC leave these open):
        - the 1x1 conv's bias starts at ``log(prior / (1 - prior))`` (``prior`` 0.01, as focal-loss heads do), so the
          untrained heatmap is near 0 everywhere instead of 0.5 (which would select every patch).

    Args:
        c1 (int): Input channels (stride-8 features). k (int): Depthwise kernel size (paper: 13).
        prior (float): Initial objectness probability.

    Example:
        >>> ObjectSeeker(64)(torch.randn(2, 64, 80, 80)).shape
        torch.Size([2, 1, 80, 80])
    """

    def __init__(self, c1: int, k: int = 13, prior: float = 0.01):
        super().__init__()
        self.cv1 = Conv(c1, c1, k, g=c1)
        self.cv2 = nn.Conv2d(c1, 1, 1)
        nn.init.constant_(self.cv2.bias, math.log(prior / (1 - prior)))
        self.logits = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # speed only: PyTorch's CPU depthwise 13x13 is ~7x faster
        self.logits = self.cv2(self.cv1(x)).contiguous()
        return self.logits

    def __getstate__(self):  # the cached logits are transient: not in checkpoints, not in deep copies (EMA)
        state = self.__dict__.copy()
        state["logits"] = None
        return state
