"""INT8 deployment, measured: so-det-n against the stock yolov8n-p2 on the same synthetic small-object task.

Each model is trained with the stock trainer (the demo's recipe: AdamW, one warm-up epoch, no mosaic), validated in
FP32 (PyTorch), then exported to
- OpenVINO INT8: Ultralytics' ``export(format="openvino", int8=True, data=...)`` (NNCF post-training quantization,
  https://github.com/openvinotoolkit/nncf, ``nncf.quantize`` over the training images);
- ONNX Runtime static INT8: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, MinMax
  calibration over the training images; https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html)
and every variant is validated through the stock ``YOLO(path).val`` (AP by object size from the data YAML's
``so_det:`` key, SODA-D bins). Latency: median of single-image, single-thread runs of the raw runtime session.

Usage (prints a markdown table; nothing is hard-coded):
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_int8.py --out /tmp/int8 --epochs 20 --images 128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

MODELS = {"so-det-n": "so-det-n.yaml", "yolov8n-p2": "yolov8n-p2.yaml"}
RECIPE = dict(optimizer="AdamW", lr0=0.005, warmup_epochs=1, mosaic=0.0, close_mosaic=0, patience=0, workers=0)


def make_data(root: Path, images: int, imgsz: int, seed: int) -> Path:
    import yaml

    from so_det_ultra.data.contract import SO_DET_KEY, so_det_key
    from so_det_ultra.data.synthetic import make_dataset

    path = make_dataset(
        root, n_train=images, n_val=max(16, images // 4), imgsz=imgsz, nc=3, objects=(3, 10), size_range=(6.0, 24.0)
    )
    data = yaml.safe_load(path.read_text())
    data[SO_DET_KEY] = so_det_key("soda-d-fullframe", 100)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def train(name: str, data: Path, out: Path, epochs: int, imgsz: int, batch: int, seed: int, reuse: bool) -> Path:
    from ultralytics import YOLO

    best = out / name / "weights" / "best.pt"
    if reuse and best.is_file():
        return best
    model = YOLO(MODELS[name])
    model.train(
        data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, device="cpu", project=str(out), name=name,
        exist_ok=True, plots=False, seed=seed, **RECIPE,
    )  # fmt: skip
    return Path(model.trainer.save_dir) / "weights" / "best.pt"


def calibration_images(data: Path, imgsz: int, n: int) -> np.ndarray:
    """Up to ``n`` training images, resized to ``imgsz`` (square, as the generator writes them), RGB, NCHW, [0, 1]."""
    import cv2

    files = sorted((data.parent / "images" / "train").glob("*.png"))[:n]
    ims = [cv2.resize(cv2.imread(str(f)), (imgsz, imgsz))[..., ::-1] for f in files]
    return np.ascontiguousarray(np.stack(ims).transpose(0, 3, 1, 2), dtype=np.float32) / 255


def head_decode_nodes(onnx_fp32: Path) -> list[str]:
    """Nodes of the detection head outside its conv branches (``cv2``/``cv3``, ``one2one_*``): DFL, box decode,
    sigmoid and the final concat of pixel boxes with [0, 1] scores. Ultralytics' NNCF export leaves the same part in
    FP32 (``ultralytics/engine/exporter.py``, ``export_openvino``: ``nncf.IgnoredScope`` over the head's decode)."""
    import onnx

    nodes = onnx.load(str(onnx_fp32)).graph.node
    last = max(int(n.name.split("/")[1][6:]) for n in nodes if n.name.startswith("/model."))
    head = [n.name for n in nodes if n.name.startswith(f"/model.{last}/")]
    return [n for n in head if not any(f"/{b}" in n for b in ("cv2.", "cv3.", "one2one_cv2.", "one2one_cv3."))]


def ort_int8(onnx_fp32: Path, calib: np.ndarray, exclude=(), suffix: str = "_int8") -> Path:
    """Static QDQ INT8 ONNX next to ``onnx_fp32`` (``exclude``: node names kept in FP32), keeping Ultralytics'
    metadata so ``YOLO(path)`` loads it."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.name = onnx.load(str(onnx_fp32)).graph.input[0].name
            self.it = iter(calib[i : i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {self.name: x}

    dst = onnx_fp32.with_name(onnx_fp32.stem + suffix + ".onnx")
    quantize_static(
        str(onnx_fp32), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
    )  # fmt: skip
    src, q = onnx.load(str(onnx_fp32)), onnx.load(str(dst))
    del q.metadata_props[:]
    q.metadata_props.extend(src.metadata_props)
    onnx.save(q, str(dst))
    return dst


def layer_errors(fp32: Path, int8: Path, calib: np.ndarray) -> list[tuple[str, float]]:
    """Relative L2 error ``|y_int8 - y_fp32| / |y_fp32|`` of each top-level layer's output (``/model.N/`` node
    names of Ultralytics' torch export), INT8 QDQ model against FP32, over ``calib`` images: where the error enters."""
    import onnx
    import onnxruntime as ort

    src = onnx.load(str(fp32))
    last = {}
    for n in src.graph.node:
        parts = n.name.split("/")
        if len(parts) > 2 and parts[1].startswith("model."):
            last[parts[1]] = n.output[0]
    names = sorted(last, key=lambda k: int(k.split(".")[1]))
    outs = {}
    for label, path in (("fp32", fp32), ("int8", int8)):
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.ValueInfoProto(name=last[k]) for k in names if last[k] not in have)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = sess.get_inputs()[0].name
        outs[label] = [sess.run([last[k] for k in names], {feed: calib[i : i + 1]}) for i in range(len(calib))]
    errors = []
    for j, k in enumerate(names):
        num = sum(float(np.sum((q[j] - f[j]) ** 2)) for q, f in zip(outs["int8"], outs["fp32"]))
        den = sum(float(np.sum(f[j] ** 2)) for f in outs["fp32"])
        errors.append((k, (num / max(den, 1e-12)) ** 0.5))
    return errors


def latency_ms(path: Path, imgsz: int, runs: int = 30) -> float:
    """Median single-thread latency (ms) of one image through the raw runtime (ONNX Runtime or OpenVINO CPU)."""
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        call = lambda: sess.run(None, {name: x})  # noqa: E731
    else:
        import openvino as ov

        compiled = ov.Core().compile_model(str(next(path.glob("*.xml"))), "CPU", {"INFERENCE_NUM_THREADS": 1})
        call = lambda: compiled([x])  # noqa: E731
    for _ in range(3):
        call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def latency_rounds(paths: dict, imgsz: int, rounds: int = 5) -> dict:
    """``{label: ms}``: the smallest of ``rounds`` interleaved medians per model file, so that load from other
    processes on a shared machine hits every variant alike and the ratios stay comparable."""
    best = {k: float("inf") for k in paths}
    for _ in range(rounds):
        for label, path in paths.items():
            best[label] = min(best[label], latency_ms(path, imgsz))
    return best


def validate(path, data: Path, imgsz: int) -> dict:
    from ultralytics import YOLO

    m = YOLO(str(path), task="detect").val(
        data=str(data), imgsz=imgsz, batch=1, device="cpu", plots=False, project=str(Path(path).parent), name="val"
    )
    keys = ("AP", "AP50", "AP_eS", "AP_rS", "AP_gS")
    so = getattr(m, "so_det", {}) or {}
    return {"mAP50-95": float(m.box.map), "mAP50": float(m.box.map50), **{k: so.get(k) for k in keys}}


def run_model(name: str, data: Path, out: Path, args) -> list[dict]:
    from ultralytics import YOLO

    best = train(name, data, out, args.epochs, args.imgsz, args.batch, args.seed, args.reuse)
    rows = [{"model": name, "variant": "PyTorch FP32", **validate(best, data, args.imgsz)}]
    fp32 = Path(YOLO(str(best)).export(format="onnx", imgsz=args.imgsz, device="cpu"))
    calib = calibration_images(data, args.imgsz, args.calib)
    q8 = ort_int8(fp32, calib)
    q8h = ort_int8(fp32, calib, exclude=head_decode_nodes(fp32), suffix="_int8_head_fp32")
    blocks = YOLO(str(best)).model.model
    for layer, err in layer_errors(fp32, q8, calib[:8]):
        print(f"LAYER {name} {layer} {type(blocks[int(layer[6:])]).__name__} rel_err={err:.4f}", flush=True)
    variants = [
        ("ONNX Runtime FP32", fp32, fp32),
        ("ONNX Runtime INT8 (static QDQ, whole graph)", q8, fp32),
        ("ONNX Runtime INT8 (static QDQ, head decode FP32)", q8h, fp32),
    ]
    if not args.ort_only:
        ov32 = Path(YOLO(str(best)).export(format="openvino", imgsz=args.imgsz, device="cpu"))
        ov8 = YOLO(str(best)).export(format="openvino", int8=True, data=str(data), imgsz=args.imgsz, device="cpu")
        variants += [("OpenVINO FP32", ov32, ov32), ("OpenVINO INT8 (NNCF)", Path(ov8), ov32)]
    lat = {p: latency_ms(p, args.imgsz) for _, p, _ in variants}
    for label, path, base in variants:
        row = {"model": name, "variant": label, **validate(path, data, args.imgsz)}
        row.update(latency_ms=lat[path], latency_vs_fp32=lat[path] / lat[base])
        rows.append(row)
        print("ROW", json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["model", "variant", "mAP50", "AP", "AP50", "AP_eS", "AP_rS", "AP_gS", "latency_ms", "latency_vs_fp32"]
    f = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(f(r.get(c)) for c in cols) + " |" for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("int8-bench"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calib", type=int, default=64, help="calibration images for ONNX Runtime static INT8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--reuse", action="store_true", help="skip training where OUT/<model>/weights/best.pt exists")
    p.add_argument("--ort-only", action="store_true", help="only the ONNX Runtime rows (no OpenVINO export)")
    p.add_argument("--latency-only", action="store_true", help="only interleaved latency of the files in OUT")
    args = p.parse_args(argv)
    if args.latency_only:
        for name in args.models:
            w = args.out / name / "weights"
            files = {
                "ONNX Runtime FP32": w / "best.onnx",
                "ONNX Runtime INT8 (whole graph)": w / "best_int8.onnx",
                "ONNX Runtime INT8 (head decode FP32)": w / "best_int8_head_fp32.onnx",
                "OpenVINO FP32": w / "best_openvino_model",
                "OpenVINO INT8 (NNCF)": w / "best_int8_openvino_model",
            }
            for label, ms in latency_rounds({k: v for k, v in files.items() if v.exists()}, args.imgsz).items():
                print(f"LATENCY {name} | {label} | {ms:.2f} ms", flush=True)
        return []
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_data(args.out / "data", args.images, args.imgsz, args.seed)
    rows = [r for name in args.models for r in run_model(name, data, args.out, args)]
    (args.out / "int8.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
