"""``so-det predict --model M --source S [--mode sparse|sliced|dense]``: high-resolution prediction (docs/highres.md).

Reads image files, folders, globs, ``.txt`` lists, video files and streams (:mod:`.sources`); writes annotated
images and videos, and optionally YOLO label files (``--save-txt``), ``predictions.json`` (``--save-json``) and MOT
track files (``--track``) to ``--save-dir`` (:mod:`.outputs`). ``--shard K/N``, ``--resume`` and
``so-det merge-predictions`` split a job over machines and survive kills (:mod:`.jobs`). ``yolo predict`` stays the
stock dense predictor; this command adds the ESOD sparse and sliced modes with their thresholds as options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from so_det_ultra.cliargs import HelpFormatter, kwargs_for, option, unsafe_load_option


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
    """Add ``predict`` and ``merge-predictions`` to the ``so-det`` sub-parsers ``sub``."""
    p = sub.add_parser(
        "predict",
        help="sparse (ESOD), sliced or dense prediction on high-resolution images and videos",
        description="Predicts on images, videos and streams and saves annotated copies. sparse: the model's "
        "ObjectSeeker picks patches (so-det-esod-*.yaml models); sliced: tiles with overlap "
        "plus a full-frame pass, merged (any detection model); dense: stock YOLO.predict. "
        "Defaults are those of sparse_predict, sliced_predict and dense_predict.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint (.pt) or model YAML")
    unsafe_load_option(p, "a checkpoint")
    p.add_argument(
        "--source",
        required=True,
        nargs="+",
        help="image or video files, folders, globs, .txt/.csv lists, streams (rtsp://..., camera index 0)",
    )
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
    option(
        p,
        "--max-det-tile",
        type=int,
        help="sliced, sparse: detections kept per tile or patch run, before merging (SAHI caps each tile)",
        defaults_from={"sparse": _sparse, "sliced": _sliced},
    )
    p.add_argument(
        "--device", default=argparse.SUPPRESS, help="torch device (default: cuda:0 when available, else cpu)"
    )
    g = p.add_argument_group("sparse")
    option(
        g,
        "--thr",
        type=float,
        help="heatmap threshold for patch centres (None: the one so-det fit-seeker stored, else 0.3)",
        defaults_from=_sparse,
    )
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
    _add_output_options(p)
    p.set_defaults(func=run)
    add_merge_parser(sub)


def _add_output_options(p) -> None:
    """The output, video and job options of ``so-det predict``."""
    g = p.add_argument_group("output")
    g.add_argument("--save-dir", default="runs/so-det-predict", help="output folder (default runs/so-det-predict)")
    g.add_argument("--save-txt", action="store_true", help="also write labels/<image>.txt (class xywhn conf)")
    g.add_argument(
        "--save-json",
        action="store_true",
        help="also write predictions.json (COCO results: image_id = file stem, or <video stem>_<frame:06d>; "
        "category_id = class + 1), scored by so-det eval",
    )
    g.add_argument("--no-save", dest="save", action="store_false", help="write no annotated images or videos")
    g.add_argument(
        "--max-pixels",
        type=float,
        default=4e6,
        help="dense mode: warn when the network input exceeds this many pixels (default 4e6; 0: never)",
    )
    g = p.add_argument_group("video")
    g.add_argument("--vid-stride", type=int, default=1, help="read every N-th video frame (default 1)")
    g.add_argument("--track", action="store_true", help="track boxes across video frames; writes tracks/<video>.txt")
    g.add_argument(
        "--tracker",
        default="bytetrack.yaml",
        help="Ultralytics tracker YAML: bytetrack.yaml or botsort.yaml, or a copy (default bytetrack.yaml)",
    )
    g = p.add_argument_group("jobs")
    g.add_argument("--shard", metavar="K/N", help="predict only the K-th of N parts of the sorted inputs (1 <= K <= N)")
    g.add_argument("--resume", action="store_true", help="skip inputs whose results --save-dir already holds")
    g.add_argument(
        "--force",
        action="store_true",
        help="write into a --save-dir holding another job's results or files not written by so-det predict "
        "(never over a source file); replaces only the files this run writes",
    )
    g.add_argument(
        "--lock-timeout",
        type=float,
        metavar="S",
        help="give up after S seconds when another run is writing --save-dir (default: wait)",
    )


def add_merge_parser(sub) -> None:
    """Add ``merge-predictions`` to the ``so-det`` sub-parsers ``sub``."""
    p = sub.add_parser(
        "merge-predictions",
        help="join the predictions of so-det predict --shard runs into one predictions.json",
        description="Joins the per-input results of the save folders of 'so-det predict --shard K/N' runs, in the "
        "order of one unsharded run, into OUT (a predictions.json). Refuses an existing OUT, folders predicted "
        "with other settings, overlapping folders, and (without --force) missing shards or unfinished inputs.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="predictions.json to write")
    p.add_argument("shard_dirs", metavar="SHARD_DIR", nargs="+", help="--save-dir of each shard")
    p.add_argument("--force", action="store_true", help="overwrite OUT; merge despite missing shards or inputs")
    p.set_defaults(func=run_merge)


def run(a) -> int:
    try:
        stats = predict(a)
    except (ValueError, OSError, ConnectionError) as err:
        print(f"so-det predict: error: {_message(err)}", file=sys.stderr)
        return 2
    parts = [f"{stats['images']} image(s)"] + ([f"{stats['videos']} video(s)"] if stats["videos"] else [])
    done = f"saved {' and '.join(parts)} to {a.save_dir}" if a.save else f"predicted {' and '.join(parts)}"
    extra = [f"{stats['skipped']} done before (--resume)"] * bool(stats["skipped"])
    extra += [f"{stats['unreadable']} unreadable, skipped"] * bool(stats["unreadable"])
    print(done + (f" ({', '.join(extra)})" if extra else ""))
    if stats["predictions"]:
        print(f"wrote {stats['predictions']}")
    return 0


def predict(a) -> dict:
    """Run the ``so-det predict`` job ``a`` (parsed arguments): the ``--mode`` predictor over the expanded sources."""
    from so_det_ultra.cliargs import defaults
    from so_det_ultra.highres import jobs, runner, sources
    from so_det_ultra.highres.engines import open_predictor

    fn = MODES[a.mode]()
    opts = {k: v for k, v in kwargs_for(fn, a).items() if k not in {"model", "source", "device"}}
    shard = jobs.parse_shard(a.shard)
    if a.vid_stride < 1:
        raise ValueError(f"--vid-stride must be >= 1, got {a.vid_stride}")
    inputs = sources.expand(a.source)
    settings = runner.Settings(
        save_dir=Path(a.save_dir),
        **{k: getattr(a, k) for k in ("save", "save_txt", "save_json", "track", "tracker", "vid_stride")},
        **{k: getattr(a, k) for k in ("resume", "force", "lock_timeout")},
        max_pixels=a.max_pixels,
        dense=a.mode == "dense",
        dense_imgsz=opts.get("imgsz"),
    )
    model = Path(a.model).resolve() if Path(a.model).exists() else a.model
    signature = {
        "model": str(model),
        "mode": a.mode,
        "options": {k: v for k, v in {**defaults(fn), **opts}.items() if k not in {"model", "source", "device"}},
        "vid_stride": a.vid_stride,
        "tracker": a.tracker if a.track else None,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
    }
    device = getattr(a, "device", None)
    unsafe = getattr(a, "unsafe_load", False)
    return runner.run(
        lambda: open_predictor(a.model, a.mode, device, unsafe, **opts), inputs, settings, signature, shard, model=model
    )


def run_merge(a) -> int:
    from so_det_ultra.highres.jobs import merge

    try:
        out, rows, n = merge(a.out, a.shard_dirs, force=a.force)
    except (ValueError, OSError) as err:
        print(f"so-det merge-predictions: error: {_message(err)}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {rows} predictions of {n} input(s) from {len(a.shard_dirs)} folder(s)")
    return 0


def _message(err: Exception) -> str:
    """The error's text, with the path an OS error is about when its text lacks it."""
    text = str(err)
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.strerror or text}: {err.filename}"
    return text
