"""MRAE, E-FPN-BS (CEM, FBSM, DCLoss) and SGDM/RDConv: equations on hand-built tensors, gradients, scales, the
example models' ONNX export parity, and one stock-CLI training epoch per example model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, yolo

from so_det_ultra.losses.dcloss import DCLoss, scale_weights
from so_det_ultra.nn.efpn import CEM, FBSM
from so_det_ultra.nn.mrae import MRAE, cosine_level_weights
from so_det_ultra.nn.sgdm import SGDM, RDConv, dynamic_conv

EXAMPLES = ("so-det-mrae-s.yaml", "so-det-efpn-s.yaml", "yolov8n-sgdm.yaml", "so-det-sgdm-s.yaml")


def _levels(b=2, cs=(8, 12, 16), size=16):
    return [torch.randn(b, c, size >> i, size >> i) for i, c in enumerate(cs)]


def _all_params_get_gradients(m, *inputs):
    m.train()
    out = m(*inputs)
    out.square().mean().backward()
    bad = [
        n
        for n, p in m.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert not bad, f"no (finite, non-zero) gradient reached: {bad}"


# --- MRAE ----------------------------------------------------------------------------------------------------------


def test_cosine_level_weights_on_hand_built_vectors():
    v = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])  # template 0; cos = 1, 0, 1/sqrt(2)
    a = cosine_level_weights(v, template=0)
    d = torch.tensor([1.0, 0.0, 1 / math.sqrt(2)])
    torch.testing.assert_close(a[0], d.exp() / d.exp().sum())
    assert math.isclose(a.sum().item(), 1.0, rel_tol=1e-6)
    sharper = cosine_level_weights(v, template=0, tau=0.1)
    assert sharper[0, 0] > a[0, 0]  # lower temperature favours the template


@pytest.mark.parametrize("template", [0, 1, 2])
def test_mrae_weights_are_softmax_of_cosines_and_output_is_weighted_sum(template):
    torch.manual_seed(0)
    m = MRAE([8, 12, 16], 10, template=template).eval()
    xs = _levels()
    a = m.level_weights(xs)
    v = [fc(e(x).mean((2, 3))) for e, fc, x in zip(m.embed, m.fc, xs)]
    d = torch.stack([F.cosine_similarity(v[template], vi, dim=1) for vi in v], 1)
    torch.testing.assert_close(a, d.softmax(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.sum(1), torch.ones(2))
    torch.testing.assert_close(d[:, template], torch.ones(2))  # D_t = 1
    ref = sum(
        a[:, i, None, None, None] * F.interpolate(m.align[i](x), scale_factor=2**i, mode="nearest")
        for i, x in enumerate(xs)
    )
    torch.testing.assert_close(m(xs), ref, rtol=1e-5, atol=1e-5)


def test_mrae_soft_mode_is_softmax_of_global_max():
    torch.manual_seed(0)
    m = MRAE([8, 12, 16], 10, mode="soft").eval()
    xs = _levels()
    f = torch.stack([s(x).flatten(1).max(1).values for s, x in zip(m.score, xs)], 1)
    torch.testing.assert_close(m.level_weights(xs), f.softmax(1))
    assert m(xs).shape == (2, 10, 16, 16)


@pytest.mark.parametrize("mode", ["cosine", "soft"])
def test_mrae_gradients(mode):
    _all_params_get_gradients(MRAE([8, 12, 16], 10, mode=mode), _levels())


@pytest.mark.parametrize(
    "kwargs,match", [({"template": 3}, "template"), ({"mode": "hard"}, "mode"), ({"tau": 0}, "tau")]
)
def test_mrae_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MRAE([8, 12, 16], 10, **kwargs)


# --- E-FPN-BS: CEM, FBSM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fuse", ["add", "gate"])
def test_cem_equals_formula(fuse):
    torch.manual_seed(0)
    m = CEM([8, 16], 12, fuse=fuse).eval()
    s, d = torch.randn(2, 8, 16, 16), torch.randn(2, 16, 4, 4)
    z = m.compress(d)
    local = m.local(z).repeat_interleave(4, 2).repeat_interleave(4, 3)  # nearest x4
    g = m.glob(z.mean((2, 3), keepdim=True))
    mix = g.sigmoid() * local if fuse == "gate" else local + g
    torch.testing.assert_close(m([s, d]), m.out(m.shallow(s) + mix), rtol=1e-5, atol=1e-5)
    _all_params_get_gradients(m, [s, d])


def test_fbsm_mask_in_unit_interval_and_amplifies():
    torch.manual_seed(0)
    m = FBSM(16).eval()
    for scale in (1.0, 1e4):  # saturating inputs too
        x = torch.randn(2, 16, 8, 8) * scale
        mask = m.mask(x)
        assert mask.shape == (2, 1, 8, 8)
        assert mask.min() >= 0 and mask.max() <= 1 and torch.isfinite(mask).all()
        torch.testing.assert_close(m(x), x * (1 + mask))


@pytest.mark.parametrize("mode", ["amplify", "separate"])
def test_fbsm_gradients(mode):
    _all_params_get_gradients(FBSM(16, mode=mode), torch.randn(2, 16, 8, 8))


def test_fbsm_separate_mode_is_conv_of_foreground_and_background():
    torch.manual_seed(0)
    m = FBSM(8, mode="separate").eval()
    x = torch.randn(1, 8, 8, 8)
    k = m.mask(x)
    torch.testing.assert_close(m(x), m.separate(torch.cat((x * k, x * (1 - k)), 1)))


# --- SGDM / RDConv ---------------------------------------------------------------------------------------------------


def test_dynamic_conv_equals_per_sample_conv():
    torch.manual_seed(0)
    for cin, k in ((2, 7), (3, 3), (1, 5)):
        u, w = torch.randn(3, cin, 9, 11), torch.randn(3, cin, k, k)
        ref = torch.cat([F.conv2d(u[i : i + 1], w[i : i + 1], padding=k // 2) for i in range(3)])
        diff = (dynamic_conv(u, w, cin, k) - ref).abs().max().item()
        assert diff < 1e-4, f"cin={cin} k={k}: max abs diff {diff}"


def test_static_kernel_shares_the_asymmetric_taps():
    m = RDConv(16, cin=1, k=3)
    with torch.no_grad():
        m.static.zero_()
        m.shared.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    expected = torch.tensor([[0.0, 1.0, 0.0], [1.0, 4.0, 3.0], [0.0, 3.0, 0.0]])  # row(a) + col(a): centre 2 + 2
    torch.testing.assert_close(m.static_kernel()[0], expected)


@pytest.mark.parametrize("guide", ["mul", "add"])
def test_rdconv_with_constant_generator_is_a_static_conv(guide):
    torch.manual_seed(0)
    m = RDConv(16, cin=2, k=5, guide=guide).eval()
    with torch.no_grad():
        for lin in (m.gen_c, m.gen_s):
            lin.weight.zero_()
            lin.bias.uniform_(-1, 1)
        m.shared.normal_()
        m.bias.fill_(0.3)
    d = (m.gen_c.bias + m.gen_s.bias).view(2, 5, 5)
    w = m.static_kernel() * (1 + d.tanh()) if guide == "mul" else m.static_kernel() + d
    u = torch.randn(3, 2, 10, 12)
    for x in (torch.randn(3, 16, 10, 12), 5 * torch.randn(3, 16, 10, 12)):  # the guide input no longer matters
        torch.testing.assert_close(m(x, u), F.conv2d(u, w[None], m.bias, padding=2), rtol=1e-4, atol=1e-5)


def test_rdconv_kernel_depends_on_content():
    torch.manual_seed(0)
    m = RDConv(16).eval()
    x = torch.randn(2, 16, 8, 8)
    k = m.kernel(x)
    assert k.shape == (2, 2, 7, 7) and not torch.allclose(k[0], k[1])
    u = torch.randn(2, 2, 8, 8)
    assert (m(x, u) - m.forward_reference(x, u)).abs().max() < 1e-4


def test_sgdm_equals_spatial_attention_formula_and_gets_gradients():
    torch.manual_seed(0)
    m = SGDM(16).eval()
    x = torch.randn(2, 16, 8, 8)
    s = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)
    torch.testing.assert_close(m(x), x * m.rd.forward_reference(x, s).sigmoid(), rtol=1e-5, atol=1e-5)
    _all_params_get_gradients(SGDM(16), torch.randn(2, 16, 8, 8))


def _with_old_spatial_bias(model, value=0.7):
    """``model`` with every RDConv's spatial-branch conv given a bias, as saved before it was removed."""
    for rd in (m for m in model.modules() if isinstance(m, RDConv)):
        conv = torch.nn.Conv2d(rd.where.in_channels, 1, 1)
        conv.weight.data.copy_(rd.where.weight)
        conv.bias.data.fill_(value)
        rd.where = conv
    return model


def test_sgdm_weights_saved_with_the_old_spatial_bias_still_load(tmp_path):
    """The spatial branch's bias had no effect (softmax over positions ignores a common shift) and is gone; weights
    and whole checkpoints saved with it load and predict as before."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    old = _with_old_spatial_bias(SGDM(16)).eval()
    new = SGDM(16).eval()
    new.load_state_dict(old.state_dict())  # strict: the old key is dropped, nothing is missing
    torch.testing.assert_close(new(x), old(x))

    model = _with_old_spatial_bias(DetectionModel("so-det-sgdm-s.yaml", nc=3, verbose=False)).eval()
    torch.save({"model": model, "train_args": {}}, tmp_path / "old.pt")  # an Ultralytics checkpoint pickles modules
    img = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model(img)[0]
        reloaded = YOLO(tmp_path / "old.pt").model.eval()
        torch.testing.assert_close(reloaded(img)[0], ref)
        fresh = DetectionModel("so-det-sgdm-s.yaml", nc=3, verbose=False).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(img)[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [({"k": 4}, "odd"), ({"guide": "x"}, "guide"), ({"razor": 0}, "razor")])
def test_sgdm_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGDM(16, **kwargs)


# --- DCLoss ----------------------------------------------------------------------------------------------------------


def test_scale_weights_follow_the_documented_curve():
    sizes = torch.tensor([2.0, 8.0, 32.0, 128.0, 1024.0])  # square boxes
    boxes = torch.stack([torch.zeros(5), torch.zeros(5), sizes, sizes], -1)[None]  # (1, 5, 4) xyxy
    fg = torch.tensor([[True, True, True, True, False]])
    raw = (32.0 / sizes).pow(0.5).clamp(0.25, 4.0)  # 4 (clamped), 2, 1, 0.5, 0.177 -> 0.25
    torch.testing.assert_close(scale_weights(boxes, fg, 0.5, 32, 4.0, normalize=False)[0, :4], raw[:4])
    w = scale_weights(boxes, fg, 0.5, 32, 4.0)
    torch.testing.assert_close(w[0, :4], raw[:4] / raw[:4].mean())
    assert w[0, 4] == 1.0  # background anchors keep weight 1
    assert math.isclose(w[fg].mean().item(), 1.0, rel_tol=1e-6)
    assert (scale_weights(boxes, fg, 0.0) == 1).all()  # gamma 0: no reweighting
    assert (scale_weights(boxes, torch.zeros_like(fg)) == 1).all()  # no positives: finite, all ones


@pytest.fixture(scope="module")
def efpn_and_batch():
    """so-det-efpn-s (its YAML selects DCLoss) with training args attached, and a 2-image batch of 1-27 px boxes."""
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg

    model = YOLO("so-det-efpn-s.yaml").model
    model.args = get_cfg()
    g = torch.Generator().manual_seed(0)
    n = 10
    wh = torch.rand(n, 2, generator=g) * 0.4 + 0.02  # tiny to large boxes
    xy = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    batch = {
        "img": torch.rand(2, 3, 64, 64, generator=g),
        "batch_idx": torch.tensor([0.0] * 5 + [1.0] * 5),
        "cls": torch.randint(0, 3, (n, 1), generator=g).float(),
        "bboxes": torch.cat((xy, wh), 1),
    }
    return model, batch


def test_dcloss_is_selected_from_the_yaml_and_is_a_drop_in(efpn_and_batch):
    from ultralytics.utils.loss import v8DetectionLoss

    model, batch = efpn_and_batch
    crit = model.init_criterion()
    assert isinstance(crit, DCLoss) and crit.gamma == 0.5 and crit.max_weight == 4.0
    model.train()
    preds = model(batch["img"])
    stock = v8DetectionLoss(model)
    torch.manual_seed(0)
    same = DCLoss(model, gamma=0.0)(preds, batch)
    ref = stock(preds, batch)
    torch.testing.assert_close(same[0], ref[0])  # gamma=0 is exactly the stock loss
    assert list(same[1]) == list(ref[1])  # same loss item names
    loss, items = crit(preds, batch)
    assert loss.shape == ref[0].shape and torch.isfinite(loss).all()
    assert not torch.allclose(loss, ref[0]), "scale weights changed nothing"
    loss.sum().backward()
    assert all(p.grad is not None for p in model.model[-1].parameters() if p.requires_grad)


def test_dcloss_upweights_small_objects(efpn_and_batch):
    model, batch = efpn_and_batch
    crit = DCLoss(model, gamma=1.0, ref=8.0, normalize=False)  # boxes of ~1-27 px at 64 px: both sides of ref
    model.train()
    crit(model(batch["img"]), batch)
    w = crit.weights
    assert w.shape[0] == 2 and (w > 1).any() and (w < 1).any()


# --- models: scales, params, export, training --------------------------------------------------------------------


def _layers(family, scale):
    """The layers of cfg/models/<family>.yaml at a scale, built by (our patched) parse_model without a forward pass."""
    from ultralytics.nn import tasks

    from so_det_ultra import paths

    d = tasks.yaml_model_load(paths.model_cfg(f"{family}.yaml"))
    d["scale"] = scale
    return tasks.parse_model(d, ch=3, verbose=False)[0]


def _first(layers, cls):
    return next(m for m in layers if isinstance(m, cls))


@pytest.mark.parametrize("scale,c2", [("n", 48), ("s", 64), ("l", 256)])
def test_scales_reach_the_new_blocks(scale, c2):
    # 256 in the YAML: n width 0.1875 -> 48, s 0.25 -> 64, l width 1.0 (max 512) -> 256
    assert _first(_layers("so-det-mrae", scale), MRAE).align[0].conv.out_channels == c2
    efpn = _layers("so-det-efpn", scale)
    assert _first(efpn, CEM).out.conv.out_channels == c2
    assert _first(efpn, FBSM).hidden.conv.in_channels == c2  # first FBSM gates the P2 output (256 in the YAML)
    assert _first(_layers("so-det-sgdm", scale), SGDM).rd.razor.conv.in_channels == c2  # backbone P2: 256 in the YAML
    assert _first(_layers("so-det-sgdm-neck", scale), SGDM).rd.razor.conv.in_channels == 2 * c2  # P3 out: 512


def test_so_det_sgdm_default_places_sgdm_in_the_backbone():
    """so-det-sgdm: one SGDM [7, 1] after each backbone stage, before SPPF; the neck placement is a named variant."""
    from ultralytics.nn.modules import SPPF

    layers = _layers("so-det-sgdm", "s")
    sppf = next(i for i, m in enumerate(layers) if isinstance(m, SPPF))
    idx = [i for i, m in enumerate(layers) if isinstance(m, SGDM)]
    assert idx == [3, 6, 9] and sppf == 10
    assert [layers[i].rd.razor.conv.out_channels for i in idx] == [64, 128, 128]  # razor = 1 at s width
    neck = _layers("so-det-sgdm-neck", "s")
    assert all(
        i > next(j for j, m in enumerate(neck) if isinstance(m, SPPF))
        for i, m in enumerate(neck)
        if isinstance(m, SGDM)
    )


def test_max_channels_caps_the_new_blocks():
    # yolov8 x: width 1.25, max_channels 512: the P5 neck output (1024 in the YAML) is capped to 512 * 1.25 = 640
    sgdms = [m for m in _layers("yolov8-sgdm-neck", "x") if isinstance(m, SGDM)]
    assert [m.rd.razor.conv.in_channels for m in sgdms] == [320, 640, 640]


def test_yolov8_sgdm_resolves_ultralytics_style_name_and_adds_few_params():
    from ultralytics import YOLO

    ours, stock = YOLO("yolov8n-sgdm-neck.yaml").model, YOLO("yolov8n.yaml").model
    assert ours.yaml["scale"] == "n"
    assert sum(isinstance(m, SGDM) for m in ours.model) == 3
    delta = sum(p.numel() for p in ours.parameters()) - sum(p.numel() for p in stock.parameters())
    assert 0 < delta < 0.19e6, delta  # paper: +0.19M; ours is a lighter interpretation (docs/blocks.md)


def _rel_diff(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-9))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_model_onnx_export_matches_pytorch(name, tmp_path, monkeypatch):
    import onnxruntime as ort
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = YOLO(name)
    f = model.export(format="onnx", imgsz=64, dynamic=True)
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    ref_model = model.model.fuse().eval()
    for b, s in ((1, 64), (2, 96)):  # dynamic batch and size: the dynamic kernels must not freeze the batch
        x = np.random.default_rng(0).random((b, 3, s, s), dtype=np.float32)
        out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(x))[0].numpy()
        assert out.shape == ref.shape
        d = _rel_diff(out, ref)
        assert d <= 1e-4, f"{name} ONNX vs PyTorch at batch {b}, {s}px: max abs diff {d:.2e} of output scale"


@pytest.mark.cli
@pytest.mark.parametrize("name", ["so-det-mrae-s", "so-det-efpn-s", "yolov8n-sgdm", "so-det-sgdm-s"])
def test_example_model_trains_one_epoch_through_stock_cli(name, tiny_data, workdir, tmp_path):
    out = yolo("train", f"model={name}.yaml", f"data={tiny_data}", *FAST, f"project={tmp_path}", "name=t", cwd=workdir)
    log = out.stdout + out.stderr
    assert f"{name} summary" in log.lower() or f"{name} summary" in log, log[-2000:]
    assert (tmp_path / "t" / "weights" / "best.pt").is_file()
