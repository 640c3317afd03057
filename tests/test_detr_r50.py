"""The Better Sampling paper's baseline layout: rtdetr-r50-bs.yaml (docs/detr.md)."""

from __future__ import annotations

import torch

from so_det_ultra.losses.better_sampling import BetterSampling
from so_det_ultra.nn.detr import SampleWeightGenerator, SamplingRTDETRDecoder


def test_rtdetr_r50_bs_is_stock_resnet50_plus_the_training_only_parts(tmp_path, monkeypatch):
    """rtdetr-r50-bs.yaml: Ultralytics' rtdetr-resnet50 layout (the paper's baseline) with all Better Sampling parts."""
    from ultralytics import RTDETR

    monkeypatch.chdir(tmp_path)
    ours, stock = RTDETR("rtdetr-r50-bs.yaml").model, RTDETR("rtdetr-resnet50.yaml").model
    head = ours.model[-1]
    assert isinstance(head, SamplingRTDETRDecoder) and isinstance(head.sr_gen, SampleWeightGenerator)
    assert isinstance(ours.init_criterion(), BetterSampling)
    assert ours.yaml["loss"]["st"]["s"] == "predicted"
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(ours) - n(head.sr_gen) == n(stock)  # layer for layer the stock model, SR's generator aside
    assert [type(m).__name__ for m in ours.model[:-1]] == [type(m).__name__ for m in stock.model[:-1]]
    with torch.no_grad():
        y = ours.eval()(torch.zeros(1, 3, 64, 64))
    assert y[0].shape[:2] == (1, head.num_queries) and torch.isfinite(y[0]).all()
