"""ESOD's object seeker, and the Detect head that hands its heatmap to the loss.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE Transactions on Image
Processing 2024 (arXiv 2407.16424), sec. 3 ("object seeker"); official YOLOv5-based code github alibaba/esod. The
seeker reuses the detector's backbone: a depthwise 13x13 Conv+BN+SiLU on P3 (stride 8), then a 1x1 conv to one
objectness logit per cell. The training target and loss are in :mod:`so_det_ultra.losses.esod`; patch selection and
sparse inference in :mod:`so_det_ultra.highres` (docs/highres.md).

In a model YAML the seeker is a side branch of the backbone, and the head takes it as its last input::

    - [4, 1, ObjectSeeker, []]                  # 5: objectness logits (B, 1, H/8, W/8) of backbone P3 (layer 4)
    - [4, 1, CDown, [512]]                      # 6: the backbone continues from layer 4, not from the seeker
    ...
    - [[22, 18, 21, 5], 1, SeekerDetect, [nc]]  # Detect(P2, P3, P4) + the seeker's logits for the loss

The logits reach the criterion as data: :class:`SeekerDetect` adds them to the prediction dict it returns in
training (and next to the raw predictions in validation), where :class:`~so_det_ultra.losses.esod.ESODLoss` reads
``preds["seek"]``. Nothing is cached on a module between the forward pass and the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from ultralytics.nn.modules import Conv

from so_det_ultra.nn.head import FastDetect, detect_args
from so_det_ultra.registry import LayerSpec, register_block

SEEK_KEY = "seek"  # key of the seeker's logits in SeekerDetect's prediction dict
# Stride of the seeker in the shipped YAMLs (it reads backbone P3). Code that has the model measures the stride instead
# (highres.sparse.SparseModel.cell); this is the documented default for code without one (oracle heatmaps, help texts).
SEEKER_STRIDE = 8


def _seeker_rule(spec: LayerSpec):
    return 1, [spec.c_in(), *spec.args], spec.n


@register_block(channels=_seeker_rule)
class ObjectSeeker(nn.Module):
    """Depthwise kxk Conv+BN+SiLU -> 1x1 conv to one objectness logit per cell (ESOD sec. 3, "object seeker").

    A plain layer: its output is the logits, which a :class:`SeekerDetect` head routes to the loss.

    Interpretations (the paper leaves these open):
        - the 1x1 conv's bias starts at ``log(prior / (1 - prior))`` (``prior`` 0.01, as focal-loss heads do), so the
          untrained heatmap is near 0 everywhere instead of 0.5 (which would select every patch).

    Args:
        c1 (int): Input channels (stride-8 features). k (int): Depthwise kernel size (paper: 13).
        prior (float): Initial objectness probability.

    Attributes:
        thr (float | None): The heatmap threshold chosen for this seeker after training (``so-det fit-seeker`` stores
            it; it travels with the checkpoint). Sparse inference uses it when no threshold is given; None means the
            package default (ESOD's 0.3).

    Example:
        >>> ObjectSeeker(64)(torch.randn(2, 64, 80, 80)).shape
        torch.Size([2, 1, 80, 80])
    """

    thr = None  # a class attribute: checkpoints saved before it existed load with None

    def __init__(self, c1: int, k: int = 13, prior: float = 0.01):
        super().__init__()
        self.cv1 = Conv(c1, c1, k, g=c1)
        self.cv2 = nn.Conv2d(c1, 1, 1)
        nn.init.constant_(self.cv2.bias, math.log(prior / (1 - prior)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # speed only (CPU depthwise 13x13)
        return self.cv2(self.cv1(x)).contiguous()


def _seeker_detect_rule(spec: LayerSpec):
    """``[nc]`` with ``from = [level_1, ..., level_n, seeker]`` -> ``(nc, reg_max, end2end, ch, legacy)``."""
    cs = spec.c_ins()
    if len(cs) < 2 or cs[-1] != 1:
        spec.fail(
            "takes the detection levels and then the ObjectSeeker layer, e.g. from=[P2, P3, P4, <seeker layer>]; "
            f"the last input must have 1 channel, got channels {cs}"
        )
    return cs[0], detect_args(spec, cs[:-1]), 1


@register_block(channels=_seeker_detect_rule)
class SeekerDetect(FastDetect):
    """:class:`~so_det_ultra.nn.head.FastDetect` (``Detect`` with an equal, faster DFL decode) on all inputs but the
    last; the last (the seeker's logits) joins the raw predictions.

    YAML: ``[[P2, P3, P4, seeker], 1, SeekerDetect, [nc]]``. Outputs, with ``preds`` the ``Detect`` prediction dict:

    - training: ``{**preds, "seek": logits}`` (what the criterion receives);
    - validation: ``(decoded, {**preds, "seek": logits})``, as ``Detect`` returns ``(decoded, preds)``;
    - export: ``decoded`` only, exactly as ``Detect`` (the seeker is not an output of the exported graph).

    Args:
        nc (int): Classes. reg_max (int): DFL bins. end2end (bool): One-to-one branch, as ``Detect``.
        ch (tuple[int]): Channels of the detection levels (the seeker excluded).
        legacy (bool, optional): Ultralytics' head style at this YAML row (``parse_model`` sets it on ``Detect``
            itself; a subclass takes it as an argument so the class attribute of ``Detect`` is left alone).
    """

    @staticmethod
    def split(x: list) -> tuple[list, torch.Tensor]:
        """``(detection levels, seeker logits)`` of this layer's input list."""
        return list(x[:-1]), x[-1]

    def forward(self, x: list):
        feats, seek = self.split(x)
        out = super().forward(feats)
        if self.training:
            return {**out, SEEK_KEY: seek}
        if self.export:
            return out
        y, preds = out
        return y, {**preds, SEEK_KEY: seek}
