#!/usr/bin/env bash
# VisDrone end to end, offline: convert the official archives you downloaded, train SO-Det-l, evaluate, export.
# See docs/datasets.md for where the archives come from and docs/metrics.md for the size-wise APs.
set -euo pipefail
SRC=${1:?usage: train_visdrone.sh /path/to/VisDrone-archives-or-folders [out-dir]}
OUT=${2:-$PWD/visdrone}

so-det convert visdrone "$SRC" "$OUT"                     # YOLO labels + ignored-region sidecars + data.yaml
yolo train model=so-det-l.yaml data="$OUT/data.yaml" imgsz=640 epochs=300 batch=16 max_det=500
yolo val model=runs/detect/train/weights/best.pt data="$OUT/data.yaml" imgsz=640 max_det=500 save_json=True
yolo export model=runs/detect/train/weights/best.pt format=onnx
