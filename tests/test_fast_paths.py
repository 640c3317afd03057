"""Every rewritten block equals its reference formula, in PyTorch and after ONNX export (ONNX Runtime on CPU).

Tolerance: max |fast - reference| <= 1e-4 x max |reference| (relative to the output scale).
"""

import io

import numpy as np
import pytest
import torch
from ultralytics.nn.modules import Detect
from ultralytics.nn.modules.block import DFL

from so_det_ultra.nn import CDown, EAFusion, FastDetect, FastDFL, SimAM, SWSConv
from so_det_ultra.nn.fusion import CGASpatialAttention, channel_max, simam, simam_reference

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def assert_close_to_scale(out, ref, rel=1e-4):
    out, ref = torch.as_tensor(out).detach().float(), torch.as_tensor(ref).detach().float()
    assert out.shape == ref.shape
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"max abs diff {err:.3g} vs output scale {scale:.3g}"


def randomize(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BN statistics, so no parity holds by accident of an init (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        p.data = torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if name.endswith("w0") else 0)
    for name, b in m.named_buffers():
        if name.endswith("running_mean"):
            b.data = torch.randn(b.shape, generator=g) * 0.2
        elif name.endswith("running_var"):
            b.data = torch.rand(b.shape, generator=g) + 0.5
    return m.eval()


def onnx_run(fn, inputs, owner=None, opset=18):
    """Export ``fn`` (a module, or a callable of ``owner``'s) to ONNX, run it in ONNX Runtime; (outputs, op types)."""
    import onnx

    class Wrap(torch.nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f, self.owner = f, owner  # owner's parameters become graph initializers

        def forward(self, *xs):
            return self.f(*xs)

    mod = fn if isinstance(fn, torch.nn.Module) else Wrap(fn)
    f, names = io.BytesIO(), [f"x{i}" for i in range(len(inputs))]
    torch.onnx.export(mod.eval(), tuple(inputs), f, opset_version=opset, input_names=names, dynamo=False)
    model = onnx.load_from_string(f.getvalue())
    try:  # Ultralytics simplifies every ONNX export with onnxslim: test the graph users get
        import onnxslim

        model = onnxslim.slim(model)
    except ImportError:
        pass
    ops = {n.op_type for n in model.graph.node}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: x.numpy() for n, x in zip(names, inputs)}), ops


@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_simam_equals_reference(parts, offset):
    torch.manual_seed(parts)
    x = torch.randn(2, 5, 8, 12) * 2 + offset
    assert_close_to_scale(simam(x, parts), simam_reference(x, parts))
    assert_close_to_scale(SimAM(parts=parts)(x), SimAM(parts=parts).forward_reference(x))


def test_simam_constant_window_and_bad_sizes():
    x = torch.ones(1, 2, 4, 4)  # zero variance: e = 0.5 in both forms
    torch.testing.assert_close(simam(x, 2), simam_reference(x, 2))
    torch.testing.assert_close(simam(x, 2), x * torch.sigmoid(torch.tensor(0.5)))
    with pytest.raises(ValueError, match="divisible by parts"):
        simam(torch.randn(1, 2, 6, 5), 2)


@pytest.mark.parametrize("offset,spread", [(1.0, 1.0), (30.0, 0.01)])
def test_simam_onnx_matches_reference(offset, spread):
    # a window whose mean is large against its spread breaks single-pass variance forms in ONNX Runtime
    x = torch.randn(1, 4, 8, 8) * spread + offset
    (out,), ops = onnx_run(lambda t: simam(t, 2), [x])
    assert "Pow" not in ops and "Reshape" not in ops  # 4-D windows (no 6-D view), d * d
    assert_close_to_scale(out, simam_reference(x, 2))


@pytest.mark.parametrize("c", [1, 2, 3, 7, 48, 64])
def test_channel_max_equals_amax(c):
    x = torch.randn(2, c, 5, 6)
    assert torch.equal(channel_max(x), x.amax(1, keepdim=True))


def test_spatial_attention_onnx_has_no_reduce_max():
    m = randomize(CGASpatialAttention(16))
    x = torch.randn(1, 16, 10, 10)
    (out,), ops = onnx_run(m, [x])
    assert "ReduceMax" not in ops
    assert_close_to_scale(out, m.forward_reference(x))


@pytest.mark.parametrize("combine", ["mul", "add"])
def test_eafusion_eager_and_onnx_equal_reference(combine):
    m = randomize(EAFusion(16, combine=combine))
    x, y = torch.randn(1, 16, 16, 12), torch.randn(1, 16, 16, 12)
    ref = m.forward_reference([x, y])
    assert_close_to_scale(m([x, y]), ref)
    (out,), _ = onnx_run(lambda a, b: m([a, b]), [x, y], m)
    assert_close_to_scale(out, ref)


def test_sws_conv_equals_reference():
    m = randomize(SWSConv(8, 8))
    x = torch.randn(2, 8, 8, 8)
    assert_close_to_scale(m(x), m.forward_reference(x))


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("fused", [False, True])
def test_cdown_folded_conv_equals_conv_then_space_to_depth(k, fused):
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    m = randomize(CDown(6, 32, k))
    assert m.fold_spd  # 8 conv outputs: the export takes the folded path
    if fused:
        m.conv.conv = fuse_conv_and_bn(m.conv.conv, m.conv.bn)
        del m.conv.bn
        m.conv.forward = m.conv.forward_fuse
    x = torch.randn(2, 6, 10, 14)
    ref = m.forward_reference(x)
    assert_close_to_scale(m.eca(m.forward_folded_conv(x)), ref)
    assert_close_to_scale(m(x), ref)  # eager: the plain path
    (out,), ops = onnx_run(m, [x])
    assert not {"Slice", "Concat", "SpaceToDepth", "ScatterND"} & ops, ops  # one folded conv, weights constant
    assert_close_to_scale(out, ref)


def test_cdown_wide_or_spd_first_keeps_the_plain_export():
    assert not CDown(16, 64).fold_spd  # 16 conv outputs: plain path is faster
    assert not CDown(4, 16, order="spd_first").fold_spd
    m = randomize(CDown(16, 64))
    x = torch.randn(1, 16, 8, 8)
    (out,), _ = onnx_run(m, [x])
    assert_close_to_scale(out, m.forward_reference(x))


def test_cdown_folded_conv_still_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        randomize(CDown(4, 8)).forward_folded_conv(torch.randn(1, 4, 7, 8))


@pytest.mark.parametrize("reg_max", [4, 16])
def test_fast_dfl_equals_dfl_eager_and_onnx(reg_max):
    x = torch.randn(2, 4 * reg_max, 50) * 4
    ref = DFL(reg_max)(x)
    m = FastDFL(reg_max)
    assert_close_to_scale(m(x), ref)
    assert m.state_dict().keys() == DFL(reg_max).state_dict().keys()
    (out,), ops = onnx_run(m, [x[:1]])
    assert "Softmax" not in ops and "Transpose" not in ops
    assert_close_to_scale(out, ref[:1])


def test_fast_detect_is_detect_with_the_same_state_dict(monkeypatch):
    ch = (16, 32, 64)
    monkeypatch.setattr(Detect, "legacy", False)  # parse_model sets this class attribute per model built before
    ref, fast = Detect(5, 16, False, ch), FastDetect(5, 16, False, ch, legacy=False)
    assert isinstance(fast, Detect) and isinstance(fast.dfl, FastDFL)
    fast.load_state_dict(ref.state_dict())  # strict: same keys and shapes
    for m in (ref, fast):
        m.stride = torch.tensor([4.0, 8.0, 16.0])
        m.eval()
    xs = [torch.randn(1, c, s, s) for c, s in zip(ch, (16, 8, 4))]
    with torch.no_grad():
        a, b = ref([x.clone() for x in xs])[0], fast([x.clone() for x in xs])[0]
    assert_close_to_scale(b, a)


@pytest.mark.parametrize("name", ["so-det-n.yaml", "so-det-fast-n.yaml"])
def test_whole_model_onnx_equals_reference_forward(name, tmp_path, monkeypatch):
    """The exported graph (every fast path on) equals the eager model run with every reference forward."""
    from ultralytics import YOLO

    from so_det_ultra.nn import downsample, fusion, head

    monkeypatch.chdir(tmp_path)
    y = YOLO(name)
    model = y.model.fuse(verbose=False).eval()
    for m in model.modules():  # non-trivial BN-free weights everywhere
        if isinstance(m, EAFusion):
            randomize(m, 1)
    x = torch.rand(1, 3, 64, 64)
    f = y.export(format="onnx", imgsz=64, simplify=True, verbose=False)  # Ultralytics' default (onnxslim)
    out = ort.InferenceSession(f, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    for mod in (fusion, downsample, head):
        for cls in vars(mod).values():
            if isinstance(cls, type) and "forward_reference" in vars(cls):
                monkeypatch.setattr(cls, "forward", cls.forward_reference)
    with torch.no_grad():
        ref = model(x)
    ref = ref[0] if isinstance(ref, (list, tuple)) else ref
    assert_close_to_scale(out, ref)
    assert np.isfinite(out).all()


def test_so_det_fast_layout():
    from ultralytics import YOLO

    fast, paper = YOLO("so-det-fast-s.yaml").model, YOLO("so-det-s.yaml").model
    assert fast.stride.tolist() == [4.0, 8.0, 16.0]
    assert isinstance(fast.model[-1], FastDetect) and isinstance(paper.model[-1], FastDetect)  # both: equal maths
    assert fast.model[21].sws.conv.conv.out_channels == 32  # P2 out: 128 x 0.25 (so-det-s: 64)
    assert paper.model[21].sws.conv.conv.out_channels == 64
    n_fast, n_paper = (sum(p.numel() for p in m.parameters()) for m in (fast, paper))
    assert n_fast < n_paper


@pytest.mark.parametrize("name", ["so-det-fast-n.yaml", "so-det26-fast-n.yaml"])
def test_fast_variants_take_a_training_step(name):
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg

    torch.manual_seed(0)
    model = YOLO(name).model.train()
    model.args = get_cfg()
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [3.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.08, 0.06]]),
    }
    loss, _ = model.loss(batch)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert model.model[21].sws.conv.conv.weight.grad.abs().sum() > 0  # gradients reach the narrow EAFusion
