"""Export matrix: every Ultralytics export format whose tools install from PyPI on Linux without a GPU, for so-det,
so-det26, so-det-rtdetr and so-det-esod at scale n, exported, loaded back through the stock ``YOLO(path)`` and
compared with PyTorch on the same letterboxed input (docs/export.md, "Export matrix").

The fast core (TorchScript and ONNX for so-det-n) runs by default; the rest is ``-m slow``. A cell whose tool is not
installed is skipped with the package to install (the ``formats`` extra in pyproject.toml).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

IMGSZ = 64
MODELS = ["so-det", "so-det26", "so-det-rtdetr", "so-det-esod"]
# format -> (export kwargs, python modules it needs, tolerance on max|diff| / max|PyTorch output|)
FORMATS = {
    "torchscript": ({}, [], 1e-4),
    "onnx": ({}, ["onnx", "onnxruntime"], 1e-4),
    "openvino": ({}, ["openvino"], 1e-3),
    "openvino-int8": ({"int8": True}, ["openvino", "nncf"], None),  # accuracy: docs/export.md, INT8 table
    "mnn": ({}, ["MNN"], 1e-3),
    "ncnn": ({}, ["ncnn", "pnnx"], 1e-3),
    "coreml": ({}, ["coremltools"], None),  # exports on Linux; Core ML prediction needs macOS
    "paddle": ({}, ["paddle", "x2paddle"], 1e-3),
}
CORE = {("so-det", "torchscript"), ("so-det", "onnx")}


def _raw(y) -> np.ndarray:
    """First tensor of a (possibly nested) model output, as float64 numpy."""
    while isinstance(y, (list, tuple)):
        y = y[0]
    return (y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)).astype(np.float64)


def output_diff(y_ref: np.ndarray, y: np.ndarray) -> float:
    """Max absolute difference. Row outputs (batch, queries, values) of query/top-k heads (RT-DETR decoder, the
    NMS-free one-to-one head) are compared row to nearest row both ways, so a reordering of near-tied rows is not
    counted as a difference (one way when the export keeps fewer rows); anchor outputs (batch, values, anchors) are
    compared element-wise."""
    rows = y.ndim == 3 and y.shape[1] > y.shape[2]
    if rows and y_ref.ndim == 3 and y_ref.shape[2] == y.shape[2] and y_ref.shape[1] > y.shape[1]:
        # an export keeping the top max_det (300) of more queries: each exported row must be a PyTorch row
        return float(np.abs(y[0][:, None, :] - y_ref[0][None, :, :]).max(-1).min(1).max())
    if y_ref.shape != y.shape:
        raise AssertionError(f"output shape {y.shape} differs from PyTorch's {y_ref.shape}")
    if rows:
        a, b = y_ref[0], y[0]
        d = np.abs(a[:, None, :] - b[None, :, :]).max(-1)
        return float(max(d.min(1).max(), d.min(0).max()))
    return float(np.abs(y_ref - y).max())


def export_and_compare(cfg: str, fmt: str, tmp_path, seed: int = 0) -> dict:
    """Build ``{cfg}-n`` (seeded), save it, export it to ``fmt``, predict through ``YOLO(exported)`` and return the
    raw-output difference against PyTorch on the exported predictor's own preprocessed input."""
    from ultralytics import RTDETR, YOLO

    if "rtdetr" in cfg:
        YOLO = RTDETR  # noqa: N806  (RT-DETR heads need Ultralytics' RT-DETR model class, as in `yolo benchmark`)
    kwargs, _, _ = FORMATS[fmt]
    torch.manual_seed(seed)
    pt = tmp_path / f"{cfg}-n.pt"
    YOLO(f"{cfg}-n.yaml").save(pt)
    fmt_arg = fmt.split("-")[0]
    extra = {"data": str(_calibration_yaml(tmp_path))} if kwargs.get("int8") else {}
    exported = YOLO(str(pt)).export(format=fmt_arg, imgsz=IMGSZ, device="cpu", **kwargs, **extra)
    img = np.random.default_rng(seed).integers(0, 255, (IMGSZ, IMGSZ, 3), dtype=np.uint8)
    out = {"file": exported}
    if fmt == "coreml":
        return out  # Core ML runs only on macOS
    ex = YOLO(exported) if "rtdetr" in cfg else YOLO(exported, task="detect")
    results = ex.predict(img, imgsz=IMGSZ, conf=0.0, device="cpu", verbose=False)
    out["boxes"] = len(results[0].boxes)
    ref = YOLO(str(pt))
    ref.predict(img, imgsz=IMGSZ, device="cpu", verbose=False)
    x = ex.predictor.preprocess([img])
    with torch.no_grad():
        y_ref, y = _raw(ref.predictor.model(x.float())), _raw(ex.predictor.model(x))
    out["diff"] = output_diff(y_ref, y)
    out["scale"] = float(np.abs(y_ref).max())
    return out


def _calibration_yaml(tmp_path):
    from so_det_ultra.data.synthetic import make_dataset

    return make_dataset(tmp_path / "calib", n_train=8, n_val=4, imgsz=IMGSZ, nc=3, seed=0)


def _cells():
    for cfg in MODELS:
        for fmt in FORMATS:
            marks = [] if (cfg, fmt) in CORE else [pytest.mark.slow]
            yield pytest.param(cfg, fmt, marks=marks, id=f"{cfg}-{fmt}")


@pytest.mark.parametrize("cfg,fmt", list(_cells()))
def test_export_predict_parity(cfg, fmt, tmp_path, monkeypatch):
    missing = [m for m in FORMATS[fmt][1] if importlib.util.find_spec(m) is None]
    if missing:
        extra = "coreml" if fmt == "coreml" else "formats"
        pytest.skip(f"{', '.join(missing)} not installed (pip install 'so-det-ultra[{extra}]')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    out = export_and_compare(cfg, fmt, tmp_path)
    print(f"\nMATRIX {cfg} {fmt} diff={out.get('diff', float('nan')):.3g} scale={out.get('scale', float('nan')):.3g}")
    tol = FORMATS[fmt][2]
    if tol is not None:
        assert out["diff"] <= tol * max(out["scale"], 1.0), out
    elif "diff" in out:
        assert np.isfinite(out["diff"]) and out["boxes"] >= 0


def test_output_diff_matches_rows_but_not_anchors():
    rows = np.random.default_rng(0).random((1, 300, 6))
    assert output_diff(rows, rows[:, ::-1]) == 0.0  # reordered queries: same set of rows
    anchors = np.random.default_rng(0).random((1, 7, 84))
    assert output_diff(anchors, anchors[:, :, ::-1]) > 0.1  # reordered anchors: a real difference
    assert output_diff(rows, rows[:, 50:60]) == 0.0  # an export keeping 10 of 300 rows: each is a PyTorch row
    assert output_diff(rows, rows[:, 50:60] + 0.5) >= 0.5 - 1e-9
    with pytest.raises(AssertionError, match="shape"):
        output_diff(rows[:, :10], rows)


class _Shapes(torch.overrides.TorchFunctionMode):
    """Records the shape of every tensor a torch function returns inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("c", [1, 2, 3, 5, 6, 7, 12, 48])
def test_channel_max_has_no_empty_slice(c):
    """EAFusion's channel max equals amax and never makes an empty tensor (an empty slice became an empty NCNN Crop
    layer, which crashed NCNN at inference)."""
    from so_det_ultra.nn.fusion import channel_max

    x = torch.randn(2, c, 4, 4)
    with _Shapes() as rec:
        y = channel_max(x)
    assert torch.equal(y, x.amax(1, keepdim=True))
    assert all(0 not in s for s in rec.shapes), rec.shapes
