"""Sliced (tiled) inference: windows, merging, coordinate mapping with a stub detector, a real model, SAHI."""

import numpy as np
import pytest
import torch
from conftest import clean_env, python
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from so_det_ultra.highres.common import merge
from so_det_ultra.highres.sliced import sliced_predict, tile_windows

# ---------------------------------------------------------------------------------------------------------- windows


@settings(max_examples=50, deadline=None, database=None)
@given(h=st.integers(1, 500), w=st.integers(1, 500), tile=st.integers(8, 300), overlap=st.floats(0, 0.9))
def test_windows_cover_the_frame_and_stay_inside(h, w, tile, overlap):
    wins = tile_windows(h, w, tile, overlap)
    assert len(set(wins)) == len(wins) and wins == tile_windows(h, w, tile, overlap)
    covered = np.zeros((h, w), dtype=int)
    for x0, y0, x1, y1 in wins:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (y1 - y0, x1 - x0) == (min(tile, h), min(tile, w))
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert max(x1 for *_, x1, _ in wins) == w and max(y1 for *_, y1 in wins) == h  # last column/row on the border


@pytest.mark.parametrize("tile, overlap", [(640, 0.2), (800, 150 / 800), (256, 0.0), (100, 0.5)])
def test_windows_overlap_respected(tile, overlap):
    wins = tile_windows(1000, 1500, tile, overlap)
    for starts, size in ((sorted({w[0] for w in wins}), 1500), (sorted({w[1] for w in wins}), 1000)):
        gaps = np.diff(starts)
        assert (tile - gaps >= round(overlap * tile)).all(), (starts, overlap * tile)  # shared pixels
        assert (gaps[:-1] == tile - round(overlap * tile)).all()  # regular grid but for the last, shifted one
        assert starts[-1] + tile == size


def test_windows_examples():
    assert tile_windows(1000, 1500, 640, 0.2) == [
        (0, 0, 640, 640),
        (512, 0, 1152, 640),
        (860, 0, 1500, 640),
        (0, 360, 640, 1000),
        (512, 360, 1152, 1000),
        (860, 360, 1500, 1000),
    ]
    assert tile_windows(100, 50, 640) == [(0, 0, 50, 100)]  # smaller than a tile: the whole frame
    assert tile_windows(640, 640, 640) == [(0, 0, 640, 640)]
    assert tile_windows(300, 1000, 640, 0.2) == [(0, 0, 640, 300), (360, 0, 1000, 300)]


@pytest.mark.parametrize("kwargs", [dict(tile=0), dict(overlap=1.0), dict(overlap=-0.1), dict(height=0)])
def test_windows_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        tile_windows(**{"height": 100, "width": 100, **kwargs})


# ------------------------------------------------------------------------------------------------------------ merge

DUPES = torch.tensor([[100.0, 100, 140, 140, 0.9, 0], [102, 101, 142, 141, 0.8, 0]])  # one object seen by two tiles


@pytest.mark.parametrize("how", ["nms", "nmm"])
def test_merge_duplicates_across_overlap(how):
    out = merge(DUPES, how, iou=0.5)
    assert out.shape == (1, 6)
    expected = [100, 100, 140, 140, 0.9, 0] if how == "nms" else [100, 100, 142, 141, 0.9, 0]  # NMM: union, max score
    torch.testing.assert_close(out[0], torch.tensor(expected))


@pytest.mark.parametrize("how", ["nms", "nmm"])
def test_merge_keeps_classes_apart_unless_agnostic(how):
    det = DUPES.clone()
    det[1, 5] = 1
    assert len(merge(det, how, iou=0.5)) == 2
    assert len(merge(det, how, iou=0.5, agnostic=True)) == 1


@pytest.mark.parametrize("how", ["nms", "nmm"])
def test_merge_empty(how):
    assert merge(torch.zeros((0, 6)), how).shape == (0, 6)


def test_merge_unknown_name_raises():
    with pytest.raises(ValueError, match="nmm"):
        sliced_predict(BrightBlock(), np.zeros((8, 8, 3), np.uint8), merge="wbf")


# ------------------------------------------------------------------------------------ coordinates, stub detector


class BrightBlock(nn.Module):
    """Stub detector: one class-0 box (score 0.9) around the white pixels of each input, xywh input pixels."""

    def __init__(self):
        super().__init__()
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.names = {0: "square"}
        self.batches = []  # input shapes seen

    def fuse(self, verbose=False):
        return self

    def forward(self, x):
        self.batches.append(tuple(x.shape))
        y = torch.zeros(len(x), 5, 1)
        for i, mask in enumerate(x.amin(1) > 0.9):
            ys, xs = mask.nonzero(as_tuple=True)
            if len(xs):
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                y[i, :, 0] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, 0.9])
        return y, None


def frame_with_square(x0, y0, x1, y1, h=1000, w=1500):
    img = np.zeros((h, w, 3), np.uint8)
    img[y0:y1, x0:x1] = 255
    return img


class BrightCells(BrightBlock):
    """Stub detector: one class-0 box (score 0.9) for every 8x8 cell of the input holding a white pixel."""

    def forward(self, x):
        self.batches.append(tuple(x.shape))
        on = torch.nn.functional.max_pool2d((x.amin(1, keepdim=True) > 0.9).float(), 8)[:, 0]  # (B, H/8, W/8)
        ys, xs = torch.meshgrid(torch.arange(on.shape[1]), torch.arange(on.shape[2]), indexing="ij")
        cells = torch.stack([xs * 8 + 4, ys * 8 + 4, torch.full_like(xs, 8), torch.full_like(xs, 8)]).flatten(1)
        y = torch.cat([cells.float()[None].expand(len(x), -1, -1), 0.9 * on.flatten(1)[:, None]], 1)
        return y, None


def crowd(h=1080, w=1920, step=24, n=1500):
    """A frame with ``n`` white 4 x 4 squares on a ``step``-px grid, one per 8 x 8 cell: ``n`` objects."""
    img = np.zeros((h, w, 3), np.uint8)
    spots = [(y, x) for y in range(8, h - 8, step) for x in range(8, w - 8, step)][:n]
    for y, x in spots:
        img[y : y + 4, x : x + 4] = 255
    return img, len(spots)


def test_default_caps_keep_every_object_of_a_crowded_frame():
    """1500 objects on a 1080p frame: the default per-frame cap keeps them all (it was 1000, per tile and per frame)."""
    img, n = crowd()
    (res,) = sliced_predict(BrightCells(), img, full_frame=False)
    assert n == 1500 and len(res.boxes) == n


def test_the_tile_cap_applies_per_tile_and_the_frame_cap_per_frame():
    img, n = crowd()
    (res,) = sliced_predict(BrightCells(), img, full_frame=False, max_det_tile=5)
    assert 0 < len(res.boxes) <= 5 * res.n_tiles < n, "at most 5 boxes from each tile"
    (res,) = sliced_predict(BrightCells(), img, full_frame=False, max_det_tile=None, max_det=50)
    assert len(res.boxes) == 50
    (res,) = sliced_predict(BrightCells(), img, full_frame=False, max_det_tile=400, max_det=n)
    assert 400 < len(res.boxes) < n, "each tile keeps 400 of its objects; the frame keeps what the tiles kept"


@pytest.mark.parametrize("how", ["nms", "nmm"])
@pytest.mark.parametrize("full_frame", [False, True])
def test_square_in_tile_overlap_reported_once_at_its_place(full_frame, how):
    box = (530, 380, 560, 410)  # inside 4 of the 6 tiles (see test_windows_examples)
    stub = BrightBlock()
    (res,) = sliced_predict(stub, frame_with_square(*box), tile=640, overlap=0.2, full_frame=full_frame, merge=how)
    assert res.n_tiles == 6 and len(res.boxes) == 1
    assert (res.boxes.xyxy[0] - torch.tensor(box, dtype=torch.float)).abs().max() <= (2 if full_frame else 0.5)
    assert res.boxes.conf.item() == pytest.approx(0.9) and res.boxes.cls.item() == 0
    assert res.orig_shape == (1000, 1500) and set(res.speed) == {"preprocess", "inference", "postprocess"}
    assert stub.batches[:2] == [(4, 3, 640, 640), (2, 3, 640, 640)]  # batch=4 tiles of equal shape
    assert stub.batches[2:] == ([(1, 3, 448, 640)] if full_frame else [])  # the frame letterboxed to imgsz


def test_square_cut_by_tile_border_is_merged_whole_with_nmm():
    box = (850, 100, 880, 130)  # whole in the tile starting at x=512, cut in the one starting at x=860
    (res,) = sliced_predict(BrightBlock(), frame_with_square(*box), full_frame=False, merge="nmm")
    assert res.boxes.xyxy.tolist() == [list(map(float, box))]


def test_several_sources_and_empty_frames(tmp_path):
    import cv2

    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), frame_with_square(10, 20, 30, 40, h=300, w=200))
    res = sliced_predict(BrightBlock(), [str(path), np.zeros((300, 200, 3), np.uint8)], tile=128)
    assert [r.path for r in res] == [str(path), "image1.jpg"]
    assert res[0].boxes.xyxy.tolist() == [[10.0, 20.0, 30.0, 40.0]]
    assert res[1].boxes.data.shape == (0, 6)


# ------------------------------------------------------------------------------------------------------ real model


def test_real_model_smoke():
    from ultralytics import YOLO

    img = np.random.default_rng(0).integers(0, 255, (500, 700, 3), dtype=np.uint8)
    # Untrained: every score is ~1e-4, so a tiny conf gives boxes to merge and plot.
    (res,) = sliced_predict(YOLO("so-det-n.yaml"), img, tile=256, imgsz=320, conf=1e-6, max_det=50, merge="nmm")
    xyxy = res.boxes.xyxy
    assert res.n_tiles == 12 and 0 < len(xyxy) <= 50
    assert (xyxy >= 0).all() and (xyxy[:, [0, 2]] <= 700).all() and (xyxy[:, [1, 3]] <= 500).all()
    assert (xyxy[:, 2:] > xyxy[:, :2]).all()
    assert res.plot().shape == img.shape


# ------------------------------------------------------------------------------------------------------------ SAHI

SAHI_RUN = """
import numpy as np
from sahi import AutoDetectionModel
from sahi.predict import get_sliced_prediction

m = AutoDetectionModel.from_pretrained(model_type="ultralytics", model_path={ckpt!r}, device="cpu",
                                       confidence_threshold=1e-6, image_size=128)
img = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
res = get_sliced_prediction(img, m, slice_height=128, slice_width=128, overlap_height_ratio=0.2,
                            overlap_width_ratio=0.2, verbose=0)
from so_det_ultra.nn import CDown  # after loading: the checkpoint must load through the auto-loaded plugin alone
print("CDOWN", sum(isinstance(x, CDown) for x in m.model.model.modules()))
print("PREDICTIONS", len(res.object_prediction_list))
"""


def test_sahi_runs_our_checkpoint(tmp_path):
    pytest.importorskip("sahi")
    from ultralytics import YOLO

    ckpt = tmp_path / "so-det-n.pt"
    YOLO("so-det-n.yaml").save(ckpt)
    out = python(SAHI_RUN.format(ckpt=str(ckpt)), cwd=tmp_path, env=clean_env()).stdout
    lines = dict(line.split() for line in out.splitlines() if line.startswith(("CDOWN", "PREDICTIONS")))
    assert int(lines["CDOWN"]) >= 2, out
    assert int(lines["PREDICTIONS"]) > 0, out


# ---------------------------------------------------------------------------------------- shared grid, CLI defaults


@pytest.mark.parametrize("h, w", [(900, 1700), (800, 800), (1080, 1920), (300, 5000)])
def test_sliced_windows_are_the_soda_d_grid(h, w):
    from so_det_ultra.data import tiling

    assert tile_windows(h, w, 800, 150 / 800) == tiling.tile_windows(h, w, 800, 150)


def test_results_say_whether_the_full_frame_pass_ran():
    img = frame_with_square(530, 380, 560, 410)
    assert sliced_predict(BrightBlock(), img, full_frame=True)[0].full_frame is True
    assert sliced_predict(BrightBlock(), img, full_frame=False)[0].full_frame is False
    assert sliced_predict(BrightBlock(), img[:300, :300], full_frame=True)[0].full_frame is False  # one tile: no pass


def test_predict_cli_takes_its_defaults_from_the_predictors(capsys):
    from so_det_ultra.cli import build_parser, main
    from so_det_ultra.cliargs import defaults, kwargs_for
    from so_det_ultra.highres.sparse import sparse_predict

    argv = ["predict", "--model", "m.pt", "--source", "a.jpg", "--mode", "sliced"]
    a = build_parser().parse_args(argv)
    assert kwargs_for(sliced_predict, a) == {"model": "m.pt", "source": ["a.jpg"]}  # every default: the signature's
    a = build_parser().parse_args([*argv, "--iou", "0.6", "--no-full-frame", "--tile", "32"])
    assert kwargs_for(sliced_predict, a) == {
        "model": "m.pt",
        "source": ["a.jpg"],
        "iou": 0.6,
        "full_frame": False,
        "tile": 32,
    }
    assert "tile" not in kwargs_for(sparse_predict, a)  # an option of another mode does not leak
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sliced_iou, sparse_iou = defaults(sliced_predict)["iou"], defaults(sparse_predict)["iou"]
    assert sliced_iou == 0.5 and f"NMS IoU (default: sparse {sparse_iou}, sliced {sliced_iou}, dense 0.7)" in text


def test_max_det_tile_is_a_predict_option_of_sliced_and_sparse():
    from so_det_ultra.cli import build_parser
    from so_det_ultra.cliargs import kwargs_for
    from so_det_ultra.highres.dense import dense_predict
    from so_det_ultra.highres.sparse import sparse_predict

    a = build_parser().parse_args(["predict", "--model", "m.pt", "--source", "a.jpg", "--max-det-tile", "300"])
    assert kwargs_for(sliced_predict, a)["max_det_tile"] == kwargs_for(sparse_predict, a)["max_det_tile"] == 300
    assert "max_det_tile" not in kwargs_for(dense_predict, a)
