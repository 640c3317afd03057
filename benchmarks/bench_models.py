"""Model table: params, GFLOPs, CPU latency (PyTorch eager and ONNX Runtime) and training throughput.

Every so-det scale and ablation, the so-det26 scales (when cfg/models/so-det26.yaml exists) and the fast variant,
side by side with stock Ultralytics peers measured in the SAME run. These machines are noisy and shared, so models are
timed in interleaved rounds (A, B, C, A, B, C, ...) and the headline is the ratio to the peer of the same size,
computed per round and summarised as median [25th-75th percentile] over the rounds. The issue-14 goal ratios are
printed explicitly. Prints a markdown table, writes JSON.

    python benchmarks/bench_models.py                       # default set, ~10 min on 2 cores
    python benchmarks/bench_models.py --goals --runs 30     # only the goal models (~3 min)
    python benchmarks/bench_models.py --models so-det-s.yaml yolov8n-p2.yaml --runs 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SO_DET26 = Path(__file__).resolve().parents[1] / "cfg" / "models" / "so-det26.yaml"
DEFAULT = [
    "so-det-n.yaml",
    "so-det-s.yaml",
    "so-det-m.yaml",
    "so-det-l.yaml",
    "so-det-x.yaml",
    "so-det-base-s.yaml",
    "so-det-cdown-s.yaml",
    "so-det-clwa-s.yaml",
    "so-det-fast-n.yaml",
    "so-det-fast-s.yaml",
    *(["so-det26-n.yaml", "so-det26-s.yaml", "so-det26-m.yaml", "so-det26-fast-s.yaml"] if SO_DET26.exists() else []),
    "yolo11n.yaml",
    "yolo11s.yaml",
    "yolo11m.yaml",
    "yolov8n-p2.yaml",
    "yolov8s-p2.yaml",
    "yolo26n-p2.yaml",
    "yolo26s-p2.yaml",
]
GOAL_MODELS = [
    "so-det-s.yaml",
    "so-det-fast-s.yaml",
    *(["so-det26-s.yaml", "so-det26-fast-s.yaml"] if SO_DET26.exists() else []),
    "yolov8n-p2.yaml",
    "yolo26n-p2.yaml",
]
PEER = {
    "so-det-n": "yolov8n-p2",
    "so-det-s": "yolov8n-p2",
    "so-det-m": "yolov8s-p2",
    "so-det-l": "yolo11m",
    "so-det-x": "yolo11m",
    "so-det-base-s": "yolov8n-p2",
    "so-det-cdown-s": "yolov8n-p2",
    "so-det-clwa-s": "yolov8n-p2",
    "so-det-fast-n": "yolov8n-p2",
    "so-det-fast-s": "yolov8n-p2",
    "so-det26-n": "yolo26n-p2",
    "so-det26-s": "yolo26n-p2",
    "so-det26-m": "yolo26s-p2",
    "so-det26-fast-s": "yolo26n-p2",
}
# the CPU latency goals of docs/models.md: (model, peer, target ratio or None for information)
GOALS = [
    ("so-det-s", "yolov8n-p2", 1.0),
    ("so-det26-s", "yolo26n-p2", 1.0),
    ("yolo26n-p2", "yolov8n-p2", 0.5),
    ("so-det-fast-s", "yolov8n-p2", 1.0),
    ("so-det26-fast-s", "yolo26n-p2", 1.0),
]


def use_reference_blocks():
    """Swap every rewritten block's fast ``forward`` for its ``forward_reference`` (to measure the rewrites)."""
    from so_det_ultra.nn import downsample, fusion, head

    for mod in (fusion, downsample, head):
        for obj in vars(mod).values():
            if isinstance(obj, type) and hasattr(obj, "forward_reference"):
                obj.forward = obj.forward_reference


def build(name, nc, folder="."):
    """YOLO(name) with ``nc`` classes: the YAML is copied into ``folder`` under its own name (keeps its scale)."""
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    d = {k: v for k, v in yaml_model_load(name).items() if k not in {"scale", "yaml_file"}}
    local = Path(folder) / name
    local.write_text(yaml.safe_dump(dict(d, nc=nc), sort_keys=False))
    return YOLO(str(local))


def interleaved_ms(fns: dict, runs: int, warmup: int) -> dict:
    """Times (ms) of each callable over ``runs`` rounds, one call of each per round so load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_ratio(a: list, b: list) -> dict:
    """Per-round ratios a_i / b_i of two interleaved series: median and 25th/75th percentiles."""
    r = np.array(a) / np.array(b)
    return {"median": float(np.median(r)), "p25": float(np.percentile(r, 25)), "p75": float(np.percentile(r, 75))}


def torch_runner(model, imgsz):
    x = torch.zeros(1, 3, imgsz, imgsz)

    def run():
        with torch.inference_mode():
            model(x)

    return run


def ort_runner(y, imgsz, threads, sessions=2):
    """Callable running the exported model; each call uses the next of ``sessions`` identical ORT sessions.

    Identical sessions of one graph can differ by tens of percent on these machines (allocation and thread placement),
    so each model's time is its median over several sessions instead of one session's luck.
    """
    import itertools

    import onnxruntime as ort

    f = y.export(format="onnx", imgsz=imgsz, simplify=True, verbose=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle sessions must not steal the cores
    pool = itertools.cycle([ort.InferenceSession(f, so, providers=["CPUExecutionProvider"]) for _ in range(sessions)])
    x = np.zeros((1, 3, imgsz, imgsz), np.float32)

    def run():
        sess = next(pool)
        return sess.run(None, {sess.get_inputs()[0].name: x})

    return run


def train_throughput(model, imgsz, steps, batch):
    from ultralytics.cfg import get_cfg

    model = model.train()
    model.args = get_cfg()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batch_d = {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=g),
        "batch_idx": torch.arange(batch).repeat_interleave(4).float(),
        "cls": torch.zeros(batch * 4, 1),
        "bboxes": torch.tensor(
            [[0.3, 0.3, 0.05, 0.05], [0.6, 0.6, 0.04, 0.03], [0.2, 0.7, 0.1, 0.1], [0.8, 0.2, 0.02, 0.02]]
        ).repeat(batch, 1),
    }

    def step():
        opt.zero_grad()
        loss, _ = model.loss(batch_d)
        loss.sum().backward()
        opt.step()

    step()  # warm-up (builds the criterion)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="YAMLs to measure (default: the full table)")
    p.add_argument("--goals", action="store_true", help="measure only the issue-14 goal models (so-det-s, peers)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--nc", type=int, default=10)
    p.add_argument("--runs", type=int, default=7, help="timed rounds per latency (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--train-steps", type=int, default=3, help="optimizer steps for throughput (0 = skip)")
    p.add_argument("--train-imgsz", type=int, default=320)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--sessions", type=int, default=2, help="identical ORT sessions per model, used in turn")
    p.add_argument(
        "--reference-blocks",
        action="store_true",
        help="run every rewritten block's forward_reference (EAFusion, SimAM, CDown, ...) to measure the rewrites",
    )
    p.add_argument("--json", default="benchmarks/results/models.json")
    a = p.parse_args(argv)

    from ultralytics.utils.torch_utils import get_flops

    from so_det_ultra.utils.flops import count_flops

    torch.set_num_threads(a.threads)
    a.models = a.models or (GOAL_MODELS if a.goals else DEFAULT)
    if a.goals:
        a.train_steps = 0
    if a.reference_blocks:
        use_reference_blocks()
    rows, torch_fns, ort_fns = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # exports land here
        try:
            for name in a.models:
                stem = Path(name).stem
                y = build(name, a.nc, tmp)
                fused = y.model.fuse(verbose=False).eval()
                rows[stem] = {
                    "params": sum(q.numel() for q in fused.parameters()),
                    "gflops_thop": get_flops(fused, a.imgsz),
                    "gflops_all": count_flops(fused, a.imgsz)[0],
                }
                torch_fns[stem] = torch_runner(fused, a.imgsz)
                if not a.no_onnx:
                    ort_fns[stem] = ort_runner(y, a.imgsz, a.threads, a.sessions)
                if a.train_steps:
                    rows[stem]["train_img_s"] = train_throughput(
                        build(name, a.nc, tmp).model, a.train_imgsz, a.train_steps, a.train_batch
                    )
                print(f"{stem}: {rows[stem]}", flush=True)
            torch_times = interleaved_ms(torch_fns, a.runs, a.warmup)
            ort_times = interleaved_ms(ort_fns, a.runs, a.warmup) if ort_fns else {}
            for stem in rows:
                rows[stem]["torch_ms"] = statistics.median(torch_times[stem])
                if stem in ort_times:
                    rows[stem]["onnx_ms"] = statistics.median(ort_times[stem])
        finally:
            os.chdir(cwd)

    def ratio(stem, times):
        peer = PEER.get(stem)
        if peer not in times or stem not in times:
            return ""
        r = rows[stem].setdefault("onnx_vs_peer", paired_ratio(times[stem], times[peer]))
        return f"{r['median']:.2f}x [{r['p25']:.2f}-{r['p75']:.2f}] {peer}"

    lines = [
        f"imgsz {a.imgsz}, nc {a.nc}, batch 1, fused, {a.threads} threads, median of {a.runs} interleaved rounds after "
        f"{a.warmup} warm-up; "
        f"training: {a.train_steps} steps, batch {a.train_batch}, imgsz {a.train_imgsz}",
        "",
        "| model | params (M) | GFLOPs (thop) | GFLOPs (all ops) | PyTorch ms | ONNX RT ms | ONNX RT vs peer "
        "| train img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stem, r in rows.items():
        onnx = f"{r['onnx_ms']:.1f}" if r.get("onnx_ms") else "-"
        train = f"{r['train_img_s']:.1f}" if r.get("train_img_s") else "-"
        lines.append(
            f"| {stem} | {r['params'] / 1e6:.2f} | {r['gflops_thop']:.1f} | {r['gflops_all']:.1f} | "
            f"{r['torch_ms']:.1f} | {onnx} | {ratio(stem, ort_times)} | {train} |"
        )
    goals = {}
    for stem, peer, target in GOALS:
        for kind, times in (("ONNX Runtime", ort_times), ("PyTorch", torch_times)):
            if stem in times and peer in times:
                r = paired_ratio(times[stem], times[peer])
                goals[f"{stem} / {peer} ({kind})"] = dict(r, target=target)
    if goals:
        lines += [
            "",
            "| goal ratio (per-round, interleaved) | median | 25th-75th pct | target | met |",
            "|---|---|---|---|---|",
        ]
        for k, r in goals.items():
            met = "yes" if r["median"] <= r["target"] else "no"
            lines.append(f"| {k} | {r['median']:.2f}x | {r['p25']:.2f}-{r['p75']:.2f} | <= {r['target']}x | {met} |")
    print("\n".join(lines))
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows, "goals": goals}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
