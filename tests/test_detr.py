"""SO-Det RT-DETR models and the Better Sampling losses (ST, SR, SPR; docs/detr.md)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from conftest import FAST, yolo

from so_det_ultra import paths
from so_det_ultra.losses.better_sampling import BetterSampling, sample_reweight, scale_aligned_target, spr_losses
from so_det_ultra.nn.detr import SampleWeightGenerator, SamplingRTDETRDecoder

SO_DET_RTDETR = yaml.safe_load((paths.cfg_root() / "models" / "so-det-rtdetr.yaml").read_text())
ALL_ON = {"type": "BetterSampling", "st": True, "sr": True, "spr": True}


def with_loss(d, loss):
    """``d`` with a ``loss:`` section; a loss with SR also gets ``{sr: true}`` in the decoder row (SR's generator)."""
    d = copy.deepcopy(d)
    if loss:
        d["loss"] = loss
        if loss.get("sr"):
            d["head"][-1][3] = [*d["head"][-1][3], {"sr": True}]
    return d


def build(loss=None, scale="n", nc=3, seed=0):
    from ultralytics.nn.tasks import RTDETRDetectionModel

    d = with_loss(SO_DET_RTDETR, loss)
    d.update(scale=scale, nc=nc)
    torch.manual_seed(seed)
    return RTDETRDetectionModel(d, nc=nc, verbose=False)


def batch(bs=2):
    g = torch.Generator().manual_seed(0)
    return {
        "img": torch.rand(bs, 3, 64, 64, generator=g),
        "batch_idx": torch.tensor([0.0, 0, 1]),
        "cls": torch.tensor([[0.0], [1], [2]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.6, 0.2, 0.1], [0.5, 0.5, 0.05, 0.05]]),
    }


# ---------------------------------------------------------------- ST (eqs. 7-15)
def test_st_equal_areas_give_v_one():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    pred = torch.tensor([[0.52, 0.5, 0.2, 0.2]])  # rho = 1 -> v = 1 -> t = u^beta
    u = (0.18 * 0.2) / (2 * 0.04 - 0.18 * 0.2)
    for theta in (1.0, 6.0, 50.0):
        assert scale_aligned_target(pred, gt, beta=0.73, theta=theta).item() == pytest.approx(u**0.73, rel=1e-5)


def test_st_hand_value_and_theta_penalises_size_mismatch():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    pred = torch.tensor([[0.5, 0.5, 0.1, 0.1]])  # inside gt: u = 0.25, rho = 0.25, sqrt(rho) = 0.5
    t6 = scale_aligned_target(pred, gt, beta=0.73, theta=6.0).item()
    assert t6 == pytest.approx(0.25**0.73 * math.exp(-6 * 0.25) ** 0.27, rel=1e-5)
    ts = [scale_aligned_target(pred, gt, theta=th).item() for th in (0.0, 1.5, 3.0, 6.0, 9.0)]
    assert all(a > b for a, b in zip(ts, ts[1:])), ts


def test_st_target_never_exceeds_classification_target():
    g = torch.Generator().manual_seed(1)
    gt = torch.cat([torch.rand(200, 2, generator=g), torch.rand(200, 2, generator=g) * 0.3 + 0.01], 1)
    pred = gt + torch.randn(200, 4, generator=g) * 0.05
    pred[:, 2:] = pred[:, 2:].abs() + 1e-3
    for s in (1.0, 0.7):
        t = scale_aligned_target(pred, gt, beta=0.73, theta=6.0, s=s)
        assert (t <= s + 1e-6).all() and (t >= 0).all()


def test_losses_without_switches_and_with_beta_one_equal_stock_vfl():
    """beta = 1 with s = 1 reduces ST to IoU-aware VFL: BetterSampling equals Ultralytics' RTDETRDetectionLoss."""
    from ultralytics.models.utils.loss import RTDETRDetectionLoss

    m = build()
    m.train()
    b = batch()
    preds = m.predict(b["img"], batch=targets_of(b))
    values = []
    for crit in (
        RTDETRDetectionLoss(nc=3, use_vfl=True),
        BetterSampling(m),
        BetterSampling(m, st={"beta": 1.0, "s": "target"}),
        BetterSampling(m, st=True),
    ):
        m.criterion = crit
        values.append(float(m.loss(b, preds)[0].detach()))
    assert values[1] == pytest.approx(values[0], rel=1e-6) and values[2] == pytest.approx(values[0], rel=1e-6), values
    assert values[3] != pytest.approx(values[0], rel=1e-4)  # the default ST does change the loss


def test_st_target_reads_predicted_confidence_two_queries():
    """Two queries, one object: the positive's VFL target is t = u^beta v^(1-beta) * sigmoid(logit) (eqs. 2, 15, 19).

    Query 0 (matched) is a box of half the object's side inside it: u = 0.25, rho = 0.25, sqrt(rho) = 0.5, so
    c = 0.25^0.73 * exp(-6 * 0.25)^0.27; its logit for the object's class is 2. Query 1 is a negative.
    """
    m = build()
    gt_cls, gt_box = torch.tensor([0]), torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.1, 0.1, 0.05, 0.05]]])
    logits = torch.tensor([[[2.0, -1.0, -2.0], [-3.0, 0.5, -1.5]]])
    match = [(torch.tensor([0]), torch.tensor([0]))]
    c = 0.25**0.73 * math.exp(-6 * 0.25) ** 0.27

    def loss_class(**st):
        crit = BetterSampling(m, st={"beta": 0.73, "theta": 6.0, **st})
        crit.device = boxes.device
        terms, _ = crit._layer_loss(boxes, logits, (gt_cls, gt_box, [1]), "", match, None, None)
        return terms["loss_class"].item()

    def by_hand(t):  # VFL: positive q = t (weight t), negatives alpha p^gamma BCE(p, 0); alpha 0.25, gamma 1.5
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        neg = logits.clone()
        q = torch.zeros_like(logits)
        q[0, 0, 0] = t
        w = 0.25 * logits.sigmoid() ** 1.5
        w[0, 0, 0] = t
        return (bce(neg, q, reduction="none") * w).sum().item()

    t_pred = c * torch.sigmoid(torch.tensor(2.0)).item()  # s = predicted confidence, ~0.176 * 0.881
    assert loss_class() == pytest.approx(by_hand(t_pred), rel=1e-5)
    assert loss_class(s="target") == pytest.approx(by_hand(c), rel=1e-5)  # the earlier reading, s = 1
    assert by_hand(t_pred) != pytest.approx(by_hand(c), rel=1e-3)
    with pytest.raises(ValueError, match="s in"):
        BetterSampling(m, st={"s": "probability"})


def targets_of(b):
    return {
        "cls": b["cls"].long().view(-1),
        "bboxes": b["bboxes"],
        "batch_idx": b["batch_idx"].long(),
        "gt_groups": [int((b["batch_idx"] == i).sum()) for i in range(len(b["img"]))],
    }


# ---------------------------------------------------------------- SR (eqs. 16-21)
def test_sr_reweight_limits():
    w = torch.tensor([0.5, 0.6, 0.9, 0.99])
    t = torch.tensor([0.3, 0.8, 0.1, 0.5])
    assert torch.allclose(sample_reweight(w, t, t), w)  # t = s -> r = w
    assert torch.allclose(sample_reweight(w, torch.ones(4), torch.zeros(4)), torch.ones(4))  # |t - s| = 1 -> r = 1
    r = sample_reweight(w, torch.full((4,), 0.9), torch.full((4,), 0.2))
    assert torch.allclose(r, w**0.3) and (r > w).all()


def test_sr_generator_range_shape_and_gradient():
    g = SampleWeightGenerator(32).train()
    h_cls, h_reg = torch.randn(2, 50, 32, requires_grad=True), torch.randn(2, 50, 32, requires_grad=True)
    w = g(h_cls, h_reg)
    assert w.shape == (2, 50, 2) and (w >= 0.5).all() and (w < 1).all()
    w.sum().backward()
    assert g.shared.conv.weight.grad.abs().sum() > 0 and h_cls.grad is None  # features detached by default


# ---------------------------------------------------------------- SPR (eqs. 5-6)
def test_spr_zero_when_all_points_inside():
    n_points = 4
    offsets = (torch.rand(5, 8, 12, 2) * 2 - 1) * n_points  # |d| <= 1/2 box: all inside
    l_off, l_att = spr_losses(offsets, torch.randn(5, 8, 12), eta=1.0, n_points=n_points)
    assert l_off.abs().max() == 0 and l_att.abs().max() == 0


def test_spr_hand_values():
    # one query, one head, one level, two points: point 0 inside (d = 0.25, 0), point 1 outside (d = 1.0, 0.75)
    offsets = torch.tensor([[[[1.0, 0.0], [4.0, 3.0]]]])  # ndp = 2: d = offsets / 4
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax: A_in = 0.25, A_out = 0.75
    l_off, l_att = spr_losses(offsets, logits, eta=1.2, n_points=2)
    assert l_off.item() == pytest.approx(((1.0 - 0.6) + (0.75 - 0.6)) ** 2 / 2)  # mean over the 2 points
    assert l_att.item() == pytest.approx((0.75 - 0.25) / 2)


def test_spr_and_sr_gradients_reach_projections_and_generator():
    m = build(ALL_ON)
    m.train()
    head = m.model[-1]
    with torch.no_grad():  # push some sampling points outside their boxes so SPR is active
        for layer in head.decoder.layers:
            layer.cross_attn.sampling_offsets.bias.mul_(3.0)
            layer.cross_attn.attention_weights.bias.normal_()  # zero-initialised: uniform A, L_atten would be 0
    b = batch()
    crit = BetterSampling(m, spr=True)
    preds = m.predict(b["img"], batch=targets_of(b))
    m.criterion = crit
    dec_b, dec_s, enc_b, enc_s, dn_meta = preds
    dn_b, dec_b = torch.split(dec_b, dn_meta["dn_num_split"], dim=2)
    dn_s, dec_s = torch.split(dec_s, dn_meta["dn_num_split"], dim=2)
    out = crit((torch.cat([enc_b[None], dec_b]), torch.cat([enc_s[None], dec_s])), targets_of(b), dn_b, dn_s, dn_meta)
    assert out["loss_offset"] > 0 and out["loss_atten"] > 0
    (out["loss_offset"] + out["loss_atten"]).backward()
    ca = head.decoder.layers[0].cross_attn
    assert ca.sampling_offsets.weight.grad.abs().sum() > 0 and ca.attention_weights.weight.grad.abs().sum() > 0
    m.zero_grad()
    m.criterion = BetterSampling(m, sr=True)
    m.loss(b)[0].backward()
    assert head.sr_gen.shared.conv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- decoder and models
def test_decoder_is_stock_at_inference_and_leaves_no_hooks():
    from ultralytics.nn.modules import RTDETRDecoder

    ch = (16, 32, 32)
    torch.manual_seed(0)
    ours = SamplingRTDETRDecoder(3, ch, hd=32, nq=20, ndl=2, d_ffn=64, sr=True).eval()
    stock = RTDETRDecoder(3, ch, hd=32, nq=20, ndl=2, d_ffn=64).eval()
    stock.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("sr_gen.")})
    x = [torch.randn(1, c, s, s) for c, s in zip(ch, (16, 8, 4))]
    assert torch.equal(ours(x)[0], stock(x)[0])
    ours.train()
    b = targets_of(batch())
    *_, dn_meta = ours([t.expand(2, -1, -1, -1) for t in x], b)
    s = dn_meta["sampling"]
    assert s["offsets"].shape[:2] == (2, 2) and s["offsets"].shape[-3:] == (8, 12, 2) and s["sr_w"].shape[-1] == 2
    mods = list(ours.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mods)
    tensors = lambda net: {k for m in net.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)}  # noqa: E731
    assert tensors(ours) == tensors(stock), "no tensors left behind but the stock decoder's own anchor cache"


def test_models_build_and_yolo_says_to_use_rtdetr(tmp_path, monkeypatch):
    from ultralytics import RTDETR, YOLO

    monkeypatch.chdir(tmp_path)
    head = RTDETR("so-det-rtdetr-n.yaml").model.model[-1]
    assert isinstance(head, SamplingRTDETRDecoder) and head.num_queries == 500 and head.num_decoder_layers == 3
    assert head.sr_gen is None  # no `{sr: true}` in the decoder row: no generator
    with pytest.raises(TypeError, match="RTDETR"):
        YOLO("so-det-rtdetr-n.yaml")
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    from so_det_ultra.integration import PATCHES

    assert "ultralytics.nn.tasks.guess_model_task" in PATCHES
    assert guess_model_task(yaml_model_load("yolo11n.yaml")) == "detect"  # everything else: Ultralytics' answer
    assert isinstance(RTDETR("rtdetr-bs.yaml").model.model[-1].sr_gen, SampleWeightGenerator)


def test_sr_and_spr_need_our_decoder():
    from ultralytics.nn.tasks import RTDETRDetectionModel

    d = yaml.safe_load((paths.cfg_root() / "models" / "rtdetr-bs.yaml").read_text())
    d["head"][-1][2:] = ["RTDETRDecoder", ["nc"]]  # the stock decoder takes no `{sr: true}` option
    d["loss"] = {"type": "BetterSampling", "st": True}
    m = RTDETRDetectionModel(copy.deepcopy(d), nc=2, verbose=False)
    assert isinstance(m.init_criterion(), BetterSampling)  # ST alone works on the stock decoder
    for sw in ("sr", "spr"):
        with pytest.raises(ValueError, match="SamplingRTDETRDecoder"):
            BetterSampling(m, **{sw: True})
    with pytest.raises(ValueError, match="keys"):
        BetterSampling(m, st={"betta": 0.5})


def test_sr_is_a_decoder_row_option_checked_by_the_loss():
    from ultralytics.nn.tasks import RTDETRDetectionModel

    d = copy.deepcopy(SO_DET_RTDETR)
    d.update(scale="n", nc=3, loss={"type": "BetterSampling", "sr": True})  # the loss asks for SR, the row does not
    m = RTDETRDetectionModel(copy.deepcopy(d), nc=3, verbose=False)
    assert m.model[-1].sr_gen is None, "the decoder is built from its own row, not from `loss:`"
    with pytest.raises(ValueError, match=r"\{sr: true\}"):
        m.init_criterion()
    m = build({"type": "BetterSampling", "sr": True})
    assert isinstance(m.model[-1].sr_gen, SampleWeightGenerator) and m.model[-1].sr_gen.detach
    with pytest.raises(ValueError, match="decoder's YAML row"):
        BetterSampling(m, sr={"detach_features": False})
    d["head"][-1][3] = ["nc", 256, 500, {"sr": True, "sr_detach": False}]
    assert not RTDETRDetectionModel(copy.deepcopy(d), nc=3, verbose=False).model[-1].sr_gen.detach
    d["head"][-1][3] = ["nc", {"sr": True, "nope": 1}]
    with pytest.raises(ValueError, match="options mapping"):
        RTDETRDetectionModel(copy.deepcopy(d), nc=3, verbose=False)


def test_batch_without_objects_keeps_stock_dn_meta_and_trains():
    """No objects: no denoising groups, dn_meta None as in the stock decoder; both losses still run."""
    from ultralytics.models.utils.loss import RTDETRDetectionLoss

    m = build(ALL_ON)
    m.train()
    b = batch()
    b.update(batch_idx=torch.zeros(0), cls=torch.zeros(0, 1), bboxes=torch.zeros(0, 4))
    assert m.predict(b["img"], batch=targets_of(b))[-1] is None
    for crit in (RTDETRDetectionLoss(nc=3, use_vfl=True), BetterSampling(m, st=True, sr=True, spr=True)):
        m.criterion = crit
        loss, _ = m.loss(b)
        assert torch.isfinite(loss)


def test_each_switch_alone_trains_a_step():
    for sw in ("st", "sr", "spr"):
        m = build({"type": "BetterSampling", sw: True})
        m.train()
        loss, items = m.loss(batch())
        loss.backward()
        assert torch.isfinite(loss) and set(items) == {"giou_loss", "cls_loss", "l1_loss"}


def test_loss_falls_with_all_switches_on():
    m = build(ALL_ON)
    m.train()
    b = batch()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    hist = []
    for _ in range(30):
        torch.manual_seed(0)  # same denoising groups each step
        loss = m.loss(b)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(float(loss))
    first, last = sum(hist[:5]) / 5, sum(hist[-5:]) / 5
    assert last < 0.7 * first, hist


# ---------------------------------------------------------------- export
def test_onnx_parity_and_no_growth_from_training_only_parts(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from ultralytics import RTDETR

    monkeypatch.chdir(tmp_path)
    counts, torch_params = {}, {}
    for name, loss in (("plain", None), ("all", ALL_ON)):
        d = with_loss(SO_DET_RTDETR, loss)
        d.update(scale="n", nc=3)
        f = tmp_path / f"so-det-rtdetr-{name}.yaml"
        f.write_text(yaml.safe_dump(d))
        torch.manual_seed(0)
        model = RTDETR(str(f))
        torch_params[name] = sum(p.numel() for p in model.model.parameters())
        out = model.export(format="onnx", imgsz=64, simplify=False)
        counts[name] = sum(math.prod(t.dims) for t in onnx.load(out).graph.initializer)
    assert torch_params["all"] > torch_params["plain"]  # the SR generator exists in training...
    assert counts["all"] == counts["plain"], counts  # ...but not in the exported graph

    # parity of the last export ("all") against PyTorch: every PyTorch top row has a matching ONNX row
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    net = model.model.eval()
    with torch.no_grad():
        ref = net(x)[0][0]  # (k, 6) sorted by score
    got = torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0][0])
    top = ref[: len(got) - 20]
    diff = (top[:, None, :] - got[None, :, :]).abs().amax(-1).amin(1)
    assert diff.max() < 1e-3, f"max diff of best match {diff.max():.2e}"


# ---------------------------------------------------------------- stock CLI
CLI_CASES = {"plain": None, "all": ALL_ON}  # ("none" would read as None in name=)
SLOW_CASES = {
    "st": {"type": "BetterSampling", "st": True},
    "sr": {"type": "BetterSampling", "sr": True},
    "spr": {"type": "BetterSampling", "spr": True},
}


def write_yaml(dirpath, name, loss):
    d = with_loss(SO_DET_RTDETR, loss)
    d.update(scale="n")
    f = dirpath / f"so-det-rtdetr-{name}-test.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


@pytest.mark.cli
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_stock_cli_trains_one_epoch(case, tiny_data, workdir, tmp_path):
    model = "so-det-rtdetr-n.yaml" if case == "plain" else write_yaml(workdir, case, CLI_CASES[case])
    proc = yolo(
        "train", f"model={model}", f"data={tiny_data}", *FAST, f"project={tmp_path}", f"name={case}", cwd=workdir
    )
    last = tmp_path / case / "weights" / "last.pt"
    assert last.exists(), proc.stdout[-2000:]
    head = torch.load(last, map_location="cpu", weights_only=False)["model"].model[-1]
    assert isinstance(head, SamplingRTDETRDecoder) and (head.sr_gen is not None) == (case == "all")


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_stock_cli_trains_one_epoch_each_switch(case, tiny_data, workdir, tmp_path):
    model = write_yaml(workdir, case, SLOW_CASES[case])
    yolo("train", f"model={model}", f"data={tiny_data}", *FAST, f"project={tmp_path}", f"name={case}", cwd=workdir)
    assert (tmp_path / case / "weights" / "last.pt").exists()
