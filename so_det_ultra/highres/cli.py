"""``so-det predict --model M --source S [--mode sparse|sliced|dense]``: high-resolution prediction (docs/highres.md).

Writes annotated images (and, with ``--save-txt``, YOLO label files with confidences) to ``--save-dir`` and prints
one line per image. ``yolo predict`` stays the stock dense predictor; this command adds the ESOD sparse and sliced
modes with their thresholds as options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from so_det_ultra.cliargs import HelpFormatter, kwargs_for, option


def _sparse():
    from so_det_ultra.highres.sparse import sparse_predict

    return sparse_predict


def _sliced():
    from so_det_ultra.highres.sliced import sliced_predict

    return sliced_predict


def _dense():
    from so_det_ultra.highres.dense import dense_predict

    return dense_predict


MODES = {"sparse": _sparse, "sliced": _sliced, "dense": _dense}  # --mode -> the predictor (imported when used)


def add_parser(sub) -> None:
    """Add ``predict`` to the ``so-det`` sub-parsers ``sub``."""
    p = sub.add_parser(
        "predict",
        help="sparse (ESOD), sliced or dense prediction on high-resolution images",
        description="Predicts on images or folders and saves annotated copies. sparse: the model's "
        "ObjectSeeker picks patches (so-det-esod-*.yaml models); sliced: tiles with overlap "
        "plus a full-frame pass, merged (any detection model); dense: stock YOLO.predict. "
        "Defaults are those of sparse_predict, sliced_predict and dense_predict.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint (.pt) or model YAML")
    p.add_argument("--source", required=True, nargs="+", help="image files or folders")
    p.add_argument("--mode", choices=tuple(MODES), default="sparse", help="predictor (default sparse)")
    option(
        p,
        "--imgsz",
        type=int,
        help="long side of the network input (None: the image's own; sliced: the full-frame pass)",
        defaults_from=MODES,
    )
    option(p, "--conf", type=float, help="confidence threshold", defaults_from=MODES)
    option(p, "--iou", type=float, help="NMS IoU", defaults_from=MODES)
    option(p, "--max-det", type=int, help="detections kept per image", defaults_from=MODES)
    option(p, "--device", help="torch device", defaults_from=MODES)
    g = p.add_argument_group("sparse")
    option(g, "--thr", type=float, help="heatmap threshold for patch centres", defaults_from=_sparse)
    g.add_argument(
        "--patch",
        type=int,
        default=argparse.SUPPRESS,
        help="patch size in heatmap cells (the seeker's stride, 8 px for so-det-esod; default: an eighth of the width)",
    )
    option(g, "--margin", type=int, help="context cells around each patch", defaults_from=_sparse)
    option(
        g,
        "--sparse-head",
        action="store_true",
        help="run the Detect head only at heatmap centres",
        defaults_from=_sparse,
    )
    option(g, "--head-dilate", type=int, help="cells around each centre for --sparse-head", defaults_from=_sparse)
    g = p.add_argument_group("sliced")
    option(g, "--tile", type=int, help="tile size in pixels", defaults_from=_sliced)
    option(g, "--overlap", type=float, help="tile overlap ratio", defaults_from=_sliced)
    g.add_argument(
        "--no-full-frame",
        dest="full_frame",
        action="store_false",
        default=argparse.SUPPRESS,
        help="skip the full-frame pass",
    )
    option(g, "--merge", choices=("nms", "nmm"), help="how tiles are merged", defaults_from=_sliced)
    option(g, "--merge-iou", type=float, help="overlap above which tiles' boxes merge", defaults_from=_sliced)
    g = p.add_argument_group("output")
    g.add_argument("--save-dir", default="runs/so-det-predict", help="output folder (default runs/so-det-predict)")
    g.add_argument("--save-txt", action="store_true", help="also write labels/<image>.txt (class xywhn conf)")
    p.set_defaults(func=run)


def predict(a) -> list:
    """Run the ``--mode`` predictor with the options given (the others keep the predictor's defaults)."""
    fn = MODES[a.mode]()
    return fn(**kwargs_for(fn, a))


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
        if hasattr(r, "n_tiles"):
            extra += f", {r.n_tiles} tiles" + (" + full frame" if getattr(r, "full_frame", False) else "")
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
