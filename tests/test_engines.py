"""Exported engines: the two-graph sparse export and sliced prediction with exported models, against PyTorch.

The model is so-det-esod-n with a seeded random init whose BatchNorm statistics are set from a few random images
(so features, scores and the heatmap vary across the frame instead of collapsing to constants), the class logits
scaled to spread the scores, and the seeker's bias raised so that patches are picked. Parity is checked in a fresh
process, offline, against the PyTorch predictors on the same frames.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import BIN, clean_env, python, run

CONF = 0.6  # keeps one to three hundred well-separated detections per frame (scores spread over [0, 1])


def calibrated_model(path):
    """Save a seeded, BN-calibrated so-det-esod-n checkpoint at ``path`` (see the module docstring)."""
    from ultralytics import YOLO

    from so_det_ultra.nn.esod import ObjectSeeker

    torch.manual_seed(0)
    y = YOLO("so-det-esod-n.yaml")
    m = y.model
    for b in m.modules():
        if isinstance(b, torch.nn.BatchNorm2d):
            b.momentum = None  # running statistics = the average over the calibration batches
            b.reset_running_stats()
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.rand(2, 3, 256, 256))
    m.eval()
    for c in m.model[-1].cv3:
        c[-1].weight.data.mul_(0.4)
        c[-1].bias.data.fill_(-2.0)
    seeker = next(layer for layer in m.model if isinstance(layer, ObjectSeeker))
    seeker.cv2.weight.data.mul_(13.0)
    seeker.cv2.bias.data.fill_(-4.0)
    y.save(str(path))
    return path


def frames(n=2, h=320, w=480, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = (rng.random((h, w, 3)) * 160).astype(np.uint8)
        for _ in range(6):
            y0, x0 = rng.integers(0, h - 40), rng.integers(0, w - 40)
            img[y0 : y0 + rng.integers(8, 40), x0 : x0 + rng.integers(8, 40)] = rng.integers(0, 255, 3)
        out.append(img)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    np.save(d / "frames.npy", np.stack(frames()))
    return calibrated_model(d / "esod.pt")


# Run in a fresh process: predictions of the PyTorch model and of each exported model, written as JSON.
PREDICT = """
import json, sys, numpy as np
from so_det_ultra.highres.engines import open_predictor
pt, mode, out, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
frames = np.load(sys.argv[5])
imgs = [frames[k] for k in frames.files] if hasattr(frames, "files") else list(frames)  # .npz: frames of two sizes
res = {}
for model in [pt, *sys.argv[6:]]:
    p = open_predictor(model, mode, device="cpu", **opts)
    rs = p(imgs, [f"f{k}.jpg" for k in range(len(imgs))])
    res[model] = [[r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist(), len(getattr(r, "patches", []))]
                  for r in rs]
json.dump(res, open(out, "w"))
"""


def predict(ckpt, mode, opts, *models, frames_file="frames.npy"):
    out = ckpt.parent / f"pred_{mode}.json"
    args = [str(ckpt), mode, str(out), json.dumps(opts), str(ckpt.parent / frames_file), *map(str, models)]
    python(f"import sys; sys.argv = [''] + {args!r}\n" + PREDICT, cwd=ckpt.parent, env=clean_env())
    res = json.loads(out.read_text())
    return res.pop(str(ckpt)), list(res.values())


def assert_same(ref, other, conf=CONF, iou_min=0.99, score_tol=1e-3, nms_flips=0.0):
    """Every detection of either list scoring above ``conf + score_tol`` has one in the other list of the same class
    at IoU >= ``iou_min`` with a score within ``score_tol``; only detections within ``score_tol`` of the confidence
    threshold may be missing (float differences can move them across it), and a share ``nms_flips`` of detections
    that NMS (IoU 0.7) kept on one side and suppressed by an overlapping box on the other."""
    for r, o in zip(ref, other):
        assert len(r[0]) >= 20 or not len(r[0]), "too few detections per frame for a meaningful comparison"
        for a, b in ((r, o), (o, r)):
            flips = _unmatched(a, b, conf, iou_min, score_tol)
            assert len(flips) <= nms_flips * len(a[0]), flips[:3]


def _unmatched(a, b, conf, iou_min, score_tol) -> list:
    """Detections of ``a`` above ``conf + score_tol`` without a match in ``b``; fails unless a box of ``b`` of the
    same class overlaps each by IoU > 0.7 (so NMS decided between them)."""
    import torchvision

    (b0, s0, c0, _), (b1, s1, c1, _) = a, b
    if not b1:
        assert all(s <= conf + score_tol for s in s0)
        return []
    iou = torchvision.ops.box_iou(torch.tensor(b0).reshape(-1, 4), torch.tensor(b1))
    iou[torch.tensor(c0)[:, None] != torch.tensor(c1)[None]] = 0
    flips = []
    for i, j in enumerate(iou.argmax(1).tolist()):
        if s0[i] > conf + score_tol and not (iou[i, j] >= iou_min and abs(s0[i] - s1[j]) <= score_tol):
            assert iou[i, j] > 0.7, (b0[i], s0[i], b1[j], s1[j])
            flips.append((b0[i], s0[i], b1[j], s1[j]))
    return flips


def export(ckpt, fmt, *extra):
    return run([BIN / "so-det", "export", "--sparse", "--model", ckpt, "--format", fmt, *extra], cwd=ckpt.parent)


def test_sparse_export_matches_pytorch_sparse(ckpt):
    export(ckpt, "onnx")
    folder = ckpt.parent / "esod_sparse_onnx"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".so-det-manifest.json",  # the folder is owned and locked as every output folder
        ".so-det.lock",
        "metadata.json",
        "rest.onnx",
        "stem.onnx",
    ]
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["cell"] == 8 and meta["stride"] == 16 and len(meta["names"]) == 10
    assert meta["defaults"]["max_det_tile"] == 1000 and meta["graphs"] == 2
    ref, (got,) = predict(ckpt, "sparse", {"conf": CONF}, folder)
    assert all(r[3] > 0 for r in ref), "the seeker should pick patches on every frame"
    assert sum(len(r[0]) for r in ref) >= 20, "too few detections for a meaningful comparison"
    assert [r[3] for r in ref] == [g[3] for g in got], "same heatmap, same patches"
    assert_same(ref, got)


def test_sparse_export_openvino_matches_pytorch_sparse(ckpt):
    pytest.importorskip("openvino")
    export(ckpt, "openvino")
    folder = ckpt.parent / "esod_sparse_openvino"
    assert {"stem.xml", "rest.xml", "metadata.json"} <= {p.name for p in folder.iterdir()}
    ref, (got,) = predict(ckpt, "sparse", {"conf": CONF}, folder)
    assert [r[3] for r in ref] == [g[3] for g in got], "same heatmap, same patches"
    assert_same(ref, got)  # FP32 weights in the IR (save_model's default FP16 moved scores by up to 3e-2 here)


def test_export_refuses_to_overwrite_and_engine_needs_tensorrt(ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cmd = [str(BIN / "so-det"), "export", "--sparse", "--model", str(ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"], "an existing folder is left alone"
    export(ckpt, "onnx", "--out", out, "--force")
    assert (out / "notes.txt").read_text() == "keep me" and (out / "rest.onnx").is_file()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from so_det_ultra.highres.export import export_sparse

        with pytest.raises(ImportError, match="TensorRT"):
            export_sparse(ckpt, "engine", out=tmp_path / "trt")
        assert not (tmp_path / "trt").exists()


def yolo_export(pt, **kwargs):
    python(f"from ultralytics import YOLO; YOLO({str(pt)!r}).export(**{kwargs!r})", cwd=pt.parent, env=clean_env())
    return pt.with_suffix(".onnx")


def test_sliced_with_exported_onnx_matches_pt(ckpt):
    onnx = yolo_export(ckpt, format="onnx", dynamic=True, imgsz=320)
    opts = {"conf": CONF, "tile": 160, "imgsz": 320, "batch": 4}
    ref, (got,) = predict(ckpt, "sliced", opts, onnx)
    assert sum(len(r[0]) for r in ref) >= 20
    assert_same(ref, got)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_sliced_with_a_dynamic_export_matches_pt_on_visdrone_frame_sizes(ckpt, fmt):
    """Ultralytics' dynamic exports at their default imgsz (640) on frames of VisDrone's smallest and largest sizes:
    the full-frame pass and the border tiles are letterboxed as for the ``.pt`` (the graph is dynamic; the stride is
    the model's own, 16, where AutoBackend rounds the ``.pt``'s up to 32), and OpenVINO runs in FP32."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
    pt = ckpt.parent / f"dynamic_{fmt}" / "esod.pt"
    pt.parent.mkdir(exist_ok=True)
    shutil.copy(ckpt, pt)
    yolo_export(pt, format=fmt, dynamic=True)
    model = pt.with_suffix(".onnx") if fmt == "onnx" else pt.parent / "esod_openvino_model"
    np.savez(pt.parent / "frames.npz", *frames(1, 540, 960), *frames(1, 1080, 1920, seed=1))
    ref, (got,) = predict(pt, "sliced", {"conf": CONF}, model, frames_file="frames.npz")
    assert all(len(r[0]) >= 20 for r in ref)
    assert_same(ref, got)


def test_sliced_with_fixed_shape_and_batch_export(ckpt):
    """A static export (160 x 160, batch 1) runs batches of 4 tiles; the tiles fill its shape, so they match."""
    static = ckpt.parent / "static" / "esod.pt"
    static.parent.mkdir(exist_ok=True)
    shutil.copy(ckpt, static)
    onnx = yolo_export(static, format="onnx", dynamic=False, imgsz=160, batch=1)
    opts = {"conf": CONF, "tile": 160, "full_frame": False, "batch": 4}
    ref, (got,) = predict(ckpt, "sliced", opts, onnx)
    assert sum(len(r[0]) for r in ref) >= 20
    assert_same(ref, got)


# --- the engine: overlapping crops run once -------------------------------------------------------------------------


def test_merge_crops_adds_no_area_and_keeps_every_core():
    from so_det_ultra.highres.patches import Patch
    from so_det_ultra.highres.runs import merge_crops

    a = Patch((4, 4, 16, 16), (0, 0, 20, 20))
    b = Patch((4, 14, 16, 26), (0, 10, 20, 30))  # overlaps a by half: the box (20 x 30) is smaller than 2 x 20 x 20
    far = Patch((40, 40, 52, 52), (36, 36, 56, 56))
    runs = merge_crops([a, b, far])
    assert sorted(r.crop for r in runs) == [(0, 0, 20, 30), (36, 36, 56, 56)]
    assert sorted(c for r in runs for c in r.cores) == sorted(p.core for p in (a, b, far))
    diagonal = Patch((20, 20, 32, 32), (16, 16, 36, 36))  # touches a at a corner: its box would add area
    assert len(merge_crops([a, diagonal])) == 2
    assert len(merge_crops([a, b], max_grow=1)) == 2, "the box may not exceed max_grow x the largest crop"


def test_merged_crops_give_the_dense_predictions_once(tmp_path):
    """Two patches whose crops overlap run as one box; every dense prediction centred in either core comes out
    exactly once and equal to the dense model's (the test model's receptive field fits the 8-cell margin)."""
    from test_highres import LOCAL_YAML, assert_equals_dense_in_cores, blob
    from ultralytics.nn.tasks import DetectionModel

    from so_det_ultra.highres import SparseModel, make_patches, select_patches
    from so_det_ultra.highres.runs import merge_crops
    from so_det_ultra.highres.sparse import run_patches

    (tmp_path / "m.yaml").write_text(LOCAL_YAML)
    torch.manual_seed(0)
    model = DetectionModel(str(tmp_path / "m.yaml"), verbose=False).eval()
    sm = SparseModel(model)
    x = torch.rand(1, 3, 320, 480)
    stem, _ = sm.run_stem(x)
    heat = blob((40, 60), 12, 15) + blob((40, 60), 14, 30)
    patches = make_patches(select_patches(heat, 0.5, 12, 2, prune=False), heat.shape, 12, margin=8, align=2)
    assert len(patches) == 2 and len(merge_crops(patches)) == 1, "the two crops should merge"
    assert_equals_dense_in_cores(run_patches(sm, stem, patches, merge=True)[0].T, sm, x, patches)
