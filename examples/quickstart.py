"""Build, train briefly, validate and export SO-Det on a synthetic tiny-object dataset (CPU, ~1 minute).

python examples/quickstart.py
"""

import tempfile
from pathlib import Path

from ultralytics import YOLO  # so-det-ultra registers itself when Ultralytics loads

from so_det_ultra.data.synthetic import make_dataset

root = Path(tempfile.mkdtemp())
data = make_dataset(root / "data", n_train=32, n_val=8, imgsz=160, nc=3, seed=0)

model = YOLO("so-det-s.yaml")  # SO-Det scale s: P2/P3/P4 heads, CDown, CLWA links, EAFusion
model.info()
model.train(data=str(data), epochs=3, imgsz=160, batch=8, device="cpu", workers=0, project=str(root), name="train")
metrics = model.val(data=str(data), imgsz=160, device="cpu")
print("mAP50-95:", metrics.box.map)
print("ONNX:", model.export(format="onnx", imgsz=160))
