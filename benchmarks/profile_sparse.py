"""Where one sparse (ESOD) frame spends its time, per stage, on PyTorch, ONNX Runtime and OpenVINO.

Stages of :func:`so_det_ultra.highres.sparse.sparse_predict` (ESOD, Liu et al., IEEE TIP 2024, sec. 3: stem and seeker
on the whole frame, the rest of the network on the patches): letterbox, stem, selection (patch placement), crop
(cutting the stem outputs at the patches), rest (the network after the seeker on the crops), decode (boxes to frame
pixels, the patch-core filter), NMS and to-Results. Each stage is timed by wrapping the function that does it
(:data:`STAGES`), so the same script profiles any version of the engine that keeps those names; a stage a version
does not have (work moved into a graph) shows 0.

The frame is the first held-out 1920x1080 frame of ``bench_highres.py`` (``--frame`` picks another); the heatmap is
the oracle drawn from its ground truth (``--seeker`` uses the model's own); ``--runs`` timed runs after ``--warmup``,
the median per stage (stage medians need not add up to the median total, which is printed apart). Runtimes are
interleaved per run. The sparse exports are written afresh into a temporary folder by the engine being profiled.

    OMP_NUM_THREADS=2 python benchmarks/profile_sparse.py --weights best.pt --runs 10 --threads 2
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_highres import SAMPLE, ground_truth, split_frames  # noqa: E402
from highres_efficiency import CLOCKS, oracle_heatmap  # noqa: E402

# stage -> alternatives, the first whose functions all exist is timed (engine versions differ); a function is
# (module, attribute), or ("engine", method) on the engine instance
SPARSE = "so_det_ultra.highres.sparse"
STAGES = {
    "letterbox": [[("so_det_ultra.highres.common", "letterbox_image")], [("so_det_ultra.highres.common", "letterbox")]],
    "stem": [[("engine", "run_stem")]],
    "selection": [
        [(SPARSE, "select_patches"), (SPARSE, "make_patches"), (SPARSE, "plan_runs")],
        [(SPARSE, "select_patches"), (SPARSE, "make_patches")],
    ],
    "crop": [[(SPARSE, "crop")], [(SPARSE, "_crop")]],
    "rest": [[("engine", "run_rests")], [("engine", "run_rest")]],
    "decode": [[(SPARSE, "_to_frame")]],
    "NMS": [[(SPARSE, "frame_nms")], [("ultralytics.utils.nms", "non_max_suppression")]],
    "to-Results": [[("so_det_ultra.highres.common", "to_results")]],
}


TIMER = time.perf_counter  # --clock cpu: the process's CPU time


def _timed(fn, clock: dict, stage: str):
    def run(*args, **kwargs):
        t0 = TIMER()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[stage] += TIMER() - t0

    return run


@contextlib.contextmanager
def wrapped(engine, clock: dict):
    """Every function of :data:`STAGES` that exists timed into ``clock`` (seconds per stage) while inside."""
    undo = []
    for stage, alternatives in STAGES.items():
        owned = [
            [(engine if mod == "engine" else importlib.import_module(mod), name) for mod, name in alt]
            for alt in alternatives
        ]
        for owner, name in next((alt for alt in owned if all(hasattr(o, n) for o, n in alt)), []):
            original = getattr(owner, name)
            setattr(owner, name, _timed(original, clock, stage))
            undo.append((owner, name, original, owner is engine))
    try:
        yield
    finally:
        for owner, name, original, instance in reversed(undo):
            if instance:
                delattr(owner, name)  # the bound method of the class shows again
            else:
                setattr(owner, name, original)


RUNTIMES = {"PyTorch": None, "ONNX Runtime": "onnx", "OpenVINO": "openvino"}


def engines(weights: Path, folder: Path, threads: int, workers: int | None, runtimes) -> dict:
    """runtime name -> sparse engine: the PyTorch model and its ONNX and OpenVINO sparse exports."""
    from so_det_ultra.highres.export import ExportedSparse, export_sparse
    from so_det_ultra.highres.sparse import SparseModel

    out = {"PyTorch": SparseModel(str(weights))} if "PyTorch" in runtimes else {}
    for name, fmt in RUNTIMES.items():
        if fmt is None or name not in runtimes:
            continue
        path = export_sparse(weights, fmt, folder / fmt)
        kwargs = (
            {"threads": threads} if "threads" in inspect.signature(ExportedSparse).parameters else {}
        )  # older: none
        out[name] = ExportedSparse(path, **kwargs)
    return out


def main(argv=None):
    from so_det_ultra.highres.sparse import sparse_predict

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="so-det-esod checkpoint (.pt)")
    p.add_argument("--sample", default=str(SAMPLE))
    p.add_argument("--frame", type=int, default=0, help="index among the held-out 1920x1080 frames")
    p.add_argument("--seeker", action="store_true", help="the model's own heatmap instead of the oracle")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--conf", type=float, default=0.01)
    p.add_argument("--max-det", type=int, default=3000)
    p.add_argument("--thr", type=float, default=0.5, help="heatmap threshold with the oracle")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--workers", type=int, help="crops an export runs at once (default: the engine's)")
    p.add_argument("--option", nargs="*", default=[], help="sparse_predict options, e.g. merge_crops=False margin=0")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="cpu: CPU time (a loaded machine)")
    a = p.parse_args(argv)
    global TIMER
    TIMER = CLOCKS[a.clock]
    torch.set_num_threads(a.threads)
    sample = Path(a.sample)
    held, _ = split_frames(sample)
    path = [q for q in held if cv2.imread(str(q)).shape[:2] == (1080, 1920)][a.frame]
    img = cv2.imread(str(path))
    gt = ground_truth(path.stem, sample, img.shape[1], img.shape[0])
    oracle = oracle_heatmap([gt], 8)
    opts = dict(conf=a.conf, max_det=a.max_det, **{k: ast.literal_eval(v) for k, v in (o.split("=") for o in a.option)})
    if not a.seeker:
        opts.update(thr=a.thr, heatmap=lambda n, p_, hw, cells: oracle(0, img.shape[:2], hw, cells))
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = engines(Path(a.weights), Path(tmp), a.threads, a.workers, a.runtimes)
        clocks = {rt: [] for rt in runtimes}
        totals = {rt: [] for rt in runtimes}
        patches = {}
        for k in range(a.warmup + a.runs):
            for rt, engine in runtimes.items():
                clock = defaultdict(float)
                with wrapped(engine, clock):
                    t0 = TIMER()
                    res = sparse_predict(engine, img, **opts)[0]
                    total = TIMER() - t0
                patches[rt] = len(res.patches)
                if k >= a.warmup:
                    clocks[rt].append(clock)
                    totals[rt].append(total)
    heat = "the model's seeker" if a.seeker else f"oracle heatmap (thr {a.thr})"
    print(
        f"{path.name} {img.shape[1]}x{img.shape[0]}, {heat}, patches {patches}, conf {a.conf}, threads {a.threads}, "
        f"options {a.option}"
    )
    print("\n| stage | " + " | ".join(f"{rt} ms (share)" for rt in runtimes) + " |")
    print("|---|" + "---|" * len(runtimes))
    for stage in STAGES:
        cells = []
        for rt in runtimes:
            ms = 1000 * statistics.median(c[stage] for c in clocks[rt])
            cells.append(f"{ms:.1f} ({ms / 10 / statistics.median(totals[rt]):.0f} %)")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    other = [1000 * statistics.median(t - sum(c.values()) for t, c in zip(totals[rt], clocks[rt])) for rt in runtimes]
    print("| other (glue) | " + " | ".join(f"{ms:.1f}" for ms in other) + " |")
    print("| **total** | " + " | ".join(f"**{1000 * statistics.median(totals[rt]):.1f}**" for rt in runtimes) + " |")


if __name__ == "__main__":
    main()
