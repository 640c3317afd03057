"""Ultralytics' ``Detect`` with a faster, equal DFL decode (for ONNX Runtime and PyTorch on CPU).

Source: Ultralytics ``ultralytics/nn/modules/block.py`` ``DFL`` (the integral of Distribution Focal Loss, Li et al.,
"Generalized Focal Loss", NeurIPS 2020, sec. 3.3) and ``ultralytics/nn/modules/head.py`` ``Detect``.
"""

from __future__ import annotations

import torch
from ultralytics.nn.modules import Detect
from ultralytics.nn.modules.block import DFL

from so_det_ultra.registry import LayerSpec, register_block, register_safe_global


@register_safe_global  # not a YAML layer: allowed so checkpoints holding it load under ULTRALYTICS_SAFE_LOAD=1
class FastDFL(DFL):
    """DFL's expected bin, sum_k k softmax(x)_k, computed along the bin axis without a transpose (equal to ``DFL``).

    ``DFL`` views (B, 4 c1, A) as (B, 4, c1, A), transposes to (B, c1, 4, A) and runs a softmax over axis 1; ONNX
    Runtime's CPU Softmax on a non-last axis transposes internally, which is slow over the 33,600 anchors of a P2
    head (figures: docs/models.md). This form: e = exp(x - max_k x), then one tiny matmul gives sum_k k e_k and
    sum_k e_k, and their ratio is the expectation. Same parameters (the fixed ``conv`` holding 0..c1-1), same state
    dict as ``DFL``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        x = x.reshape(b * 4, self.c1, a)
        e = (x - x.amax(1, keepdim=True)).exp()
        k = self.conv.weight.view(1, self.c1)
        nd = torch.cat((k, torch.ones_like(k)), 0) @ e  # (B*4, 2, A): [sum_k k e_k, sum_k e_k]
        return (nd[:, 0] / nd[:, 1]).view(b, 4, a)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return DFL.forward(self, x)


def detect_args(spec: LayerSpec, ch: list) -> list:
    """``[nc]`` -> ``[nc, reg_max, end2end, ch, legacy]``: what parse_model gives ``Detect`` for the levels ``ch``."""
    if len(spec.args) != 1:
        spec.fail(f"takes one argument, the number of classes (args=[nc]), got {spec.args}")
    return [spec.args[0], spec.yaml.get("reg_max", 16), spec.yaml.get("end2end"), list(ch), spec.legacy]


def _fast_detect_rule(spec: LayerSpec):
    """``[nc]``, ``from = [P2, P3, ...]`` -> ``(nc, reg_max, end2end, ch, legacy)``, as parse_model does for Detect."""
    cs = spec.c_ins()
    return cs[0], detect_args(spec, cs), 1


@register_block(channels=_fast_detect_rule)
class FastDetect(Detect):
    """Ultralytics ``Detect`` (same layers, parameters, state dict, losses, end2end support) with :class:`FastDFL`.

    YAML: ``[[P2, P3, P4], 1, FastDetect, [nc]]``, a drop-in for ``Detect``; a ``Detect`` checkpoint's state dict
    loads into it unchanged. Only the box decode at inference differs in form, not in value.

    Args:
        nc (int): Classes. reg_max (int): DFL bins. end2end (bool): One-to-one branch, as ``Detect``.
        ch (tuple[int]): Channels of the detection levels.
        legacy (bool, optional): Ultralytics' head style at this YAML row (``parse_model`` sets it on ``Detect``
            itself; a subclass takes it as an argument so the class attribute of ``Detect`` is left alone).
    """

    def __init__(self, nc: int = 80, reg_max: int = 16, end2end: bool = False, ch: tuple = (), legacy=None):
        if legacy is not None:
            self.legacy = bool(legacy)  # read by Detect.__init__ (class-box layout)
        super().__init__(nc, reg_max, end2end, ch)
        if self.reg_max > 1:
            self.dfl = FastDFL(self.reg_max)
