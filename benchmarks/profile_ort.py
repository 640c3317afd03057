"""Where ONNX Runtime spends its CPU time: per-layer and per-op-type profile of exported models.

Exports each model (fused, ``nc`` classes, batch 1), runs it ``--runs`` times under ONNX Runtime's profiler
(``SessionOptions.enable_profiling``) and sums the kernel times of every node by YOLO layer index (the ``/model.N/``
prefix of the exported node names) and by op type. Prints markdown tables; ``--json`` saves them.

    python benchmarks/profile_ort.py --models so-det-s.yaml yolov8n-p2.yaml --runs 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def export(name: str, nc: int, imgsz: int, folder: str) -> str:
    """ONNX file of YOLO(name) with ``nc`` classes (same builder as bench_models.py)."""
    from bench_models import build

    y = build(name, nc, folder)
    return y.export(format="onnx", imgsz=imgsz, simplify=True, verbose=False)


def profile(onnx_file: str, imgsz: int, runs: int, threads: int) -> list[dict]:
    """ORT profiler events (``cat == "Node"``, kernel time only) of ``runs`` timed runs after 2 warm-up runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(onnx_file).with_suffix(""))
    sess = ort.InferenceSession(onnx_file, so, providers=["CPUExecutionProvider"])
    x = {sess.get_inputs()[0].name: np.zeros((1, 3, imgsz, imgsz), np.float32)}
    for _ in range(2 + runs):
        sess.run(None, x)
    events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # drop the warm-up runs: each run emits the same number of node events
    per_run = len(nodes) // (2 + runs)
    return nodes[2 * per_run :]


def layer_of(node_name: str) -> str:
    m = re.search(r"/model\.(\d+)/", node_name) or re.search(r"model\.(\d+)", node_name)
    return m.group(1) if m else "other (layout reorders, glue)"


def summarize(nodes: list[dict], runs: int) -> dict:
    by_layer, by_op = defaultdict(float), defaultdict(float)
    for e in nodes:
        us = e["dur"] / runs
        by_layer[layer_of(e["name"])] += us
        by_op[e["args"].get("op_name", "?")] += us
    total = sum(by_layer.values())
    return {"total_ms": total / 1e3, "by_layer": dict(by_layer), "by_op": dict(by_op)}


def table(title: str, rows: dict[str, dict], key: str, top: int) -> str:
    names = list(rows)
    keys = sorted(
        {k for r in rows.values() for k in r[key]}, key=lambda k: -max(r[key].get(k, 0) for r in rows.values())
    )
    lines = [f"{title}", "", "| " + " | ".join([key[3:]] + [f"{n} ms (share)" for n in names]) + " |"]
    lines.append("|" + "---|" * (len(names) + 1))
    for k in keys[:top]:
        cells = [
            f"{rows[n][key].get(k, 0) / 1e3:.2f} ({rows[n][key].get(k, 0) / 1e3 / rows[n]['total_ms']:.0%})"
            for n in names
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| **total kernel time** | " + " | ".join(f"{rows[n]['total_ms']:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["so-det-s.yaml", "yolov8n-p2.yaml"])
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--nc", type=int, default=10)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=25, help="rows per table")
    p.add_argument("--reference-blocks", action="store_true", help="profile the reference (unoptimised) block forwards")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    if a.reference_blocks:
        from bench_models import use_reference_blocks  # noqa: I001

        use_reference_blocks()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            for name in a.models:
                f = export(name, a.nc, a.imgsz, tmp)
                rows[Path(name).stem] = summarize(profile(f, a.imgsz, a.runs, a.threads), a.runs)
        finally:
            os.chdir(cwd)
    print(table("Per layer (YOLO layer index)", rows, "by_layer", a.top))
    print()
    print(table("Per op type", rows, "by_op", a.top))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
