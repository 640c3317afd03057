"""Dense, sliced (ours), SAHI's sliced predictor and ESOD sparse on PyTorch, ONNX Runtime and OpenVINO, in one run.

Frames: the held-out high-resolution frames of ``../shared/data/visdrone-sample`` (as ``bench_highres.py``: every
5th 1920x1080 and 2000x1500 image), at their own resolution. One so-det-esod checkpoint serves every row:

- dense: the whole frame (letterboxed to a multiple of the stride), NMS;
- sliced (ours): :func:`so_det_ultra.highres.sliced.sliced_predict`, ``--tile`` px tiles with 20 % overlap plus a
  full-frame pass at ``--tile``, NMS merge at IoU 0.5, ``--batch`` tiles per pass (default 1, as SAHI; on a CPU a
  batch of 640 px tiles is slower than single passes);
- SAHI: ``sahi.predict.get_sliced_prediction`` (F. C. Akyon et al., ICIP 2022; github obss/sahi) with the same
  tiles, overlap and full-frame pass, its ``ultralytics`` model wrapper (``YOLO.predict`` per slice at
  ``image_size=--tile``), NMS merge at IoU 0.5;
- sparse: :func:`so_det_ultra.highres.sparse.sparse_predict` with the model's own seeker (default thresholds), and
  with an oracle heatmap drawn from the ground truth (the slicing alone, whatever the seeker's training).

PyTorch rows load the ``.pt``; ONNX Runtime rows load ``<stem>.onnx`` (``yolo export format=onnx dynamic=True``) and
OpenVINO rows ``<stem>_openvino_model/`` (``format=openvino dynamic=True``) for dense, sliced and SAHI, and
``<stem>_sparse_onnx/`` / ``<stem>_sparse_openvino/`` (``so-det export --sparse``) for sparse; each is written next to
the checkpoint when missing (a sparse folder of an earlier engine is written again). Ours run the exports with the
same settings for dense, sliced and sparse (:mod:`so_det_ultra.highres.runtimes`: ``--threads`` threads, OpenVINO in
FP32); SAHI runs them through Ultralytics' ``AutoBackend``. Times: mean wall time per frame over ``--rounds`` rounds
after an untimed round (which also scores recall), modes interleaved per frame; fps = 1000 / mean ms. Recall:
ground-truth objects >= 4 px matched at IoU 0.5.

The last line compares the oracle sparse speed-up over dense on each runtime with PyTorch's (the goal: export keeps
all of it, K >= 1): ``export keeps K of the sparse speed-up (ONNX Runtime Ox vs PyTorch Px, oracle heatmap; OpenVINO
Vx)``, K = O / P.

    OMP_NUM_THREADS=2 python benchmarks/bench_engines.py --weights best.pt --frames 2 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import cv2
import highres_efficiency as eff
import numpy as np
import torch
from bench_highres import SAMPLE, SIZES, ground_truth, recall, split_frames  # this folder, on sys.path as a script
from highres_efficiency import oracle_heatmap

RUNTIMES = {"PyTorch": None, "ONNX Runtime": "onnx", "OpenVINO": "openvino"}


def exports(pt: Path, fmt: str) -> tuple[Path, Path]:
    """The dense export (dynamic shapes) and the sparse export folder of ``pt`` in ``fmt``, written when missing."""
    import json

    from ultralytics import YOLO

    from so_det_ultra.highres.export import GRAPHS, META, export_sparse, is_sparse_export

    dense = pt.with_suffix(".onnx") if fmt == "onnx" else pt.parent / f"{pt.stem}_openvino_model"
    sparse = pt.parent / f"{pt.stem}_sparse_{fmt}"
    if not dense.exists():
        YOLO(str(pt)).export(format=fmt, dynamic=True, imgsz=640)
    if not is_sparse_export(sparse) or json.loads((sparse / META).read_text()).get("graphs") != GRAPHS:
        export_sparse(pt, fmt, sparse, force=True)
    return dense, sparse


def predictors(pt: Path, a, gts) -> dict:
    """name -> ``fn(n, bgr) -> (N, 4) xyxy boxes`` for frame ``n``; each model loaded once. ``gts[n]``: the (N, 5)
    ground truth of frame ``n``, for the oracle heatmap."""
    from so_det_ultra.highres.export import ExportedSparse
    from so_det_ultra.highres.sliced import TileModel, sliced_predict
    from so_det_ultra.highres.sparse import SparseModel, sparse_predict

    runtimes = []
    for rt, fmt in RUNTIMES.items():
        if rt not in a.runtimes:
            continue
        if fmt is None:
            runtimes.append((rt, pt, SparseModel(str(pt))))
            continue
        dense, sparse = exports(pt, fmt)
        runtimes.append((rt, dense, ExportedSparse(sparse, threads=a.threads, **_workers(a))))
    oracle = oracle_heatmap([(g, None) for g in gts], runtimes[0][2].cell)
    nms = dict(conf=a.conf, max_det=a.max_det)
    out = {}
    for rt, model, sparse in runtimes:
        tm = TileModel(str(model), threads=a.threads)
        out[f"dense / {rt}"] = lambda n, img, m=tm: _dense(m, img, **nms)
        out[f"sliced (ours) / {rt}"] = lambda n, img, m=tm: sliced_predict(
            m, img, tile=a.tile, overlap=0.2, imgsz=a.tile, iou=0.7, merge_iou=0.5, batch=a.batch, **nms
        )[0].boxes.xyxy.numpy()
        if not a.no_sahi:
            out[f"SAHI / {rt}"] = _sahi(model, a)
        out[f"sparse / {rt}"] = lambda n, img, m=sparse: sparse_predict(m, img, **nms)[0].boxes.xyxy.numpy()
        out[f"sparse, oracle heatmap / {rt}"] = lambda n, img, m=sparse: sparse_predict(
            m, img, heatmap=lambda k, path, hw, cells: oracle(n, img.shape[:2], hw, cells), **nms
        )[0].boxes.xyxy.numpy()
    return out


def _workers(a) -> dict:
    return {} if a.workers is None else {"workers": a.workers}


@torch.no_grad()
def _dense(tm, img, conf, max_det):
    from ultralytics.utils.nms import non_max_suppression

    from so_det_ultra.highres import common

    x = tm.letterbox(img, None)
    det = non_max_suppression(tm(x), conf, 0.7, max_det=max_det, max_time_img=60)[0]
    return common.to_results(det, img, "frame.jpg", tm.names, tuple(x.shape[2:])).boxes.xyxy.numpy()


def _sahi(model: Path, a):
    from sahi import AutoDetectionModel
    from sahi.predict import get_sliced_prediction

    m = AutoDetectionModel.from_pretrained(
        model_type="ultralytics", model_path=str(model), device="cpu", confidence_threshold=a.conf, image_size=a.tile
    )

    def run(n, img):
        res = get_sliced_prediction(
            np.ascontiguousarray(img[..., ::-1]),  # SAHI takes RGB arrays
            m,
            slice_height=a.tile,
            slice_width=a.tile,
            overlap_height_ratio=0.2,
            overlap_width_ratio=0.2,
            perform_standard_pred=True,
            postprocess_type="NMS",
            postprocess_match_metric="IOU",
            postprocess_match_threshold=0.5,
            verbose=0,
        )
        return np.array([p.bbox.to_xyxy() for p in res.object_prediction_list], np.float32).reshape(-1, 4)

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="so-det-esod checkpoint (.pt)")
    p.add_argument("--sample", default=str(SAMPLE))
    p.add_argument("--frames", type=int, default=2, help="held-out frames per size (1920x1080, 2000x1500)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--tile", type=int, default=640)
    p.add_argument("--batch", type=int, default=1, help="sliced (ours): tiles per pass (1: fastest on a CPU)")
    p.add_argument("--conf", type=float, default=0.25, help="Ultralytics' predict default")
    p.add_argument(
        "--max-det", type=int, default=3000, help="per pass and per frame; high, so the cap does not decide recall"
    )
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime (torch, ONNX Runtime, OpenVINO)")
    p.add_argument("--workers", type=int, help="crops a sparse export runs at once (default: the engine's)")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--no-sahi", action="store_true", help="leave SAHI's rows out")
    p.add_argument("--clock", choices=tuple(eff.CLOCKS), default="wall", help="cpu: CPU time (a loaded machine)")
    a = p.parse_args(argv)
    eff.clock = eff.CLOCKS[a.clock]
    torch.set_num_threads(a.threads)
    sample = Path(a.sample)
    held, _ = split_frames(sample)
    images = {q: cv2.imread(str(q)) for q in held}
    frames = [q for hw in SIZES for q in [r for r in held if images[r].shape[:2] == hw][: a.frames]]
    gts = [ground_truth(q.stem, sample, images[q].shape[1], images[q].shape[0])[0] for q in frames]
    fns = predictors(Path(a.weights), a, gts)
    found = {k: [0, 0] for k in fns}
    ms = {k: [] for k in fns}
    for n, q in enumerate(frames):  # untimed round: recall and warm-up
        for k, fn in fns.items():
            f, t = recall(fn(n, images[q]), gts[n])
            found[k] = [found[k][0] + f, found[k][1] + t]
    for _ in range(a.rounds):
        for n, q in enumerate(frames):
            for k, fn in fns.items():
                t0 = eff.clock()
                fn(n, images[q])
                ms[k].append((eff.clock() - t0) * 1000)
    sizes = sorted({images[q].shape[:2] for q in frames})
    print(f"{len(frames)} frames {sizes}, threads {a.threads} (every runtime), {a.clock} clock")
    print("\n| predictor / runtime | ms/frame | fps | x dense (same runtime) | recall@0.5 |\n|---|---|---|---|---|")
    for k in fns:
        dense = statistics.mean(ms[f"dense / {k.split(' / ')[1]}"])
        m = statistics.mean(ms[k])
        f, t = found[k]
        print(f"| {k} | {m:.0f} | {1000 / m:.2f} | {dense / m:.2f}x | {100 * f / max(t, 1):.1f} % ({f}/{t}) |")
    print(keeps_line(ms))


def keeps_line(ms: dict) -> str:
    """``export keeps K of the sparse speed-up (ONNX Runtime Ox vs PyTorch Px, oracle heatmap; OpenVINO Vx)``."""

    def speedup(rt):
        key = f"sparse, oracle heatmap / {rt}"
        return statistics.mean(ms[f"dense / {rt}"]) / statistics.mean(ms[key]) if key in ms else float("nan")

    p, o, v = speedup("PyTorch"), speedup("ONNX Runtime"), speedup("OpenVINO")
    return (
        f"export keeps {o / p:.2f} of the sparse speed-up (ONNX Runtime {o:.2f}x vs PyTorch {p:.2f}x, oracle heatmap; "
        f"OpenVINO {v:.2f}x)"
    )


if __name__ == "__main__":
    main()
