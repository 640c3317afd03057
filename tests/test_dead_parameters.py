"""No registered block carries a structurally dead parameter: one whose gradient is zero for every input.

Such a parameter is a bias before a softmax over the positions it shifts alike, a conv bias before a training-mode
BatchNorm, or a weight on a branch the output never reads. In float32 the rounding of a sum of near-cancelling terms
leaves it a tiny, machine-dependent gradient, so an ``!= 0`` check passes on one CPU and fails on another. Here every
block runs in float64 with random parameters (so no initialisation zero, such as a zero-initialised gate, hides a live
parameter), and each parameter's first-order effect on the loss, ``|grad| * scale(p) / |loss|``, must be far above
float64 rounding (~1e-16) and well above what float32 rounding would give a dead one (~1e-7).
"""

from __future__ import annotations

import pytest
import torch

from so_det_ultra.nn import (
    CEM,
    ECA,
    FBSM,
    MRAE,
    SGDM,
    CDown,
    CGAChannelAttention,
    CGAPixelAttention,
    CGASpatialAttention,
    EAFusion,
    FastDetect,
    ObjectSeeker,
    SamplingRTDETRDecoder,
    SeekerDetect,
    SimAM,
    SpaceToDepth,
    Sum,
    SWSConv,
    WeightedConcat,
)
from so_det_ultra.registry import BLOCKS

SENSITIVITY = 1e-5  # relative first-order effect below which a parameter counts as dead


def _maps(*channels, hw=8, b=2):
    """Random maps with a random mean per channel (global pooling then sees more than noise)."""
    return [torch.randn(b, c, hw, hw) + torch.randn(1, c, 1, 1) for c in channels]


def _detr_batch():
    """Two images with 2 and 1 objects: the decoder's denoising queries (and their class embedding) take part."""
    return {
        "cls": torch.tensor([0, 1, 2]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]),
        "batch_idx": torch.tensor([0, 0, 1]),
        "gt_groups": [2, 1],
    }


def _levels(*channels):
    return [_maps(c, hw=16 // 2**i)[0] for i, c in enumerate(channels)]


# name -> (module factory, input factory returning the forward's positional arguments). Small, but every branch on.
EXAMPLES = {
    "CDown": (lambda: CDown(8, 16), lambda: _maps(8)),
    "CEM": (lambda: CEM([8, 16], 16), lambda: [[torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]]),
    "CGAChannelAttention": (lambda: CGAChannelAttention(16), lambda: _maps(16)),
    "CGAPixelAttention": (lambda: CGAPixelAttention(16), lambda: [*_maps(16), *_maps(16)]),
    "CGASpatialAttention": (lambda: CGASpatialAttention(16), lambda: _maps(16)),
    "EAFusion": (lambda: EAFusion(16), lambda: [_maps(16, 16)]),
    "ECA": (lambda: ECA(16), lambda: _maps(16)),
    "FBSM": (lambda: FBSM(16), lambda: _maps(16)),
    "FastDetect": (lambda: FastDetect(3, 4, ch=(8, 16)), lambda: [_levels(8, 16)]),
    "MRAE": (lambda: MRAE([8, 12, 16], 10), lambda: [_levels(8, 12, 16)]),
    "ObjectSeeker": (lambda: ObjectSeeker(8, k=5), lambda: _maps(8)),
    "SGDM": (lambda: SGDM(16), lambda: _maps(16)),
    "SWSConv": (lambda: SWSConv(16, 16), lambda: _maps(16)),
    "SamplingRTDETRDecoder": (
        lambda: SamplingRTDETRDecoder(3, ch=(16, 16), hd=16, nq=6, ndp=2, nh=2, ndl=2, d_ffn=32, nd=6, sr=True),
        lambda: [_levels(16, 16), _detr_batch()],
    ),
    "SeekerDetect": (lambda: SeekerDetect(3, 4, ch=(8, 16)), lambda: [[*_levels(8, 16), torch.randn(2, 1, 16, 16)]]),
    "SimAM": (lambda: SimAM(16), lambda: _maps(16)),
    "SpaceToDepth": (lambda: SpaceToDepth(), lambda: _maps(8)),
    "Sum": (lambda: Sum(), lambda: [_maps(8, 8)]),
    "WeightedConcat": (lambda: WeightedConcat([8, 8, 8], [1.0, 1.0, 3.0]), lambda: [_maps(8, 8, 8)]),
}


def test_every_registered_block_has_an_example():
    assert sorted(EXAMPLES) == BLOCKS.names(), "add the new block to EXAMPLES so its parameters are checked"


def _tensors(out):
    """Every floating tensor inside ``out`` (nested tuples, lists and dicts)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _double(x):
    if torch.is_tensor(x):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_double(v) for v in x)
    return x


def sensitivities(module, inputs) -> dict:
    """``{name: |grad| * scale(p) / |loss|}`` of every trainable parameter of ``module`` for a loss of all its outputs
    (float64, training mode, parameters moved randomly off their initial values)."""
    module = module.double().train()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # break initialisation zeros (a zero gate would hide what it gates)
    out = module(*_double(inputs))
    loss = sum((t * torch.linspace(0.5, 1.5, t.numel(), dtype=t.dtype).view(t.shape)).sum() for t in _tensors(out))
    loss = loss + sum(t.square().mean() for t in _tensors(out))  # linear and quadratic terms: no lucky cancellation
    names, params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    out = {}
    for n, p, g in zip(names, params, grads):
        scale = max(p.detach().abs().mean().item(), 1.0)
        out[n] = 0.0 if g is None else g.abs().mean().item() * scale / max(abs(loss.item()), 1e-12)
    return out


def dead_parameters(make, inputs, draws: int = 3) -> dict:
    """``{name: largest sensitivity}`` of the parameters below :data:`SENSITIVITY` in every one of ``draws`` random
    draws of parameters and inputs (a ReLU that happens to be off in one draw is not a structural zero)."""
    best = {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # also for tensors the host creates inside a forward (RT-DETR denoising)
    try:
        for seed in range(draws):
            torch.manual_seed(seed)
            for n, s in sensitivities(make(), inputs()).items():
                best[n] = max(best.get(n, 0.0), s)
    finally:
        torch.set_default_dtype(default)
    return {n: s for n, s in best.items() if not s > SENSITIVITY}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_no_registered_block_has_a_structurally_dead_parameter(name):
    make, inputs = EXAMPLES[name]
    if not any(p.requires_grad for p in make().parameters()):
        pytest.skip(f"{name} has no trainable parameters")
    dead = dead_parameters(make, inputs)
    assert not dead, f"{name}: parameters without a gradient above rounding (relative effect): {dead}"


def test_the_check_finds_a_bias_before_a_softmax():
    """The criterion catches the defect it exists for: a 1-channel conv with a bias, softmaxed over positions."""

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.where = torch.nn.Conv2d(4, 1, 1)

        def forward(self, x):
            att = self.where(x).flatten(2).softmax(-1)
            return (x.flatten(2) * att).sum(-1)

    assert list(dead_parameters(Pool, lambda: _maps(4))) == ["where.bias"]
