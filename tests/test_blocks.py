"""SO-Det blocks: equations on hand-built tensors, gradients, and the fast paths against their references."""

import math

import pytest
import torch
import torch.nn.functional as F

from so_det_ultra.nn import ECA, CDown, EAFusion, SWSConv, WeightedConcat, eca_kernel_size, simam, space_to_depth
from so_det_ultra.nn.fusion import CGAPixelAttention


def test_space_to_depth_matches_pixel_unshuffle():
    x = torch.randn(2, 3, 6, 8)
    ours = space_to_depth(x)
    # pixel_unshuffle orders channels c-major with (row, col) offsets (0,0), (0,1), (1,0), (1,1) inside each channel;
    # ours is offset-major with order (0,0), (1,0), (0,1), (1,1).
    ref = F.pixel_unshuffle(x, 2).reshape(2, 3, 4, 3, 4)  # (B, C, offset, H/2, W/2), offset = 2*row + col
    ref = ref[:, :, [0, 2, 1, 3]].transpose(1, 2).reshape(2, 12, 3, 4)
    assert ours.shape == (2, 12, 3, 4)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("hw", [(7, 8), (8, 5)])
def test_space_to_depth_rejects_odd_sizes(hw):
    with pytest.raises(ValueError, match="even height and width"):
        CDown(4, 8)(torch.randn(1, 4, *hw))


@pytest.mark.parametrize("c,k", [(16, 3), (64, 3), (256, 5), (512, 5)])
def test_eca_kernel_size(c, k):
    # k = |(log2 C + 1) / 2| made odd: 16 -> 2.5 -> 3; 64 -> 3.5 -> 3; 256 -> 4.5 -> 5; 512 -> 5
    assert eca_kernel_size(c) == k
    assert ECA(c).conv.kernel_size == (k,)


def test_eca_equals_formula():
    torch.manual_seed(0)
    m, x = ECA(16), torch.randn(2, 16, 5, 5)
    w = m.conv.weight.view(-1)  # (k,)
    gap = x.mean((2, 3))  # (B, C)
    padded = F.pad(gap, (1, 1))
    att = torch.sigmoid(sum(w[j] * padded[:, j : j + 16] for j in range(3)))
    torch.testing.assert_close(m(x), x * att[..., None, None])


@pytest.mark.parametrize("order", ["conv_first", "spd_first"])
def test_cdown_shapes_and_params(order):
    m = CDown(16, 32, order=order)
    assert m(torch.randn(2, 16, 12, 12)).shape == (2, 32, 6, 6)
    conv_in = m.conv.conv.in_channels
    assert conv_in == (64 if order == "spd_first" else 16)


def test_cdown_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 4"):
        CDown(16, 30)
    with pytest.raises(ValueError, match="order"):
        CDown(16, 32, order="spd")


def _eafusion_by_formula(m, x, y):
    """EAFusion written out from the official EAFusion.py formula with the module's weights, interleave and all."""
    i = x + y
    ca = m.ca.fc
    cattn = ca[2](torch.relu(ca[0](i.mean((2, 3), keepdim=True))))
    sa = m.sa.conv
    sattn = F.conv2d(
        F.pad(torch.cat([i.mean(1, keepdim=True), i.amax(1, keepdim=True)], 1), (3,) * 4, mode="reflect"),
        sa.weight,
        sa.bias,
    )
    p1 = sattn * cattn
    b, c, h, w = i.shape
    inter = torch.stack([i, p1], 2).reshape(b, 2 * c, h, w)  # (i_0, p1_0, i_1, p1_1, ...)
    pa = m.pa.conv
    p2 = torch.sigmoid(F.conv2d(F.pad(inter, (3,) * 4, mode="reflect"), pa.weight, pa.bias, groups=c))
    out = F.silu(m.w0 * i + p2 * x + (1 - p2) * y)
    conv = m.sws.conv
    z = F.silu(conv.bn(conv.conv(out)))
    # SimAM on each 2x2 quadrant, written with explicit loops
    res = torch.empty_like(z)
    for r in range(2):
        for q in range(2):
            t = z[..., r * h // 2 : (r + 1) * h // 2, q * w // 2 : (q + 1) * w // 2]
            n = t.shape[-1] * t.shape[-2] - 1
            d = (t - t.mean((2, 3), keepdim=True)) ** 2
            e = d / (4 * (d.sum((2, 3), keepdim=True) / n + 1e-4)) + 0.5
            res[..., r * h // 2 : (r + 1) * h // 2, q * w // 2 : (q + 1) * w // 2] = t * torch.sigmoid(e)
    return res


def test_eafusion_equals_formula_and_passes_gradients():
    torch.manual_seed(0)
    m = EAFusion(16).eval()
    with torch.no_grad():
        m.w0.fill_(0.7)
    x = torch.randn(2, 16, 8, 12, requires_grad=True)
    y = torch.randn(2, 16, 8, 12, requires_grad=True)
    out = m([x, y])
    torch.testing.assert_close(out, _eafusion_by_formula(m, x, y), rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    for name, g in (("x", x.grad), ("y", y.grad), ("w0", m.w0.grad)):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"no gradient reached {name}"


def test_eafusion_every_parameter_gets_a_gradient():
    m = EAFusion(8).train()
    m([torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)]).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_eafusion_add_mode_differs_from_mul():
    torch.manual_seed(0)
    a, b = EAFusion(8, combine="mul").eval(), EAFusion(8, combine="add").eval()
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)]
    assert not torch.allclose(a(xs), b(xs))


def test_pixel_attention_fast_path_equals_interleaved_reference():
    torch.manual_seed(0)
    m = CGAPixelAttention(12)
    x, p = torch.randn(2, 12, 9, 10), torch.randn(2, 12, 9, 10)
    diff = (m(x, p) - m.forward_interleaved(x, p)).abs().max().item()
    assert diff < 1e-6, f"max abs diff {diff}"


def test_simam_single_window_equals_formula():
    x = torch.randn(1, 2, 4, 4)
    n = 15
    d = (x - x.mean((2, 3), keepdim=True)) ** 2
    ref = x * torch.sigmoid(d / (4 * (d.sum((2, 3), keepdim=True) / n + 1e-4)) + 0.5)
    torch.testing.assert_close(simam(x), ref)


def test_sws_fused_equals_unfused():
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    torch.manual_seed(0)
    m = SWSConv(8, 8).eval()
    m.conv.bn.running_mean.uniform_(-1, 1)
    m.conv.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 8, 8, 8)
    ref = m(x)
    m.conv.conv = fuse_conv_and_bn(m.conv.conv, m.conv.bn)
    m.conv.forward = m.conv.forward_fuse
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


def test_weighted_concat_weights_are_nonnegative_and_normalised():
    m = WeightedConcat([2, 3, 4])
    opt = torch.optim.SGD(m.parameters(), lr=10.0)
    xs = [torch.randn(1, c, 4, 4) for c in (2, 3, 4)]
    for _ in range(5):  # large steps push raw weights negative
        opt.zero_grad()
        m(xs).sum().backward()
        opt.step()
        w = m.normalized_weights()
        assert (w >= 0).all(), w
        assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-6), w
    assert (m.weight < 0).any(), "test did not push any raw weight negative"
    out = m(xs)
    assert out.shape == (1, 9, 4, 4)
    w = m.normalized_weights()
    torch.testing.assert_close(out[:, :2], w[0] * xs[0])
    torch.testing.assert_close(out[:, 5:], w[2] * xs[2])


def test_weighted_concat_init_must_match_inputs():
    with pytest.raises(ValueError, match="3 inputs but 2"):
        WeightedConcat([1, 2, 3], init=[1, 3])


@pytest.mark.parametrize("combine", ["mul", "add"])
def test_eafusion_fast_path_equals_reference(combine):
    torch.manual_seed(0)
    m = EAFusion(16, combine=combine).eval()
    xs = [torch.randn(2, 16, 12, 8), torch.randn(2, 16, 12, 8)]
    diff = (m(xs) - m.forward_reference(xs)).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff}"


def test_spatial_attention_conv_mean_equals_reduce_mean():
    from so_det_ultra.nn.fusion import CGASpatialAttention

    m, x = CGASpatialAttention(24), torch.randn(2, 24, 9, 9)
    diff = (m(x) - m.forward_reference(x)).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff}"


def _so_det_rows(row16):
    """``so-det.yaml`` with its WeightedConcat row's arguments replaced by ``row16`` (None: as shipped)."""
    import yaml

    from so_det_ultra import paths

    d = yaml.safe_load((paths.cfg_root() / "models" / "so-det.yaml").read_text())
    if row16 is not None:
        i = next(k for k, r in enumerate(d["head"]) if r[2] == "WeightedConcat")
        d["head"][i][3] = row16
    return d


def _build(d):
    from ultralytics.nn.tasks import DetectionModel

    import so_det_ultra

    so_det_ultra.register()  # this module imported the blocks before Ultralytics' model module
    torch.manual_seed(0)
    return DetectionModel(dict(d, scale="n"), nc=3, verbose=False)


def _weighted(model):
    return next(m for m in model.modules() if isinstance(m, WeightedConcat))


def test_weighted_concat_initial_weights_load_from_yaml():
    """so-det.yaml gives the CLWA link the official 1:3 weighting (models/SO-Det.py line 43): v = [1, 1, 3]."""
    torch.testing.assert_close(_weighted(_build(_so_det_rows(None))).weight.data, torch.tensor([1.0, 1.0, 3.0]))
    keyword = _weighted(_build(_so_det_rows([{"weights": [0.5, 2, 1]}])))
    torch.testing.assert_close(keyword.weight.data, torch.tensor([0.5, 2.0, 1.0]))
    torch.testing.assert_close(_weighted(_build(_so_det_rows([]))).weight.data, torch.ones(3))  # the earlier form
    torch.testing.assert_close(_weighted(_build(_so_det_rows([1]))).weight.data, torch.ones(3))


@pytest.mark.parametrize("args", [[1, [1.0, 3.0]], [2, [1, 1, 3]], [{"weight": [1, 1, 3]}], [1, [1, 1, 3], 4]])
def test_weighted_concat_yaml_errors_name_the_layer(args):
    from so_det_ultra.registry import ModelBuildError

    with pytest.raises(ModelBuildError, match="WeightedConcat"):
        _build(_so_det_rows(args))


def test_weighted_concat_checkpoint_of_earlier_form_loads(tmp_path):
    """A model built from the earlier row (``[]``) saves and loads, whole or as a state dict into the new row."""
    old = _build(_so_det_rows([]))
    torch.save(old, tmp_path / "old.pt")
    back = torch.load(tmp_path / "old.pt", weights_only=False)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(back.eval()(x)[0], old.eval()(x)[0])
    new = _build(_so_det_rows(None))
    new.load_state_dict(old.state_dict())
    torch.testing.assert_close(_weighted(new).weight.data, torch.ones(3))
