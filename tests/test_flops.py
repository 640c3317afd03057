"""so_det_ultra.utils.flops: convolutions and matrix products by PyTorch's formulas, functional maths per element."""

from __future__ import annotations

import torch

from so_det_ultra.utils.flops import FlopCounter, count_flops


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x)
        return torch.sigmoid(y).mean((2, 3))  # one pointwise op and one reduction, both over 8x16x16 elements


def test_count_flops_counts_conv_and_functional_maths():
    total, conv = count_flops(_Net(), imgsz=16)
    macs = 8 * 16 * 16 * 3 * 3 * 3  # Cout * H * W * Cin * k * k
    assert conv * 1e9 == 2 * macs  # 2 FLOPs per multiply-accumulate (Ultralytics' GFLOPs convention)
    assert round((total - conv) * 1e9) == 2 * 8 * 16 * 16  # sigmoid (per output) + mean (per input element)


def test_data_movement_counts_nothing():
    x = torch.randn(2, 4, 8)
    with FlopCounter() as c:
        torch.cat([x, x]).permute(2, 0, 1).reshape(8, -1).contiguous()
    assert c.matmul == 0 and c.other == 0 and c.gflops == 0.0
