"""Sparse (ESOD), sliced and dense prediction on one high-resolution frame, side by side (CPU).

    python examples/highres_predict.py [WEIGHTS.pt] [IMAGE]

WEIGHTS: a trained so-det-esod checkpoint (default: an untrained so-det-esod-s, whose seeker selects nothing, so the
sparse result is empty). IMAGE: default, the first 1920x1080 frame of ../shared/data/visdrone-sample.
See docs/highres.md.
"""

import sys
import time
from pathlib import Path

import cv2
from ultralytics import YOLO  # so-det-ultra registers itself when Ultralytics loads

from so_det_ultra.highres import SparseModel, sliced_predict, sparse_predict

weights = sys.argv[1] if len(sys.argv) > 1 else "so-det-esod-s.yaml"
sample = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "visdrone-sample" / "images"
image = (
    sys.argv[2]
    if len(sys.argv) > 2
    else next(p for p in sorted(sample.glob("*.jpg")) if cv2.imread(str(p)).shape[:2] == (1080, 1920))
)
img = cv2.imread(str(image))

sparse_model = SparseModel(weights)  # split once at the ObjectSeeker, reuse for every frame
dense_model = YOLO(weights)
for name, predict in {
    "sparse": lambda: sparse_predict(sparse_model, img, conf=0.25)[0],  # the stored (or ESOD's) threshold
    "sliced": lambda: sliced_predict(sparse_model.model, img, tile=640, overlap=0.2, conf=0.25)[0],
    "dense": lambda: dense_model.predict(img, imgsz=max(img.shape[:2]), conf=0.25, device="cpu", verbose=False)[0],
}.items():
    t0 = time.perf_counter()
    res = predict()
    extra = f", {len(res.patches)} patches" if hasattr(res, "patches") else ""
    print(f"{name:6s}: {len(res.boxes):4d} boxes{extra}, {1000 * (time.perf_counter() - t0):.0f} ms (first call)")
    cv2.imwrite(f"highres_{name}.jpg", res.plot())  # Results: plot/save/save_txt work as for YOLO.predict
