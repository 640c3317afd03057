"""The demo pipeline: synthetic data -> stock training -> small-object validation -> prediction -> ONNX parity.

Every step uses the public tools a user would (``make_dataset``, ``YOLO(...).train/val/predict/export``, the
``so_det:`` data YAML key); this module only chains them and prints one line per stage. See docs/demo.md.

Interpretation (defaults): 128 training images of 160 px with 3 classes of 6-24 px objects, 15 epochs of so-det-n,
batch 8, AdamW lr0 0.005, one warm-up epoch, no mosaic. Measured to reach mAP50 0.97 (docs/demo.md); the stock recipe
(SGD, 3 warm-up epochs, mosaic) detects nothing in that budget. Predictions are drawn at the F1-optimal score
threshold of validation with class-agnostic NMS (:mod:`so_det_ultra.demo.recall`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

STAGES = 6


class DemoError(RuntimeError):
    """A demo stage failed (``usage``: the command line asked for something impossible)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def _stage(k: int, name: str, text: str):
    print(f"[{k}/{STAGES}] {name}: {text}", flush=True)


def fresh_dir(out=None, exist_ok: bool = False) -> Path:
    """``out``, refusing a non-empty folder unless ``exist_ok``; without ``out``, the first unused or empty
    ``./so-det-demo``, ``./so-det-demo-2``, ..."""
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not exist_ok)):
            raise DemoError(f"{out} exists and is not an empty folder; pass --exist-ok to write into it", usage=True)
        return out
    k, out = 1, Path("so-det-demo")
    while out.exists() and (not out.is_dir() or any(out.iterdir())):
        k += 1
        out = Path(f"so-det-demo-{k}")
    return out


def _offline_font(tmp: Path):
    """Let Ultralytics' font lookup (``check_font``: its config dir, then matplotlib's font list, then a download of
    Arial.ttf) find matplotlib's bundled DejaVu Sans in this process, so plotting downloads nothing."""
    import matplotlib
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    if (USER_CONFIG_DIR / "Arial.ttf").exists() or any(
        "Arial.ttf" in f.fname for f in font_manager.fontManager.ttflist
    ):
        return
    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if src.is_file():
        dst = tmp / "Arial.ttf"  # the file name is the lookup key; the font inside stays DejaVu Sans
        shutil.copyfile(src, dst)
        font_manager.fontManager.addfont(str(dst))


def _write_data(root: Path, images: int, imgsz: int, seed: int) -> tuple[Path, list]:
    import yaml

    from so_det_ultra.data.contract import SO_DET_KEY, so_det_key
    from so_det_ultra.data.synthetic import make_dataset

    n_val = max(4, images // 6)
    path = make_dataset(
        root,
        n_train=images,
        n_val=n_val,
        imgsz=imgsz,
        nc=3,
        objects=(3, 10),
        size_range=(6.0, min(24.0, imgsz / 4)),
        seed=seed,
    )
    data = yaml.safe_load(path.read_text())
    data[SO_DET_KEY] = so_det_key("soda-d-fullframe", 100)  # SODA-D size bins, full frames
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, sorted((root / "images" / "val").iterdir())


def _draw(result, truth_file: Path, scale: int = 4):
    """Ground truth (left) and predictions (right) of one image, enlarged ``scale`` times (nearest neighbour)."""
    import cv2
    import numpy as np
    import torch
    from ultralytics.engine.results import Results

    img = result.orig_img
    h, w = img.shape[:2]
    big = cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    gt = big.copy()
    for line in truth_file.read_text().splitlines() if truth_file.is_file() else []:
        _, xc, yc, bw, bh = (float(v) for v in line.split())
        x1, y1 = int((xc - bw / 2) * w * scale), int((yc - bh / 2) * h * scale)
        cv2.rectangle(gt, (x1, y1), (x1 + int(bw * w * scale), y1 + int(bh * h * scale)), (0, 255, 0), 1)
    b = result.boxes
    rows = torch.cat([b.xyxy * scale, b.conf[:, None], b.cls[:, None]], 1) if len(b) else torch.zeros((0, 6))
    pred = Results(big, path=result.path, names=result.names, boxes=rows).plot(line_width=1, font_size=10)
    bar = np.full((h * scale, 4, 3), 255, np.uint8)
    return np.concatenate([gt, bar, pred], 1)


def _parity(best: Path, onnx_file: Path, image: Path, imgsz: int) -> float:
    """Max absolute difference between the ONNX Runtime and PyTorch outputs on one validation image."""
    import cv2
    import numpy as np
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO

    im = cv2.resize(cv2.imread(str(image)), (imgsz, imgsz))
    x = np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    model = YOLO(str(best)).model.float().fuse().eval()
    with torch.no_grad():
        y = model(torch.from_numpy(x))
    y = (y[0] if isinstance(y, (list, tuple)) else y).numpy()
    if y.shape != y_onnx.shape:
        raise DemoError(f"ONNX output shape {y_onnx.shape} differs from PyTorch's {y.shape}")
    return float(np.abs(y_onnx - y).max())


def run_demo(
    out=None,
    exist_ok: bool = False,
    epochs: int = 15,
    imgsz: int = 160,
    images: int = 128,
    batch: int = 8,
    device: str = "cpu",
    seed: int = 0,
    onnx_tol: float = 1e-3,
) -> dict:
    """Run the demo into ``out`` (see :func:`fresh_dir`) and return what it wrote and measured.

    Args:
        out: Output folder; None picks a fresh ``./so-det-demo[-N]``.
        exist_ok: Write into a non-empty ``out``.
        epochs, imgsz, batch, device, seed: Training settings (``imgsz`` is also the generated image side).
        images: Training images; validation gets ``max(4, images // 6)``.
        onnx_tol: Largest allowed max absolute difference between ONNX Runtime and PyTorch outputs (boxes in pixels,
            class scores in [0, 1]).

    Returns:
        ``{"paths": {label: Path}, "mAP50": float, "so_det": {AP, AP50, AP75, AP_eS, ...}, "onnx_max_abs_diff":
        float, "seconds": float}``.

    Raises:
        DemoError: A non-empty ``out`` without ``exist_ok``, missing export packages, or an ONNX mismatch.
    """
    import importlib.util

    for name, value in (("epochs", epochs), ("imgsz", imgsz), ("images", images), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise DemoError(f"--{name} must be a positive integer, got {value!r}", usage=True)
    if imgsz < 32 or imgsz % 32:
        raise DemoError(f"--imgsz must be a multiple of 32 (the model stride), got {imgsz}", usage=True)
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoError(f"{', '.join(missing)} not installed; pip install 'so-det-ultra[export]'", usage=True)
    out = fresh_dir(out, exist_ok).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="so-det-demo-font-") as tmp:
        result = _run(out, Path(tmp), epochs, imgsz, images, batch, device, seed, onnx_tol)
    result["seconds"] = time.time() - t0
    _summary(result)
    return result


def _train(data: Path, out: Path, epochs, imgsz, batch, device, seed) -> Path:
    from ultralytics import YOLO

    model = YOLO("so-det-n.yaml")
    model.train(
        data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, workers=0, device=device, project=str(out),
        name="train", exist_ok=True, plots=True, seed=seed, optimizer="AdamW", lr0=0.005, warmup_epochs=1,
        mosaic=0.0, close_mosaic=0, patience=0,
    )  # fmt: skip
    return Path(model.trainer.save_dir)


def _predict(best: Path, val_images: list, out: Path, imgsz: int, conf: float, device: str) -> dict:
    """Predict every validation image at ``conf`` (class-agnostic NMS: one box per object), draw the first 4, and
    return recall by size."""
    import cv2
    from ultralytics import YOLO

    from so_det_ultra.demo.recall import recall_by_size

    labels = out / "data" / "labels" / "val"
    (out / "predictions").mkdir(exist_ok=True)
    model = YOLO(str(best))
    results = model.predict(
        [str(f) for f in val_images], imgsz=imgsz, conf=conf, agnostic_nms=True, device=device, verbose=False
    )
    for r in results[:4]:
        f = Path(r.path)
        cv2.imwrite(str(out / "predictions" / f"{f.stem}.png"), _draw(r, labels / f"{f.stem}.txt"))
    return recall_by_size(results, labels)


def _run(out, tmp, epochs, imgsz, images, batch, device, seed, onnx_tol) -> dict:
    import importlib.util

    from ultralytics import YOLO

    from so_det_ultra.demo.recall import describe, f1_threshold

    _stage(
        1, "data", f"{images} training images of {imgsz} px, objects of 6-{min(24, imgsz // 4)} px -> {out / 'data'}"
    )
    data, val_images = _write_data(out / "data", images, imgsz, seed)
    _stage(2, "train", f"so-det-n, epochs={epochs}, stock Ultralytics trainer -> {out / 'train'}")
    _offline_font(tmp)
    train_dir = _train(data, out, epochs, imgsz, batch, device, seed)
    best = train_dir / "weights" / "best.pt"
    _stage(3, "validate", f"AP by object size (SODA-D bins) -> {out / 'val'}")
    val = dict(imgsz=imgsz, batch=batch, device=device, project=str(out), name="val", exist_ok=True, plots=True)
    metrics = YOLO(str(best)).val(data=str(data), **val)
    conf, f1 = f1_threshold(metrics.box)
    so_det = {k: v for k, v in getattr(metrics, "so_det", {}).items() if k.startswith("AP")}
    _stage(4, "predict", f"{len(val_images)} validation images at score >= {conf:.3f} (F1 {f1:.3f}) -> predictions/")
    recall = _predict(best, val_images, out, imgsz, conf, device)
    print(f"      {describe(recall)}", flush=True)
    _stage(5, "export", "ONNX, then ONNX Runtime vs PyTorch on a validation image")
    simplify = importlib.util.find_spec("onnxslim") is not None  # else Ultralytics would try to pip-install it
    onnx_file = Path(YOLO(str(best)).export(format="onnx", imgsz=imgsz, simplify=simplify, device="cpu"))
    diff = _parity(best, onnx_file, val_images[0], imgsz)
    ok = diff <= onnx_tol
    print(f"      max |ONNX - PyTorch| = {diff:.2e} (tolerance {onnx_tol:g}): {'OK' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        raise DemoError(f"ONNX output differs from PyTorch by {diff:.3g} > {onnx_tol:g} ({onnx_file})")
    val_dir = Path(metrics.save_dir)
    paths = {
        "data YAML": data, "weights": best, "training curves": train_dir / "results.png",
        "AP by size chart": val_dir / "so_det_ap.png", "metrics JSON": val_dir / "so_det_metrics.json",
        "predictions (truth | predicted)": out / "predictions", "ONNX model": onnx_file,
    }  # fmt: skip
    m = {"mAP50": float(metrics.box.map50), "so_det": so_det, "conf": conf, "recall": recall}
    return {"paths": paths, **m, "onnx_max_abs_diff": diff}


def _summary(result: dict):
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    aps = "  ".join(f"{k} {fmt(v)}" for k, v in result["so_det"].items())
    from so_det_ultra.demo.recall import describe

    _stage(6, "done", f"{result['seconds']:.0f} s; mAP50 {result['mAP50']:.3f}; {aps}")
    print(
        f"      at score >= {result['conf']:.3f} (F1-optimal on validation): {describe(result['recall'])}", flush=True
    )
    width = max(len(k) for k in result["paths"])
    for label, path in result["paths"].items():
        print(f"      {label:<{width}}  {path}{'' if Path(path).exists() else '  (missing)'}", flush=True)
