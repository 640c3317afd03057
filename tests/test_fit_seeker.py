"""Seeker fitting: an ObjectSeeker inserted into (or re-fitted on) a trained detector, nothing else changed, and every
sparse entry point using the fitted checkpoint and its stored threshold."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LOAD_MODES, clean_env, python
from ultralytics.nn.tasks import DetectionModel

from so_det_ultra.nn.esod import ObjectSeeker
from so_det_ultra.nn.graph import renumber_from, seeker_index
from so_det_ultra.training.seeker import fit_seeker
from so_det_ultra.training.seeker_model import (
    _DepthwiseConv,
    add_seeker,
    load_checkpoint,
    seeker_logits,
    write_checkpoint,
)
from so_det_ultra.training.seeker_threshold import choose_threshold

FAMILIES = ("yolov8n-p2.yaml", "yolo11n.yaml", "so-det-s.yaml", "so-det26-s.yaml")


def trained_like(cfg: str, seed: int = 0):
    """``cfg`` built with 3 classes and random BatchNorm statistics and affine terms, in eval mode (a stand-in for a
    trained model: an identity BatchNorm would hide a layer reading the wrong input)."""
    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=3, verbose=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def save_ckpt(model, path):
    """An Ultralytics-style checkpoint (fp16 model under ``model``, as a finished training leaves it)."""
    import ultralytics

    torch.save({"model": model.half(), "train_args": {"imgsz": 64}, "version": ultralytics.__version__}, path)
    model.float()
    return path


def digest(tensors) -> str:
    h = hashlib.sha1()
    for k, v in tensors:
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# --- insertion --------------------------------------------------------------------------------------------------------


def test_renumbering_keeps_every_layer_reading_its_old_input():
    assert renumber_from(-1, 4, 5) == -1  # before the insertion: unchanged
    assert renumber_from(-1, 5, 5) == 4  # right after: its -1 would now be the seeker, so it becomes absolute
    assert renumber_from([-1, 4], 9, 5) == [-1, 4]
    assert renumber_from([-1, 6, 2], 9, 5) == [-1, 7, 2]
    assert renumber_from(-2, 6, 5) == 4  # -2 of old layer 6 was layer 4: the seeker now sits between


@pytest.fixture(scope="module")
def inserted(tmp_path_factory):
    """Per family: (input checkpoint, fitted-structure checkpoint, reference input, dense output) with a seeker
    inserted and saved through write_checkpoint (no training: that is tested below)."""
    d = tmp_path_factory.mktemp("inserted")
    out = {}
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    for cfg in FAMILIES:
        src = save_ckpt(trained_like(cfg), d / f"{cfg[:-5]}.pt")
        ckpt, model = load_checkpoint(src)
        with torch.no_grad():
            ref = model(x)[0]
        k = add_seeker(model)
        model.model[k].thr = 0.42
        dst = write_checkpoint(ckpt, model, d / f"{cfg[:-5]}-seeker.pt", {"test": True})
        out[cfg] = (src, dst, x, ref, k)
    return out


def test_a_checkpoint_that_appears_at_out_while_fitting_is_kept_without_force(inserted):
    """The existence check runs before fitting; a file another run writes at ``out`` meanwhile is never replaced."""
    src, dst, *_ = inserted[FAMILIES[0]]
    ckpt, model = load_checkpoint(dst)
    out = dst.with_name("theirs.pt")
    out.write_bytes(b"another run's checkpoint")
    with pytest.raises(FileExistsError, match="created by something else while the seeker was fitted"):
        write_checkpoint(ckpt, model, out, {"test": True}, replace=False)
    assert out.read_bytes() == b"another run's checkpoint"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name]
    write_checkpoint(ckpt, model, out, {"test": True}, replace=True)
    assert load_checkpoint(out)[1].model[-1].nc == model.model[-1].nc


@pytest.mark.parametrize("cfg", FAMILIES)
def test_insertion_keeps_dense_outputs_and_rebuilds_from_the_yaml(inserted, cfg):
    from so_det_ultra.highres.sparse import SparseModel

    src, dst, x, ref, k = inserted[cfg]
    _, model = load_checkpoint(dst)
    assert isinstance(model.model[k], ObjectSeeker) and model.model[k].f == k - 1 == 4
    assert model.model[k + 1].f in (k - 1, [k - 1]) or k - 1 in model.model[k + 1].f, "the next layer reads P3"
    with torch.no_grad():
        got = model(x)[0]
    assert torch.equal(got, ref), f"dense output changed: max diff {(got - ref).abs().max():.3g}"
    rebuilt = DetectionModel(model.yaml, verbose=False)  # the YAML records the new row
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.save == model.save
    sm = SparseModel(dst)  # split at the seeker: every stem output read later has a stride dividing 8
    assert sm.cell == 8 and sm.k == k and sm.threshold == 0.42 and set(sm.factor) <= set(range(k))


def test_mid_backbone_seeker_sparse_on_one_frame_sized_patch_equals_dense(inserted):
    """yolov8n-p2: the seeker sits after backbone P3, the later backbone layers read P3 through the crops; a patch
    covering the whole frame must give exactly the dense predictions."""
    from ultralytics.utils.nms import non_max_suppression

    from so_det_ultra.highres.patches import make_patches
    from so_det_ultra.highres.sparse import SparseModel, run_patches

    _, dst, x, _, _ = inserted["yolov8n-p2.yaml"]
    sm = SparseModel(dst)
    assert sm.needed == {2, 4}, "stride-4 and stride-8 backbone maps are cut into crops"
    stem, prob = sm.run_stem(x)
    patches = make_patches([(0, 0)], prob.shape, tuple(prob.shape), 0, sm.align)
    sparse = run_patches(sm, stem, patches)
    with torch.no_grad():
        dense = sm.model(x)[0]
    a, b = (non_max_suppression(p, 0.0, 0.7, max_det=50)[0] for p in (sparse, dense))
    assert torch.allclose(a, b, atol=1e-4), f"max diff {(a - b).abs().max():.3g}"


def test_an_esod_model_keeps_its_seeker_and_layer_must_be_stride_8():
    model = trained_like("so-det-esod-n.yaml")
    n = len(model.model)
    assert add_seeker(model) == seeker_index(model, "test") == 5 and len(model.model) == n
    with pytest.raises(ValueError, match="stride-8"):
        add_seeker(trained_like("yolo11n.yaml"), layer=6)  # a stride-16 map


RELOAD = """
{pre}
import sys, torch
from ultralytics import YOLO
for dst, ref in {pairs}:
    m = YOLO(dst).model.float().eval()
    x, want = torch.load(ref)
    with torch.no_grad():
        got = m(x)[0]
    seeker = [l for l in m.model if type(l).__name__ == "ObjectSeeker"]
    print("OK" if torch.equal(got, want) and len(seeker) == 1 and seeker[0].thr == 0.42 else "BAD", dst)
"""


@pytest.mark.cli
@LOAD_MODES
def test_fitted_checkpoints_reload_in_a_fresh_process_with_the_stock_yolo(inserted, tmp_path, pre, env):
    pairs = []
    for cfg, (_, dst, x, ref, _) in inserted.items():
        torch.save((x, ref), tmp_path / f"{cfg}.ref")
        pairs.append((str(dst), str(tmp_path / f"{cfg}.ref")))
    out = python(RELOAD.format(pre=pre, pairs=pairs), cwd=tmp_path, env=clean_env(**env))
    lines = [line for line in out.stdout.splitlines() if line.startswith(("OK", "BAD"))]
    assert len(lines) == len(FAMILIES) and all(line.startswith("OK") for line in lines), out.stdout + out.stderr


# --- training ---------------------------------------------------------------------------------------------------------


def test_fast_depthwise_gradient_equals_autograd():
    seeker = ObjectSeeker(6, k=5).eval()
    x = torch.randn(3, 6, 9, 11)
    ref = seeker(x)
    got = seeker_logits(seeker, x)
    assert torch.allclose(got, ref, atol=1e-5)
    w = seeker.cv1.conv.weight
    g_ref = torch.autograd.grad((F.conv2d(x, w, padding=2, groups=6) ** 2).sum(), w)[0]
    g = torch.autograd.grad((_DepthwiseConv.apply(x, w, 2) ** 2).sum(), w)[0]
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-4), f"max diff {(g - g_ref).abs().max():.3g}"


def test_threshold_rule_stops_at_the_first_drop_below_the_target():
    heat = torch.zeros(16, 32)
    heat[4, 4], heat[4, 20], heat[12, 28] = 0.9, 0.5, 0.2  # three objects, one per peak
    frames = [(heat, np.array([[4.5, 4.5], [4.5, 20.5], [12.5, 28.5]]))]
    thr, rows = choose_threshold(frames, 1.0, step=0.1, patch=8, align=1)
    assert thr == 0.2 and rows[-1][0] == 0.3 and rows[-1][1] == pytest.approx(2 / 3)
    thr, _ = choose_threshold(frames, 0.6, step=0.1, patch=8, align=1)
    assert thr == 0.5


@pytest.fixture(scope="module")
def fitted(tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("fitted")
    src = save_ckpt(trained_like("yolov8n-p2.yaml"), d / "v8p2.pt")
    out = fit_seeker(src, tiny_data, d / "v8p2-seeker.pt", epochs=10, holdout=0.25, lr=0.05, verbose=False)
    return src, out


def test_fitting_lowers_the_heatmap_loss_and_changes_only_the_seeker(fitted, tiny_data):
    from so_det_ultra.losses.esod import heatmap_bce
    from so_det_ultra.training.seeker_data import FeatureCache, frame_geometry, frame_target, input_size, load_frames

    src, out = fitted
    _, before = load_checkpoint(src)
    ckpt, after = load_checkpoint(out)
    k = seeker_index(after, "test")
    frozen = {n: v for n, v in after.state_dict().items() if not n.startswith(f"model.{k}.")}
    renamed = {}  # the input's layers from k on are one lower
    for n, v in before.state_dict().items():
        i = int(n.split(".")[1])
        renamed[f"model.{i + (i >= k)}.{n.split('.', 2)[2]}"] = v
    assert digest(sorted(frozen.items())) == digest(sorted(renamed.items())), "only seeker tensors may change"
    assert any(n.endswith("running_var") for n in frozen), "BatchNorm statistics are among the compared tensors"

    torch.manual_seed(0)
    add_seeker(before)  # the initial seeker fit_seeker started from (seed 0)
    frames, _ = load_frames(tiny_data)
    feats = FeatureCache(after.model, k - 1, 32)
    losses = {"before": 0.0, "after": 0.0}
    for i, f in enumerate(frames):
        size = input_size(f.hw, None, 32)
        boxes, ignore, hw = frame_geometry(f, size, 32)
        target = frame_target(boxes, ignore, f, (hw[0] // 8, hw[1] // 8), 8, "official", None)
        x = feats.get(i, f, size, False)
        with torch.no_grad():
            for name, m in (("before", before), ("after", after)):
                losses[name] += float(heatmap_bce(m.model[k](x), *target))
    assert losses["after"] < 0.8 * losses["before"], losses
    info = ckpt["fit_seeker"]
    assert after.model[k].thr == info["thr"] and 0 < info["thr"] < 1 and info["inserted"]
    assert ckpt["epoch"] == -1 and ckpt["optimizer"] is None and after.yaml["so_det_ultra"]


def test_fitted_stock_model_runs_every_sparse_entry_point_with_its_threshold(fitted, tiny_data, tmp_path, capsys):
    import cv2

    from so_det_ultra.cli import main
    from so_det_ultra.highres.engines import open_predictor
    from so_det_ultra.highres.export import export_sparse
    from so_det_ultra.highres.sparse import SparseModel, sparse_predict

    _, out = fitted
    thr = torch.load(out, weights_only=False)["fit_seeker"]["thr"]
    image = next((tiny_data.parent / "images" / "val").glob("*.png"))
    assert SparseModel(out).threshold == thr
    assert len(sparse_predict(out, str(image), conf=0.0)) == 1
    pick = sparse_predict(out, str(image), thr=1.1, conf=0.0)[0]  # an explicit threshold wins: no centre >= 1.1
    assert pick.patches == [] and len(pick.boxes) == 0
    assert main(["predict", "--model", str(out), "--source", str(image), "--mode", "sparse", "--save-dir",
                 str(tmp_path / "p"), "--conf", "0.0"]) == 0  # fmt: skip
    folder = export_sparse(out, "onnx", tmp_path / "onnx")
    assert json.loads((folder / "metadata.json").read_text())["defaults"]["thr"] == thr
    predict = open_predictor(folder, "sparse", conf=0.0)
    assert len(predict([cv2.imread(str(image))], [str(image)])) == 1


def test_fit_seeker_command_writes_once_and_prints_the_path_last(fitted, tiny_data, tmp_path, capsys):
    from so_det_ultra.cli import main

    src, _ = fitted
    out = tmp_path / "f.pt"
    args = ["fit-seeker", "--model", str(src), "--data", str(tiny_data), "--out", str(out), "--epochs", "1",
            "--holdout", "0.25", "--variants", "1"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main([*args, "--force", "--thr", "0.6"]) == 0
    assert load_checkpoint(out)[1].model[5].thr == 0.6


def test_the_version_stamp_key_is_the_integrations():
    from so_det_ultra.integration.checkpoint import KEY
    from so_det_ultra.training.seeker_model import STAMP_KEY

    assert STAMP_KEY == KEY


def test_recall_of_detections_counts_only_objects_the_dense_model_finds(fitted, tiny_data, tmp_path):
    from so_det_ultra.training.seeker import _centres, _detected_centres
    from so_det_ultra.training.seeker_data import input_size, load_frames

    src, out = fitted
    _, net = load_checkpoint(out)
    frames, _ = load_frames(tiny_data)
    for f in frames[:3]:
        size = input_size(f.hw, None, 32)
        every = {tuple(c) for c in _centres(f, size, 32, 4.0)}
        found = {tuple(c) for c in _detected_centres(net, f, size, 32, 4.0, 0.0)}
        assert found <= every and not len(_detected_centres(net, f, size, 32, 4.0, 1.0))
    none = fit_seeker(src, tiny_data, tmp_path / "d.pt", epochs=1, variants=1, holdout=0.25, recall_of="detections",
                      det_conf=1.0, verbose=False)  # fmt: skip
    info = torch.load(none, weights_only=False)["fit_seeker"]
    assert info["heldout_objects"] == 0 and info["thr"] == 0.3, "nothing detected: ESOD's default is stored"
