"""Paper-GFLOPs scales of SO-Det (so-det-p-{s,m,l}) and SGDM at the SGDM abstract's +0.19M budget (yolov8n-sgdm)."""

import math
import re

import pytest
import torch

from so_det_ultra import paths
from so_det_ultra.nn.sgdm import SGDM

# SO-Det README table (VisDrone, 640): GFLOPs and params of SO-Det-s, -m, -l.
PAPER_GFLOPS = {"s": 16.3, "m": 50.2, "l": 182.1}
PAPER_PARAMS = {"s": 1.1e6, "m": 3.5e6, "l": 13.1e6}
# "SGDM: Static-Guided Dynamic Module Make Stronger Visual Models", abstract: "+0.19M on YOLOv8n".
SGDM_BUDGET = 0.19e6


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _yaml_summary(family, scale):
    """(params, GFLOPs) written in the ``# summary:`` comment of that scale's row of the shipped YAML."""
    text = paths.model_cfg(f"{family}.yaml").read_text()
    m = re.search(rf"^  {scale}: \[.*\] # summary: ([\d,]+) parameters.*?, ([\d.]+) GFLOPs", text, re.M)
    assert m, f"{family}.yaml has no summary comment for scale {scale}"
    return int(m[1].replace(",", "")), float(m[2])


@pytest.mark.parametrize("scale", ["s", "m", "l"])
def test_paper_gflops_scales_match_the_readme_and_their_summaries(scale):
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops

    model = YOLO(f"so-det-p-{scale}.yaml").model  # bare name -> cfg/models/so-det-p.yaml at that scale
    assert model.yaml["scale"] == scale
    params, gflops = _n_params(model), get_flops(model, 640)  # unfused, as `yolo train` prints when it builds it
    ref = PAPER_GFLOPS[scale]
    assert abs(gflops - ref) / ref <= 0.03, f"so-det-p-{scale}: {gflops:.2f} GFLOPs vs README {ref}"
    # The price of the paper's GFLOPs: 17-29% more parameters than the README's (so-det.yaml matches those instead).
    assert 1.15 <= params / PAPER_PARAMS[scale] <= 1.30, params
    doc_params, doc_gflops = _yaml_summary("so-det-p", scale)
    assert params == doc_params and math.isclose(gflops, doc_gflops, abs_tol=0.051), (params, gflops)
    fused = get_flops(model.fuse(), 640)  # BN folded (what `model.info()` prints after training): also within 3%
    assert abs(fused - ref) / ref <= 0.03, f"so-det-p-{scale} fused: {fused:.2f} GFLOPs vs README {ref}"


def _layers(family, scale):
    from ultralytics.nn import tasks

    d = tasks.yaml_model_load(paths.model_cfg(f"{family}.yaml"))
    d["scale"] = scale
    return tasks.parse_model(d, ch=3, verbose=False)[0]


@pytest.mark.parametrize("scale,c3k", [("s", False), ("m", False), ("l", True)])
def test_paper_scales_are_so_det_at_full_depth(scale, c3k):
    from ultralytics.nn.modules.block import C2PSA, C3k, C3k2

    ours, base = _layers("so-det-p", scale), _layers("so-det", scale)
    assert [type(m) for m in ours] == [type(m) for m in base]  # same layout, same widths
    assert [getattr(m, "c2", None) for m in ours] == [getattr(m, "c2", None) for m in base]
    for m, b in zip(ours, base):
        if isinstance(m, (C3k2, C2PSA)):
            assert len(m.m) == 2 and len(b.m) == 1  # depth 1.0: every C3k2/C2PSA repeats twice (0.5 in so-det.yaml)
        if isinstance(m, C3k2):  # c3k_scales: [l] (all C3k); s and m keep the YAML's own flags, as so-det.yaml
            assert isinstance(m.m[0], C3k) == (c3k or isinstance(b.m[0], C3k)) == isinstance(b.m[0], C3k)


def _sgdm_params(c, razor=1, k=7, cin=2):
    """Parameter count of one SGDM, from the formula in RDConv's docstring."""
    m = max(c // razor, 4)
    return c * m + 2 * m + m + 2 * (m + 1) * cin * k * k + cin * k * k + cin * k + 1


def test_yolov8n_sgdm_adds_the_abstract_budget_in_the_backbone():
    from ultralytics import YOLO
    from ultralytics.nn.modules import SPPF

    ours, stock = YOLO("yolov8n-sgdm.yaml").model, YOLO("yolov8n.yaml").model
    assert ours.yaml["scale"] == "n"
    delta = _n_params(ours) - _n_params(stock)
    assert abs(delta - SGDM_BUDGET) / SGDM_BUDGET <= 0.10, f"+{delta:,} params vs the abstract's +0.19M"
    sppf = next(i for i, m in enumerate(ours.model) if isinstance(m, SPPF))
    sgdms = [(i, m) for i, m in enumerate(ours.model) if isinstance(m, SGDM)]
    assert [i for i, _ in sgdms] == [3, 6, 9, 12] and all(i < sppf for i, _ in sgdms)  # one per backbone stage
    channels = [m.rd.razor.conv.in_channels for _, m in sgdms]
    assert channels == [32, 64, 128, 256] and [m.rd.razor.conv.out_channels for _, m in sgdms] == channels  # razor=1
    assert delta == sum(_n_params(m) for _, m in sgdms) == sum(map(_sgdm_params, channels))  # all of it is SGDM


def test_yolov8n_sgdm_trains_a_step():
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg

    torch.manual_seed(0)
    model = YOLO("yolov8n-sgdm.yaml").model
    model.args = get_cfg()
    g = torch.Generator().manual_seed(0)
    wh = torch.rand(6, 2, generator=g) * 0.4 + 0.05
    batch = {
        "img": torch.rand(2, 3, 64, 64, generator=g),
        "batch_idx": torch.tensor([0.0] * 3 + [1.0] * 3),
        "cls": torch.randint(0, 80, (6, 1), generator=g).float(),
        "bboxes": torch.cat((wh / 2 + torch.rand(6, 2, generator=g) * (1 - wh), wh), 1),
    }
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss, _ = model.loss(batch)
    loss.sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:  # all but Detect's fixed DFL projection
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"bad gradient at {name}"
    sgdm_grads = [p.grad.abs().sum() for m in model.model if isinstance(m, SGDM) for p in m.parameters()]
    assert len(sgdm_grads) == 4 * len(list(SGDM(8).parameters())) and all(
        s > 0 for s in sgdm_grads
    )  # every SGDM parameter learns
    names = [n for n, _ in model.named_parameters() if ".gen_" in n or ".static" in n]  # the kernel generators
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert len(names) == 4 * 5 and not unchanged, unchanged
    loss2, _ = model.loss(batch)
    assert torch.isfinite(loss2).all()
