"""ESOD the official way: heatmap weights (scripts/data_prepare.py) and patch training (uni_slicer) via `yolo train`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import FAST, yolo
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from so_det_ultra import paths
from so_det_ultra.integration.esod import on_train_start
from so_det_ultra.losses.esod import ESODLoss, box_weights, class_ratio, heatmap_target, patch_batch
from so_det_ultra.training.esod import cut, gt_patches, patch_preds, train_config, uniform_origins

# --- heatmap weights --------------------------------------------------------------------------------------------------

# A 4x6 grid of 8-px cells (32x48 px). Boxes chosen off the cell borders so coverage (g >= 0.5, i.e. the cell's point
# nearest the centre inside the box ellipse) is unambiguous:
#   A [1, 1, 7, 7]     class 0, 6x6 = 36 px       -> only cell (0, 0)
#   B [17, 9, 47, 23]  class 1, 30x14 = 420 px    -> rows 1-2, columns 2-5 (ellipse half-axes 15, 7 around (32, 16))
#   C [0, 25, 48, 32]  class 2, 48x7 = 336 px     -> row 3 (half-height 3.5 around y 28.5)
#   D [33, 17, 35, 19] class 0, 2x2 = 4 px        -> cell (2, 4), inside B's cells: the larger weight wins
BOXES = torch.tensor([[1.0, 1, 7, 7], [17, 9, 47, 23], [0, 25, 48, 32], [33, 17, 35, 19]])
CLS = torch.tensor([0, 1, 2, 0])
RATIO = [1.0, 9.0, 100.0]
FRAME = 1920 * 1080  # areas count as 1080p pixels


def hand_weights():
    """The weight map written out from the official formula, cell by cell."""
    wa = 1 + math.log(max(1600 / 36, 1) ** 2)  # r_size 1975 > r_cls 1
    wb = 1 + math.log(max((1600 / 420) ** 2, 9.0**0.7))  # r_size 14.5 > r_cls 4.66
    wc = 1 + math.log(max((1600 / 336) ** 2, 100.0**0.7))  # r_cls 25.1 > r_size 22.7
    wd = 1 + math.log((1600 / 4) ** 2)
    w = torch.ones(4, 6)
    w[0, 0] = wa
    w[1:3, 2:6] = wb
    w[2, 4] = wd
    w[3, :] = wc
    return w


def test_weight_map_matches_the_hand_computed_map():
    bw = box_weights(BOXES, CLS, FRAME, RATIO)
    target, weight = heatmap_target(BOXES, (4, 6), 8, box_weight=bw)
    assert torch.allclose(weight, hand_weights(), atol=1e-4), weight
    assert ((target > 0) == (weight > 1)).all(), "weights sit exactly on the cells the Gaussians cover"
    assert 7 < hand_weights().max() < 14, "tiny objects weigh several times a background cell"


def test_loss_builds_the_same_map_from_a_batch():
    model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    crit = ESODLoss(model, cls_ratio=RATIO, frame_area=FRAME)
    h, w = 32, 48
    xywh = torch.cat(((BOXES[:, :2] + BOXES[:, 2:]) / 2, BOXES[:, 2:] - BOXES[:, :2]), 1) / torch.tensor([w, h, w, h])
    batch = {"batch_idx": torch.zeros(4), "cls": CLS[:, None].float(), "bboxes": xywh}
    _, weight = crit.targets(batch, 1, (4, 6), 8, torch.tensor([h, w]))
    assert torch.allclose(weight[0, 0], hand_weights(), atol=1e-4)
    crit.weights = "none"
    _, plain = crit.targets(batch, 1, (4, 6), 8, torch.tensor([h, w]))
    assert (plain == 1).all()


def test_area_is_rescaled_from_the_input_frame_by_default():
    """Official: area * 1920*1080 / (width * height); a 32x48 input makes every box here large (weight 1)."""
    bw = box_weights(BOXES, torch.zeros(4), 32 * 48)
    assert torch.allclose(bw, torch.ones(4))


def test_class_ratio_is_max_count_over_count():
    # VisDrone2019-DET train counts give the official hard-coded list (scripts/data_prepare.py, gen_mask)
    counts = [79337, 27059, 10480, 144867, 24956, 12875, 4812, 3246, 5926, 29647]
    official = [1.83, 5.35, 13.82, 1.00, 5.80, 11.25, 30.11, 44.63, 24.45, 4.89]
    assert [round(r, 2) for r in class_ratio(counts)] == official
    assert class_ratio([0, 5]) == [1.0, 1.0]


def test_cls_ratio_from_labels_at_train_start_unless_given():
    model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    labels = [{"cls": torch.tensor([[0.0], [0.0], [0.0], [0.0], [1.0]]).numpy()}, {"cls": torch.zeros(0, 1).numpy()}]
    trainer = SimpleNamespace(
        model=model, ema=None, epochs=3, train_loader=SimpleNamespace(dataset=SimpleNamespace(labels=labels))
    )
    on_train_start(trainer)
    assert model.criterion.cls_ratio == [1.0, 4.0, 1.0]
    d = yaml.safe_load(paths.model_cfg("so-det-esod.yaml").read_text())
    d["loss"]["cls_ratio"] = [1.0, 2.0, 3.0]
    given = DetectionModel({**d, "scale": "n"}, nc=3, verbose=False)
    given.args = get_cfg()
    on_train_start(SimpleNamespace(**{**vars(trainer), "model": given}))
    assert given.criterion.cls_ratio == [1.0, 2.0, 3.0], "the YAML's loss: cls_ratio wins"


def test_bad_weight_options_are_refused():
    model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    with pytest.raises(ValueError, match="weights must be one of"):
        ESODLoss(model, weights="paper")
    with pytest.raises(ValueError, match="one positive value per class"):
        ESODLoss(model, cls_ratio=[1.0, 2.0])


# --- patch training ---------------------------------------------------------------------------------------------------


def test_uniform_cut_and_origins_agree():
    t = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    origin, (ph, pw) = uniform_origins(2, (64, 96), 2, 16)  # 8-px cells: t is the stride-8 map of a 64x96 input
    patches = cut(t, 2)
    assert patches.shape == (8, 3, 4, 6) and (ph, pw) == (32, 48)
    for p, (b, y0, x0) in enumerate(origin.tolist()):
        assert torch.equal(patches[p], t[b, :, y0 // 8 : y0 // 8 + 4, x0 // 8 : x0 // 8 + 6])
    with pytest.raises(ValueError, match="largest stride"):
        uniform_origins(1, (64, 64), 8, 16)


def test_objects_go_to_the_patch_holding_their_centre():
    batch = {
        "img": torch.zeros(2, 3, 64, 64),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [2.0]]),
        "bboxes": torch.tensor([[0.25, 0.25, 0.1, 0.1], [0.75, 0.55, 0.2, 0.3], [0.49, 0.51, 0.5, 0.5]]),
    }
    origin, size = uniform_origins(2, (64, 64), 2, 16)
    pb = patch_batch(batch, origin, size)
    assert pb["batch_idx"].tolist() == [0, 3, 6]  # image 0 top-left, image 0 bottom-right, image 1 bottom-left
    assert pb["cls"].view(-1).tolist() == [0, 1, 2]
    assert torch.allclose(pb["bboxes"][1], torch.tensor([0.5, 0.1, 0.4, 0.6]))  # box kept whole, in patch units
    later_first = {k: v[[2, 0, 1]] for k, v in batch.items() if k != "img"}
    assert patch_batch({**later_first, "img": batch["img"]}, origin, size)["batch_idx"].tolist() == [0, 3, 6], (
        "grouped by patch whatever the label order (Ultralytics pads targets per image in order)"
    )
    keep = gt_patches(batch, origin, size, 8)
    # the mask, not the centre, decides: the second box (y 25.6-44.8 px) also marks the top-right patch's cells
    assert keep.tolist() == [True, True, False, True, True, True, True, True]


def _patch_model(**opts):
    d = yaml.safe_load(paths.model_cfg("so-det-esod.yaml").read_text())
    d.update(scale="n", esod_train={"patch": 2, **opts})
    model = DetectionModel(d, nc=3, verbose=False)
    model.args = get_cfg()
    return model


def test_patch_training_forward_and_gradients():
    model = _patch_model(warmup_epochs=1, warmup_keep="gt").train()
    assert train_config(model) == {"patch": 2, "warmup_epochs": 1, "warmup_keep": "gt"}
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0]]),
        "bboxes": torch.tensor([[0.25, 0.25, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]]),
    }
    loss, items = model.loss(batch)  # DetectionModel.loss runs patch_preds for a YAML with esod_train:
    assert torch.isfinite(loss).all() and items["seek_loss"] > 0
    loss.sum().backward()
    head = model.model[-1]  # (its DFL conv is a fixed projection without gradient, dense training alike)
    assert all(
        p.grad is not None for p in [*head.cv2.parameters(), *head.cv3.parameters(), *model.model[5].parameters()]
    )
    warm = patch_preds(model, batch, train_config(model), epoch=0, epochs=10)
    assert warm["patch_origin"].tolist() == [[0, 0, 0], [1, 32, 32]], "warm-up: ground-truth patches only"
    assert warm["seek"].shape == (2, 1, 8, 8), "the heatmap loss sees the full frame"
    assert warm["feats"][0].shape[0] == 2
    after = patch_preds(model, batch, train_config(model), epoch=1, epochs=10)
    assert len(after["patch_origin"]) == 8 and after["feats"][0].shape[0] == 8, "then every uniform patch"


def test_patch_training_needs_esod_loss_and_valid_keys():
    model = _patch_model()
    model.yaml["loss"] = {"type": "default"}
    model.criterion = None
    with pytest.raises(ValueError, match="needs `loss: {type: ESODLoss}`"):
        model.train().loss(
            {
                "img": torch.rand(1, 3, 64, 64),
                "batch_idx": torch.zeros(0),
                "cls": torch.zeros(0, 1),
                "bboxes": torch.zeros(0, 4),
            }
        )
    model.yaml["esod_train"] = {"patchs": 2}
    with pytest.raises(ValueError, match="unknown keys"):
        train_config(model)


@pytest.mark.cli
def test_patch_training_runs_through_yolo_train(tiny_data, workdir, tmp_path):
    d = yaml.safe_load(paths.model_cfg("so-det-esod.yaml").read_text())
    d["esod_train"] = {"patch": 2, "warmup_epochs": 1}
    cfg = tmp_path / "so-det-esod-n.yaml"
    cfg.write_text(yaml.safe_dump(d, sort_keys=False))
    out = yolo("train", f"model={cfg}", f"data={tiny_data}", *FAST, f"project={tmp_path}", "name=p", cwd=workdir)
    assert "seek_loss" in out.stdout + out.stderr
    rows = (tmp_path / "p" / "results.csv").read_text().splitlines()
    assert "train/seek_loss" in rows[0] and len(rows) == 2
    assert (tmp_path / "p" / "weights" / "last.pt").is_file()


def test_pruning_drops_a_patch_the_others_already_hold():
    from so_det_ultra.nn.slicer import _prune

    active = torch.zeros(8, 16, dtype=torch.bool)
    active[2:6, 1:15] = True  # a wide cluster: the middle patch's active cells lie in the two outer cores
    assert sorted(_prune(active, {(0, 0), (0, 4), (0, 8)}, 8)) == [(0, 0), (0, 8)]
    active[0, 6] = False
    active[7, 3] = True  # a cell only the first patch holds keeps it
    assert (0, 0) in _prune(active, {(0, 0), (0, 8)}, 8)
