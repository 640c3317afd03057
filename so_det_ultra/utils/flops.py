"""Honest FLOP counts: every aten op a forward pass runs, not only the nn layers thop sees.

Ultralytics' ``model.info()`` reports thop's count, which hooks ``nn.Module`` layers (convs, BN, linear) and misses
maths written in ``forward`` (SimAM, ECA's gating, EAFusion's weighted sum, attention products). :func:`count_flops`
runs one forward under a ``TorchDispatchMode`` and counts:

- convolutions and matrix products with PyTorch's own formulas (``torch.utils.flop_counter``; 2 FLOPs per MAC, the same
  convention as Ultralytics' GFLOPs), and
- every other floating-point op at 1 FLOP per output element (pointwise) or per input element (reductions), which is
  the usual convention for element-wise maths. Pure data movement (view, cat, slice, pad, copy) counts 0.

Examples:
    >>> from ultralytics import YOLO
    >>> from so_det_ultra.utils.flops import count_flops
    >>> total, matmul = count_flops(YOLO("so-det-s.yaml").model, imgsz=640)
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

_MOVES = {
    "view",
    "_unsafe_view",
    "reshape",
    "cat",
    "stack",
    "slice",
    "select",
    "pad",
    "constant_pad_nd",
    "reflection_pad2d",
    "copy_",
    "clone",
    "expand",
    "permute",
    "transpose",
    "t",
    "unsqueeze",
    "squeeze",
    "split",
    "split_with_sizes",
    "detach",
    "alias",
    "empty",
    "zeros",
    "ones",
    "arange",
    "full",
    "_to_copy",
    "to",
    "contiguous",
    "unbind",
    "index",
    "upsample_nearest2d",
    "max_pool2d_with_indices",
    "lift_fresh",
    "new_empty",
    "new_zeros",
    "fill_",
    "zero_",
}
_REDUCTIONS = {"mean", "sum", "amax", "max", "var", "std", "softmax", "_softmax", "logsumexp"}


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of everything run inside ``with FlopCounter() as c:`` (any code, not just one model call).

    ``c.gflops`` is the total, ``c.matmul`` / ``c.other`` the two parts in FLOPs.
    """

    def __init__(self):
        super().__init__()
        self.matmul = 0
        self.other = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name = packet.__name__
        if packet in flop_registry:
            self.matmul += flop_registry[packet](*args, **kwargs, out_val=out)
        elif name not in _MOVES and name.rstrip("_") not in _MOVES:
            if name in _REDUCTIONS:
                src = args[0] if args and isinstance(args[0], torch.Tensor) else None
                self.other += src.numel() if src is not None and src.is_floating_point() else 0
            else:
                outs = out if isinstance(out, (tuple, list)) else (out,)
                self.other += sum(o.numel() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())
        return out

    @property
    def gflops(self) -> float:
        return (self.matmul + self.other) / 1e9


def count_flops(model: torch.nn.Module, imgsz: int = 640) -> tuple:
    """``(total_gflops, conv_matmul_gflops)`` of one batch-1 forward at ``imgsz`` x ``imgsz`` in eval mode."""
    p = next(model.parameters())
    x = torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounter()
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return (counter.matmul + counter.other) / 1e9, counter.matmul / 1e9
