"""SO-Det RT-DETR scales beside stock rtdetr-l: params, GFLOPs and CPU latency (PyTorch eager), measured in ONE run.

Latency: batch 1, 640x640, eval mode, fused, median of ``--runs`` interleaved rounds (one call of every model per round,
so a load change on the shared machine hits all alike). ``name:nq=300`` builds a model with another number of queries
(what the raised default costs). GFLOPs: Ultralytics' thop count at 640 (the deformable sampling itself is not counted
by thop, for any RT-DETR).

    python benchmarks/bench_detr.py
    python benchmarks/bench_detr.py --models so-det-rtdetr-s.yaml rtdetr-l.yaml --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DEFAULT = [
    "so-det-rtdetr-s.yaml",
    "so-det-rtdetr-s.yaml:nq=300",
    "so-det-rtdetr-l.yaml",
    "so-det-rtdetr-l.yaml:nq=300",
    "so-det-rtdetr-x.yaml",
    "rtdetr-l.yaml",
    "rtdetr-bs.yaml",
]


def build(spec: str, nc: int):
    """RTDETRDetectionModel for ``name.yaml[:nq=N]`` with ``nc`` classes, eval mode, fused."""
    from ultralytics.nn.tasks import RTDETRDetectionModel, guess_model_scale, yaml_model_load

    name, _, opt = spec.partition(":")
    d = yaml_model_load(name)
    d["scale"] = d.get("scale") or guess_model_scale(name) or next(iter(d.get("scales", {"l": 0})))
    if opt:
        key, value = opt.split("=")
        if key != "nq":
            raise SystemExit(f"only ':nq=N' is supported, got {spec}")
        row = d["head"][-1]
        row[3] = [row[3][0], row[3][1] if len(row[3]) > 1 else 256, int(value), *row[3][3:]]
    d.pop("loss", None)  # inference cost only
    return RTDETRDetectionModel(d, nc=nc, verbose=False).eval().fuse(verbose=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--nc", type=int, default=10)
    args = ap.parse_args()
    from ultralytics.utils.torch_utils import get_flops

    torch.set_grad_enabled(False)
    models = {m: build(m, args.nc) for m in args.models}
    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    for m in models.values():
        m(x)  # warm-up (anchors, allocator)
    times = {k: [] for k in models}
    for _ in range(args.runs):
        for k, m in models.items():
            t = time.perf_counter()
            m(x)
            times[k].append((time.perf_counter() - t) * 1e3)
    ref = statistics.median(times["rtdetr-l.yaml"]) if "rtdetr-l.yaml" in times else None
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, imgsz {args.imgsz}, runs {args.runs}")
    print("| model | params (M) | GFLOPs | CPU ms (median) | x rtdetr-l |\n|---|---|---|---|---|")
    for k, m in models.items():
        ms = statistics.median(times[k])
        params = sum(p.numel() for p in m.parameters()) / 1e6
        print(
            f"| {k} | {params:.2f} | {get_flops(m, args.imgsz):.1f} | {ms:.0f} | {ms / ref:.2f} |"
            if ref
            else f"| {k} | {params:.2f} | {get_flops(m, args.imgsz):.1f} | {ms:.0f} | - |"
        )


if __name__ == "__main__":
    main()
