"""ESOD's official recipe by default: original-frame heatmap weights through augmentation, every uniform patch kept."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import FAST, yolo
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from so_det_ultra import paths
from so_det_ultra.integration.esod import carry_areas
from so_det_ultra.losses.esod import AREA_KEY, ESODLoss, box_weights
from so_det_ultra.training.esod import patch_preds, train_config

# One object per image, each of its own class and size (w, h px) in a 640x480 frame: the class identifies the object
# after mosaic, and its official weight depends on its area in that frame only (all four weigh more than 1).
FRAME_HW = (480, 640)
OBJECTS = {0: (8, 6), 1: (10, 8), 2: (14, 10), 3: (16, 12)}


@pytest.fixture(scope="module")
def one_object_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    h, w = FRAME_HW
    for split in ("images", "labels"):
        (root / split).mkdir()
    for c, (bw, bh) in OBJECTS.items():
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        cx, cy = 200 + 60 * c, 180 + 40 * c
        cv2.rectangle(img, (cx - bw // 2, cy - bh // 2), (cx + bw // 2, cy + bh // 2), (255, 255, 255), -1)
        cv2.imwrite(str(root / "images" / f"im{c}.png"), img)
        (root / "labels" / f"im{c}.txt").write_text(f"{c} {cx / w:.6f} {cy / h:.6f} {bw / w:.6f} {bh / h:.6f}\n")
    return root / "images"


def _dataset(images, **aug):
    from ultralytics.data.build import build_yolo_dataset

    cfg = get_cfg(overrides={"imgsz": 320, "mosaic": 1.0, "degrees": 0.0, "fliplr": 0.5, **aug})
    data = {"names": {i: str(i) for i in range(4)}, "nc": 4, "channels": 3}
    return build_yolo_dataset(cfg, str(images), 4, data, mode="train")


def test_object_weight_does_not_change_with_mosaic_or_scale(one_object_images):
    model = DetectionModel("so-det-esod-n.yaml", nc=4, verbose=False)
    model.args = get_cfg()
    crit = ESODLoss(model)
    h, w = FRAME_HW
    expected = {
        c: box_weights(torch.tensor([[0.0, 0, bw, bh]]), torch.tensor([c]), h * w)[0] for c, (bw, bh) in OBJECTS.items()
    }
    ds = _dataset(one_object_images, scale=0.5)
    assert carry_areas(ds)
    torch.manual_seed(0)
    np.random.seed(0)
    import random

    random.seed(0)
    seen, rescaled = 0, 0
    for k in range(24):
        item = ds[k % len(ds)]
        batch = ds.collate_fn([item])
        n = len(batch["cls"])
        assert batch["cls"].shape == (n, 1) and batch[AREA_KEY][0].shape == (n, 2)
        imgsz = torch.tensor(batch["img"].shape[2:])
        xywh = batch["bboxes"] * imgsz[[1, 0, 1, 0]]
        boxes = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        cls = batch["cls"].view(-1)
        got = crit.object_weights(batch, boxes, cls, imgsz)
        old = crit.object_weights({}, boxes, cls, imgsz)  # measured in the augmented input, as before
        for c, wgt, was in zip(cls.long().tolist(), got, old):
            assert math.isclose(wgt, expected[c], rel_tol=1e-4), (c, float(wgt), float(expected[c]))
            seen += 1
            rescaled += not math.isclose(was, expected[c], rel_tol=1e-3)
    assert seen > 20 and rescaled > seen // 2, "augmentation did change the objects' input sizes"


def test_areas_leave_cls_and_other_datasets_alone(one_object_images):
    ds = _dataset(one_object_images, mosaic=0.0, scale=0.0, fliplr=0.0, translate=0.0)
    plain = ds.collate_fn([ds[0]])
    assert carry_areas(ds) and carry_areas(ds), "idempotent"
    carried = ds.collate_fn([ds[0]])
    assert torch.equal(plain["cls"], carried["cls"]) and torch.allclose(plain["bboxes"], carried["bboxes"])
    assert torch.allclose(carried[AREA_KEY][0], torch.tensor([[8.0 * 6, 480 * 640]]), rtol=1e-3)
    import pickle

    copy = pickle.loads(pickle.dumps(ds))  # what a spawned loader worker receives
    assert torch.equal(copy.collate_fn([copy[0]])[AREA_KEY][0], carried[AREA_KEY][0])
    ds.close_mosaic(get_cfg(overrides={"imgsz": 128}))
    assert AREA_KEY in ds.collate_fn([ds[1]]), "close_mosaic's rebuilt transforms still split the areas"
    assert not carry_areas(object())


def test_warmup_forward_keeps_every_uniform_patch():
    """Officially (models/common.py, uni_slicer) the training forward keeps all 8x8 patches, in warm-up too."""
    model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False).train()
    model.args = get_cfg()
    cfg = train_config(model)
    assert cfg == {"patch": 8, "warmup_epochs": 3, "warmup_keep": "all"}, "the shipped YAML trains on patches"
    batch = {
        "img": torch.rand(2, 3, 128, 128),
        "batch_idx": torch.tensor([0.0]),
        "cls": torch.tensor([[1.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.05, 0.05]]),
    }
    for epoch in (0, 1, 2):  # warm-up epochs
        out = patch_preds(model, batch, cfg, epoch=epoch, epochs=10)
        assert len(out["patch_origin"]) == 2 * 64 and out["feats"][0].shape[0] == 2 * 64
        assert out["patch_size"] == (16, 16)


@pytest.mark.cli
def test_esod_s_trains_the_official_way_through_yolo_train(tiny_data, workdir, tmp_path):
    out = yolo(
        "train",
        "model=so-det-esod-s.yaml",
        f"data={tiny_data}",
        *FAST,
        "imgsz=128",
        f"project={tmp_path}",
        "name=s",
        cwd=workdir,
    )
    log = out.stdout + out.stderr
    assert "ESOD patch training: 8x8 uniform patches per image (all kept in every epoch)" in log, log[-3000:]
    rows = (tmp_path / "s" / "results.csv").read_text().splitlines()
    assert "train/seek_loss" in rows[0] and len(rows) == 2
    ckpt = torch.load(tmp_path / "s" / "weights" / "last.pt", weights_only=False)
    assert ckpt["model"].yaml["esod_train"]["warmup_keep"] == "all" and ckpt["model"].yaml["scale"] == "s"
    assert yaml.safe_load(paths.model_cfg("so-det-esod.yaml").read_text())["esod_train"]["patch"] == 8


# --- official slicer geometry -----------------------------------------------------------------------------------------


def official_ada_slicer_fast(mask_pred, ratio=8, threshold=0.3):
    """github alibaba/esod models/common.py HeatMapParser.ada_slicer_fast (lines 459-509) for one image, as written
    there (grid and padding, argmin margins), returning (x1, y1) corners in cells."""
    import torch.nn.functional as F

    height, width = mask_pred.shape[-2:]
    mask_pred = mask_pred.view(1, 1, height, width)
    cluster_w, cluster_h = math.ceil(width / ratio / 4) * 4, math.ceil(height / ratio / 4) * 4  # make_divisible(., 4)
    ratio_x, ratio_y = math.ceil(width / cluster_w), math.ceil(height / cluster_h)
    activated = mask_pred >= threshold
    maxima = F.max_pool2d(mask_pred, 3, stride=1, padding=1) == mask_pred
    centres = activated & maxima
    pad = (0, ratio_x * cluster_w - width, 0, ratio_y * cluster_h - height)
    valid = F.max_pool2d(F.pad(centres, pad).float(), (cluster_h, cluster_w), stride=(cluster_h, cluster_w))[0, 0] > 0
    act_all = F.pad(activated, pad)[0, 0]
    out = set()
    for gy, gx in valid.nonzero().tolist():
        x1, y1 = gx * cluster_w, gy * cluster_h
        act = act_all[y1 : y1 + cluster_h, x1 : x1 + cluster_w]
        act_x, act_y = act.any(0).long(), act.any(1).long()
        dx1, dx2 = int((1 - act_x).argmin()), -int((1 - act_x.flip((0,))).argmin())
        dy1, dy2 = int((1 - act_y).argmin()), -int((1 - act_y.flip((0,))).argmin())
        dx = dx1 if abs(dx1) > abs(dx2) else dx2
        dy = dy1 if abs(dy1) > abs(dy2) else dy2
        out.add((min(max(y1 + dy, 0), height - cluster_h), min(max(x1 + dx, 0), width - cluster_w)))
    return sorted(out)


def test_slicer_places_patches_as_the_official_ada_slicer():
    from so_det_ultra.highres.patches import THRESHOLD, official_patch, select_patches

    assert THRESHOLD == 0.3 and official_patch((135, 240), align=1) == (20, 32)
    gen = torch.Generator().manual_seed(0)
    for shape in ((135, 240), (188, 250), (64, 64)):
        for _ in range(5):
            heat = torch.zeros(shape)
            for _ in range(int(torch.randint(1, 12, (1,), generator=gen))):
                y, x = (
                    int(torch.randint(0, shape[0], (1,), generator=gen)),
                    int(torch.randint(0, shape[1], (1,), generator=gen)),
                )
                s = float(torch.rand(1, generator=gen)) * 4 + 0.5
                yy, xx = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
                heat = torch.maximum(heat, torch.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s)))
            ours = select_patches(heat, patch=official_patch(shape, align=1), align=1, prune=False)
            assert ours == official_ada_slicer_fast(heat), shape


def test_sparse_defaults_are_the_official_ones():
    import inspect

    from so_det_ultra.highres.patches import THRESHOLD
    from so_det_ultra.highres.sparse import sparse_predict

    params = inspect.signature(sparse_predict).parameters
    assert params["thr"].default is None and THRESHOLD == 0.3  # None: the seeker's stored threshold, else 0.3
    assert params["head_dilate"].default == 1 and params["patch"].default is None


# --- VisDrone preparation -------------------------------------------------------------------------------------------


def test_visdrone_esod_masking_paints_categories_0_and_11_with_85(tmp_path):
    """scripts/data_prepare.py: image[y1:y1 + h, x1:x1 + w, :] = 85 for categories 0 and 11, objects not restored."""
    from so_det_ultra.data import visdrone

    w, h = 64, 48
    src = tmp_path / "VisDrone2019-DET-train"
    (src / "images").mkdir(parents=True)
    (src / "annotations").mkdir()
    img = np.full((h, w, 3), 200, np.uint8)
    cv2.imwrite(str(src / "images" / "a.png"), img)
    rows = ["2,2,10,8,0,0,0,0", "30,20,6,6,1,4,0,0", "28,18,8,8,0,11,0,0", "40,5,6,6,1,1,0,0"]  # 0, car, 11, person
    (src / "annotations" / "a.txt").write_text("\n".join(rows) + "\n")
    for style in ("esod", "grey"):
        visdrone.convert_visdrone(
            src, tmp_path / style, mask_ignored=True, mask_style=style, show_progress=False, verbose=False
        )
    esod = cv2.imread(str(tmp_path / "esod" / "images" / "train" / "a.png")).astype(int)
    grey = cv2.imread(str(tmp_path / "grey" / "images" / "train" / "a.png")).astype(int)
    assert (esod[2:10, 2:12] == 85).all() and (esod[18:26, 28:36] == 85).all(), "categories 0 and 11, 85"
    assert (esod[5:11, 40:46] == 200).all() and (esod[30:, :20] == 200).all(), "the rest untouched"
    assert (grey[2:10, 2:12] == 114).all() and (grey[18:20, 28:36] == 200).all(), "old reading: category 0 only, 114"
    labels = (tmp_path / "esod" / "labels" / "train" / "a.txt").read_text().split()
    assert labels[0::5] == ["3", "0"], "categories 11 and 0 are still not labels"
    with pytest.raises(ValueError, match="mask_style"):
        visdrone.convert_visdrone(src, tmp_path / "x", mask_ignored=True, mask_style="black", show_progress=False)


def test_trainer_epoch_reaches_the_training_forward(monkeypatch):
    """The warm-up epoch goes from the trainer (callback) to the patch forward as an argument, not via the loss."""
    from types import SimpleNamespace

    from so_det_ultra.integration.esod import on_train_epoch_start
    from so_det_ultra.training import esod as training

    seen = []
    real = training.patch_preds
    monkeypatch.setattr(training, "patch_preds", lambda *a, **k: seen.append(a[3:]) or real(*a, **k))
    model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False).train()
    model.args = get_cfg()
    batch = {
        "img": torch.rand(1, 3, 128, 128),
        "batch_idx": torch.zeros(1),
        "cls": torch.zeros(1, 1),
        "bboxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]]),
    }
    for epoch in (0, 4):
        on_train_epoch_start(SimpleNamespace(model=model, ema=None, epoch=epoch, epochs=7))
        model.loss(batch)
    assert seen == [(0, 7), (4, 7)]
    assert not hasattr(model.criterion, "epoch"), "the loss carries no training state"
