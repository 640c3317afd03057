"""ESOD: the object seeker, its heatmap target and loss, patch selection, sparse inference, and `so-det predict`."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, FAST, clean_env, run, yolo
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from so_det_ultra import paths
from so_det_ultra.highres import SparseModel, make_patches, select_patches, sparse_predict
from so_det_ultra.highres.patches import THRESHOLD
from so_det_ultra.losses.esod import ESODLoss, heatmap_target
from so_det_ultra.nn.esod import ObjectSeeker, SeekerDetect

# A small model whose receptive field (about 56 px) fits in an 8-cell (64 px) margin, so sparse must equal dense.
LOCAL_YAML = """
nc: 2
backbone:
  - [-1, 1, Conv, [8, 3, 2]]
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [16, 3, 2]]
  - [2, 1, ObjectSeeker, [3]]
  - [2, 1, Conv, [32, 3, 2]]
head:
  - [-1, 1, nn.Upsample, [None, 2, nearest]]
  - [[-1, 2], 1, Concat, [1]]
  - [-1, 1, Conv, [16, 3, 1]]
  - [[1, 7, 4], 1, Detect, [nc]]
"""


def blob(shape, cy, cx, sigma=2.0, peak=1.0):
    y, x = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    return peak * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


# --- seeker block and loss ------------------------------------------------------------------------------------------


def tensor_state(module):
    """Tensors a module holds outside its parameters and buffers (what a forward pass could leave behind)."""
    return [k for m in module.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)]


def test_seeker_shape_and_no_state_left_by_the_forward():
    s = ObjectSeeker(32)
    out = s(torch.randn(2, 32, 10, 12))
    assert out.shape == (2, 1, 10, 12)
    assert torch.sigmoid(out).mean() < 0.05, "the prior bias should start the heatmap near 0"
    assert tensor_state(s) == [], "the logits are an output, not module state"
    for clone in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert torch.equal(clone(torch.ones(1, 32, 4, 4)), s(torch.ones(1, 32, 4, 4)))


def test_seeker_detect_routes_the_logits_in_training_and_validation_only():
    model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False)
    head, seeker = model.model[-1], next(m for m in model.model if isinstance(m, ObjectSeeker))
    assert isinstance(head, SeekerDetect) and head.f[-1] == seeker.i and head.nl == 3
    x = torch.rand(1, 3, 64, 64)
    train = model.train()(x)
    assert train["seek"].shape == (1, 1, 8, 8) and len(train["feats"]) == 3
    y, raw = model.eval()(x)
    assert raw["seek"].shape == (1, 1, 8, 8) and y.shape[1] == 4 + 3
    head.export = True
    try:
        assert torch.equal(model(x), y), "export output is Detect's decoded tensor alone"
    finally:
        head.export = False
    assert tensor_state(model) == [] or all(k in ("anchors", "strides", "stride") for k in tensor_state(model))


def test_heatmap_target_values():
    t, w = heatmap_target(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), (60, 60), 1.0)  # stride 1: cells are pixels
    assert t[30, 20].item() == pytest.approx(1.0)
    # a cell's value is the Gaussian at its point nearest the centre: cell 30 (x in [30, 31]) touches the right edge
    # x = 30, cell 19 (y in [19, 20]) the top edge y = 20
    assert t[30, 30].item() == pytest.approx(0.5) and t[19, 20].item() == pytest.approx(0.5)
    assert t[18, 20].item() == 0
    assert t[30, 31].item() == 0 and t[10, 20].item() == 0, "below 0.5 (outside the box ellipse) is zero"
    assert t[20, 10].item() == 0, "box corners lie outside the 0.5 ellipse"
    assert (w == 1).all()


def test_heatmap_target_tiny_box_marks_its_cell_and_ignore_regions():
    t, w = heatmap_target(
        torch.tensor([[17.0, 9.0, 19.0, 11.0]]), (4, 4), 8, ignore=torch.tensor([[0.0, 16.0, 32.0, 32.0]])
    )
    assert t[1, 2].item() == 1.0 and t.sum().item() == 1.0
    assert w[2:, :].sum() == 0 and w[:2, :].sum() == 8, "cells whose centre lies in the ignored region get weight 0"
    t2, w2 = heatmap_target(
        torch.tensor([[17.0, 17.0, 19.0, 19.0]]), (4, 4), 8, ignore=torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    )
    assert w2[2, 2] == 1 and w2.sum() == 1, "a box inside an ignored region stays positive"
    t3, _ = heatmap_target(torch.zeros(0, 4), (3, 5), 8)
    assert t3.shape == (3, 5) and t3.sum() == 0


def _batch(model_imgsz=64):
    return {
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [0.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.1], [0.5, 0.5, 0.05, 0.05]]),
        "img": torch.rand(2, 3, model_imgsz, model_imgsz),
    }


def test_esod_loss_adds_seek_term_with_gradients():
    model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    batch = _batch(128)  # the shipped YAML trains on 8x8 uniform patches of 16 px (the largest stride)
    assert isinstance(model.init_criterion(), ESODLoss), "the YAML's loss: key selects ESODLoss"
    loss, items = model.loss(batch)
    names = list(items) if isinstance(items, dict) else None
    assert names is None or names[-1] == "seek_loss"
    seek = items["seek_loss"] if names else items[-1]
    assert seek > 0 and torch.isfinite(loss).all()
    loss.sum().backward()
    seeker = next(m for m in model.modules() if isinstance(m, ObjectSeeker))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seeker.parameters())


def test_esod_loss_needs_a_seeker():
    model = DetectionModel("so-det-n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    with pytest.raises(ValueError, match="exactly one ObjectSeeker"):
        ESODLoss(model)


def test_esod_loss_needs_the_seeker_detect_head(tmp_path):
    p = tmp_path / "plain-head.yaml"
    p.write_text(LOCAL_YAML)  # a seeker, but a plain Detect head: nothing routes the logits to the loss
    model = DetectionModel(str(p), verbose=False)
    model.args = get_cfg()
    with pytest.raises(ValueError, match="SeekerDetect"):
        ESODLoss(model)


# --- patch selection ------------------------------------------------------------------------------------------------


def test_one_cluster_one_patch():
    heat = blob((136, 240), 50, 101, sigma=3) + blob((136, 240), 55, 108, sigma=2, peak=0.6)  # one cluster, one peak
    patches = select_patches(heat, thr=0.5, patch=30, align=2)
    assert len(patches) == 1
    ((y0, x0),) = patches
    ys, xs = torch.nonzero(heat >= 0.5, as_tuple=True)
    assert y0 <= ys.min() and ys.max() < y0 + 30 and x0 <= xs.min() and xs.max() < x0 + 30
    assert y0 % 2 == 0 and x0 % 2 == 0


def test_two_far_clusters_two_patches():
    heat = blob((136, 240), 20, 20) + blob((136, 240), 110, 200)
    assert len(select_patches(heat, patch=30, align=2)) == 2


def test_border_objects_give_clamped_patches():
    h, w = 136, 240
    heat = blob((h, w), 0, 0) + blob((h, w), h - 1, w - 1) + blob((h, w), 0, w - 1)
    patches = select_patches(heat, patch=32, align=4)
    assert len(patches) == 3
    for y0, x0 in patches:
        assert 0 <= y0 <= h - 32 and 0 <= x0 <= w - 32 and y0 % 4 == 0 and x0 % 4 == 0
    assert (0, 0) in patches and (h - 32 - (h - 32) % 4, w - 32) in patches
    crops = make_patches(patches, (h, w), 32, margin=4, align=4)
    assert {(c.crop[2] - c.crop[0], c.crop[3] - c.crop[1]) for c in crops} == {(40, 40)}, "same-size crops batch"
    for c in crops:
        assert c.crop[0] >= 0 and c.crop[1] >= 0 and c.crop[2] <= h and c.crop[3] <= w
        assert c.crop[0] <= c.core[0] and c.core[2] <= c.crop[2] and c.crop[1] <= c.core[1] and c.core[3] <= c.crop[3]


def test_empty_heatmap_no_patches():
    assert select_patches(torch.zeros(60, 80)) == []
    assert select_patches(torch.full((60, 80), 0.49), thr=0.5) == []


def test_uniform_heatmap_is_tiled_without_gaps():
    patches = select_patches(torch.ones(40, 64), patch=16, align=2)
    covered = torch.zeros(40, 64, dtype=torch.bool)
    for y0, x0 in patches:
        covered[y0 : y0 + 16, x0 : x0 + 16] = True
    assert covered.all() and len(patches) == 12


# --- sparse inference -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "local-esod.yaml"
    p.write_text(LOCAL_YAML)
    torch.manual_seed(0)
    model = DetectionModel(str(p), verbose=False).eval()
    for m in model.modules():  # non-trivial BN statistics, so fusing and cropping are really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_sparse_equals_dense_inside_kept_patches(local_model):
    """Every prediction of the dense model whose box centre lies in a kept patch is reproduced by the sparse path at
    the same frame coordinates (the map-back is exact), and nothing else is."""
    sm = SparseModel(local_model)
    x = torch.rand(1, 3, 320, 480)
    stem, _ = sm.run_stem(x)
    heat = blob((40, 60), 12, 15) + blob((40, 60), 30, 50)
    patches = make_patches(select_patches(heat, patch=12, align=2), heat.shape, 12, margin=8, align=2)
    assert len(patches) == 2
    sparse = sm.run_patches(stem, (320, 480), patches, batch=1)[0].T  # (N, 4 + nc), xywh frame pixels
    assert_equals_dense_in_cores(sparse, sm, x, patches)


def assert_equals_dense_in_cores(sparse, sm, x, patches, stride: int = 8):
    """``sparse`` rows (N, 4 + nc) are exactly the dense model's predictions centred in the patches' cores."""
    with torch.inference_mode():
        dense = sm.model(x)[0][0].T
    keep = torch.zeros(len(dense), dtype=torch.bool)
    for p in patches:
        y0, x0, y1, x1 = (v * stride for v in p.core)
        keep |= (dense[:, 0] >= x0) & (dense[:, 0] < x1) & (dense[:, 1] >= y0) & (dense[:, 1] < y1)
    dense = dense[keep]
    assert len(sparse) == len(dense) > 0
    d = torch.cdist(sparse.double(), dense.double(), p=float("inf"))  # max abs difference of every pair of rows
    diff = max(d.min(1).values.max().item(), d.min(0).values.max().item())  # each row has a twin in the other set
    assert diff < 1e-3, f"sparse and dense predictions differ by {diff}"


def test_sparse_predict_empty_heatmap_gives_valid_empty_result(local_model):
    img = np.full((300, 500, 3), 114, np.uint8)
    res = sparse_predict(local_model, img, heatmap=lambda n, path, hw, cells: torch.zeros(cells), conf=0.0)[0]
    assert res.patches == [] and res.boxes.data.shape == (0, 6) and res.orig_shape == (300, 500)
    assert res.plot().shape == img.shape


def test_sparse_predict_maps_boxes_into_the_original_image(local_model):
    img = (np.random.default_rng(0).random((300, 500, 3)) * 255).astype(np.uint8)  # letterboxed to 320 x 512
    full = lambda n, path, hw, cells: torch.ones(cells)  # noqa: E731  (every cell active: the whole frame)
    res = sparse_predict(local_model, [img, img], heatmap=full, conf=0.0, iou=0.7, max_det=50, margin=8)
    assert len(res) == 2 and len(res[0].boxes) == 50
    xyxy = res[0].boxes.xyxy
    assert (xyxy[:, 0] >= 0).all() and (xyxy[:, 2] <= 500).all() and (xyxy[:, 3] <= 300).all()
    assert torch.equal(res[0].boxes.data, res[1].boxes.data)


def test_sparse_default_caps_keep_a_crowded_frame_and_max_det_tile_caps_each_run(local_model):
    """More than 1000 boxes survive NMS here (an untrained model, conf 0): the default caps keep them all (the
    per-frame cap was 1000); ``max_det_tile`` keeps at most that many from each network run."""
    img = (np.random.default_rng(0).random((300, 500, 3)) * 255).astype(np.uint8)
    full = lambda n, path, hw, cells: torch.ones(cells)  # noqa: E731
    opts = dict(heatmap=full, conf=0.0, iou=0.7, patch=12, margin=0)
    (uncapped,) = sparse_predict(local_model, img, max_det=10**6, max_det_tile=None, **opts)
    (default,) = sparse_predict(local_model, img, **opts)
    assert len(uncapped.boxes) > 1000 and torch.equal(default.boxes.data, uncapped.boxes.data)
    (capped,) = sparse_predict(local_model, img, max_det_tile=3, **opts)
    assert len(capped.runs) > 1 and 0 < len(capped.boxes) <= 3 * len(capped.runs)


def test_merged_and_bucketed_runs_give_the_dense_predictions_in_every_core(local_model):
    """Merging overlapping crops and growing them to bucket sizes adds context only beyond the margin: with a margin
    that holds the model's receptive field, every prediction centred in a core stays the dense model's."""
    from so_det_ultra.highres.runs import plan_runs
    from so_det_ultra.highres.sparse import run_frame

    sm = SparseModel(local_model)
    x = torch.rand(1, 3, 320, 480)
    stem, _ = sm.run_stem(x)
    heat = blob((40, 60), 12, 15) + blob((40, 60), 14, 27) + blob((40, 60), 33, 52)
    patches = make_patches(select_patches(heat, 0.5, 10, 2, prune=False), heat.shape, 10, margin=8, align=2)
    runs = plan_runs(patches, heat.shape, merge=True, bucket=4)
    assert len(runs) < len(patches) and any((r.crop[3] - r.crop[1]) % 4 == 0 for r in runs if len(r.cores) > 1)
    raw, _ = run_frame(sm, stem, runs)
    assert_equals_dense_in_cores(raw[..., raw[0, 4:].amax(0) > 0][0].T, sm, x, patches)


def test_a_stored_seeker_threshold_is_the_default_and_thr_overrides_it(local_model):
    """The threshold stored on the ObjectSeeker (``so-det fit-seeker`` writes it) is what sparse inference uses when
    none is given; an explicit ``thr`` wins. Without one stored, ESOD's 0.3."""
    assert SparseModel(local_model).threshold == THRESHOLD
    seeker = next(m for m in local_model.modules() if isinstance(m, ObjectSeeker))
    heat = torch.zeros(40, 60)
    heat[10, 10], heat[30, 50] = 0.9, 0.5  # two centres; 0.7 keeps one, 0.4 both
    img = np.full((320, 480, 3), 114, np.uint8)
    oracle = lambda n, path, hw, cells: heat  # noqa: E731
    try:
        seeker.thr = 0.7
        sm = SparseModel(local_model)
        assert sm.threshold == 0.7
        assert len(sparse_predict(sm, img, heatmap=oracle, patch=12, margin=0)[0].patches) == 1
        assert len(sparse_predict(sm, img, heatmap=oracle, patch=12, margin=0, thr=0.4)[0].patches) == 2
    finally:
        del seeker.thr  # back to the class default (None)


def test_sparse_needs_a_seeker():
    with pytest.raises(ValueError, match="ObjectSeeker"):
        SparseModel(DetectionModel("so-det-n.yaml", verbose=False))


# --- stock CLI training and `so-det predict` --------------------------------------------------------------------------


@pytest.mark.cli
def test_esod_trains_the_official_way_with_stock_cli_and_predicts_sparse(tiny_data, workdir, tmp_path):
    """One stock ``yolo train`` of so-det-esod-s (the official recipe: patch training with every uniform patch kept),
    then ``so-det predict`` in each mode on its checkpoint under safe loading."""
    out = yolo(
        "train",
        "model=so-det-esod-s.yaml",
        f"data={tiny_data}",
        *FAST,
        "imgsz=128",  # the shipped YAML trains on 8x8 patches, which must be multiples of stride 16
        f"project={tmp_path}",
        "name=t",
        cwd=workdir,
    )
    log = out.stdout + out.stderr
    assert "seek_loss" in log
    assert "ESOD patch training: 8x8 uniform patches per image (all kept in every epoch)" in log, log[-3000:]
    rows = (tmp_path / "t" / "results.csv").read_text().splitlines()
    assert "train/seek_loss" in rows[0] and "val/seek_loss" in rows[0] and len(rows) == 2
    ckpt = torch.load(tmp_path / "t" / "weights" / "last.pt", weights_only=False)
    assert ckpt["model"].yaml["esod_train"]["warmup_keep"] == "all" and ckpt["model"].yaml["scale"] == "s"
    assert yaml.safe_load(paths.model_cfg("so-det-esod.yaml").read_text())["esod_train"]["patch"] == 8
    best = tmp_path / "t" / "weights" / "best.pt"
    image = next((tiny_data.parent / "images" / "val").glob("*.png"))
    for mode in ("sparse", "sliced", "dense"):
        res = run(
            [
                BIN / "so-det",
                "predict",
                "--model",
                best,
                "--source",
                image,
                "--mode",
                mode,
                "--conf",
                "0.001",
                "--tile",
                "32",
                "--save-dir",
                tmp_path / mode,
                "--save-txt",
            ],
            cwd=workdir,
            env=clean_env(ULTRALYTICS_SAFE_LOAD="1"),
        )
        assert "saved 1 image(s)" in res.stdout
        assert (tmp_path / mode / image.name).is_file()


# --- sparse head ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_sparse_head_equals_dense_head_at_chosen_cells(local_model, fused):
    """The sparse Detect gives the dense Detect's decoded rows at the masked cells, borders included."""
    from so_det_ultra.highres.sparse_head import sparse_detect

    model = copy.deepcopy(local_model)
    model = model.fuse(verbose=False) if fused else model
    det = model.model[-1]
    torch.manual_seed(1)
    feats = [
        torch.randn(2, m.conv.in_channels if hasattr(m, "conv") else m[0].conv.in_channels, h, w)
        for m, (h, w) in zip([s[0] for s in det.cv2], [(24, 32), (12, 16), (6, 8)])
    ]
    masks = [torch.rand(2, f.shape[2], f.shape[3]) < 0.15 for f in feats]
    masks[0][0, 0, 0] = masks[0][1, -1, -1] = masks[2][0, 0, -1] = True  # corners: zero padding must match
    with torch.no_grad():
        dense = det(feats)[0]  # (B, 4 + nc, A), levels concatenated row-major
        sparse = sparse_detect(det, feats, masks)
    offsets = np.cumsum([0] + [f.shape[2] * f.shape[3] for f in feats])
    for b in range(2):
        cols = torch.cat([offsets[i] + m[b].flatten().nonzero()[:, 0] for i, m in enumerate(masks)])
        assert sparse[b].shape == (dense.shape[1], len(cols))
        diff = (sparse[b] - dense[b][:, cols]).abs().max().item()
        assert diff < 1e-3, f"sparse head differs from the dense head by {diff}"


def test_sparse_predict_with_sparse_head_is_a_subset_of_the_dense_head(local_model):
    sm = SparseModel(local_model)
    x = torch.rand(1, 3, 320, 480)
    stem, _ = sm.run_stem(x)
    heat = blob((40, 60), 12, 15) + blob((40, 60), 30, 50)
    patches = make_patches(select_patches(heat, patch=12, align=2), heat.shape, 12, margin=8, align=2)
    full = sm.run_patches(stem, (320, 480), patches)[0].T
    everywhere = sm.run_patches(stem, (320, 480), patches, head_mask=torch.ones(40, 60, dtype=torch.bool))[0].T
    d = torch.cdist(full.double(), everywhere.double(), p=float("inf"))
    assert len(full) == len(everywhere) and d.min(1).values.max() < 1e-3, "an all-true mask must equal the dense head"
    mask = torch.zeros(40, 60, dtype=torch.bool)
    mask[10:15, 12:18] = True
    part = sm.run_patches(stem, (320, 480), patches, head_mask=mask)[0].T
    assert 0 < len(part) < len(full)
    assert torch.cdist(part.double(), full.double(), p=float("inf")).min(1).values.max() < 1e-3
    res = sparse_predict(sm, np.zeros((320, 480, 3), np.uint8), heatmap=lambda *a: heat, sparse_head=True, conf=0.0)
    assert len(res[0].patches) == 2 and res[0].boxes.data.shape[1] == 6


def test_esod_onnx_export_has_only_the_detect_output(tmp_path, monkeypatch):
    """The seeker feeds SeekerDetect, yet the exported graph's one output is Detect's decoded tensor."""
    ort = pytest.importorskip("onnxruntime")
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)
    model = YOLO("so-det-esod-n.yaml")
    session = ort.InferenceSession(model.export(format="onnx", imgsz=64, simplify=False))
    outs = session.run(None, {"images": np.zeros((1, 3, 64, 64), np.float32)})
    assert [o.shape for o in outs] == [(1, 4 + 10, 16 * 16 + 8 * 8 + 4 * 4)]
