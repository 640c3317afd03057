"""``so-det predict --model M --source S [--mode sparse|sliced|dense]``: high-resolution prediction (docs/highres.md).

Writes annotated images (and, with ``--save-txt``, YOLO label files with confidences) to ``--save-dir`` and prints
one line per image. ``yolo predict`` stays the stock dense predictor; this command adds the ESOD sparse and sliced
modes with their thresholds as options.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("predict", help="sparse (ESOD), sliced or dense prediction on high-resolution images",
                       description="Predicts on images or folders and saves annotated copies. sparse: the model's "
                                   "ObjectSeeker picks patches (so-det-esod-*.yaml models); sliced: tiles with overlap "
                                   "plus a full-frame pass, merged (any detection model); dense: stock YOLO.predict.")
    p.add_argument("--model", required=True, help="checkpoint (.pt) or model YAML")
    p.add_argument("--source", required=True, nargs="+", help="image files or folders")
    p.add_argument("--mode", choices=("sparse", "sliced", "dense"), default="sparse")
    p.add_argument("--imgsz", type=int, help="long side of the network input (default: the image's own; sliced: the "
                                             "full-frame pass, default 640)")
    p.add_argument("--conf", type=float, default=0.25, help="confidence threshold (default 0.25)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU (default 0.7)")
    p.add_argument("--max-det", type=int, default=1000, help="detections kept per image (default 1000)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g = p.add_argument_group("sparse")
    g.add_argument("--thr", type=float, default=0.5, help="heatmap threshold for patch centres (default 0.5)")
    g.add_argument("--patch", type=int, help="patch size in 8-px cells (default: image width / 64)")
    g.add_argument("--margin", type=int, default=2, help="context cells around each patch (default 2)")
    g.add_argument("--sparse-head", action="store_true", help="run the Detect head only at heatmap centres")
    g.add_argument("--head-dilate", type=int, default=2, help="cells around each centre for --sparse-head (default 2)")
    g = p.add_argument_group("sliced")
    g.add_argument("--tile", type=int, default=640, help="tile size in pixels (default 640)")
    g.add_argument("--overlap", type=float, default=0.2, help="tile overlap ratio (default 0.2)")
    g.add_argument("--no-full-frame", action="store_true", help="skip the full-frame pass")
    g.add_argument("--merge", choices=("nms", "nmm"), default="nms", help="how tiles are merged (default nms)")
    g.add_argument("--merge-iou", type=float, default=0.5, help="overlap above which tiles' boxes merge (default 0.5)")
    g = p.add_argument_group("output")
    g.add_argument("--save-dir", default="runs/so-det-predict", help="output folder (default runs/so-det-predict)")
    g.add_argument("--save-txt", action="store_true", help="also write labels/<image>.txt (class xywhn conf)")
    p.set_defaults(func=run)


def predict(a) -> list:
    if a.mode == "sparse":
        from so_det_ultra.highres.sparse import sparse_predict

        return sparse_predict(a.model, a.source, imgsz=a.imgsz, thr=a.thr, patch=a.patch, margin=a.margin,
                              conf=a.conf, iou=a.iou, max_det=a.max_det, sparse_head=a.sparse_head,
                              head_dilate=a.head_dilate, device=a.device)
    if a.mode == "sliced":
        from so_det_ultra.highres.sliced import sliced_predict

        return sliced_predict(a.model, a.source, tile=a.tile, overlap=a.overlap, full_frame=not a.no_full_frame,
                              imgsz=a.imgsz or 640, conf=a.conf, iou=a.iou, merge=a.merge, merge_iou=a.merge_iou,
                              max_det=a.max_det, device=a.device)
    from ultralytics import YOLO

    from so_det_ultra.highres.common import read_images

    model, results = YOLO(a.model), []
    for path, img in read_images(a.source):
        r = model.predict(img, imgsz=a.imgsz or max(img.shape[:2]), conf=a.conf, iou=a.iou, max_det=a.max_det,
                          device=a.device, verbose=False)[0]
        r.path = path  # predict() on an array names it image0.jpg
        results.append(r)
    return results


def run(a) -> int:
    try:
        results = predict(a)
    except (ValueError, FileNotFoundError) as err:
        print(f"so-det predict: error: {err}", file=sys.stderr)
        return 2
    out = Path(a.save_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(results)
    for r, name in zip(results, names):
        r.save(filename=str(out / name))
        if a.save_txt:
            (out / "labels").mkdir(exist_ok=True)
            r.save_txt(str(out / "labels" / (Path(name).stem + ".txt")), save_conf=True)
        extra = f", {len(r.patches)} patches" if hasattr(r, "patches") else ""
        extra += f", {r.n_tiles} tiles + full frame" if hasattr(r, "n_tiles") else ""
        ms = sum(r.speed.get(k, 0) for k in ("preprocess", "inference", "postprocess"))
        print(f"{r.path}: {len(r.boxes)} boxes{extra}, {ms:.0f} ms")
    print(f"saved {len(results)} image(s) to {out}")
    return 0


def _unique_names(results):
    seen, names = {}, []
    for r in results:
        name = Path(r.path).name
        k = seen[name] = seen.get(name, -1) + 1
        names.append(name if k == 0 else f"{Path(name).stem}_{k}{Path(name).suffix}")
    return names
