"""GPU model table: fp16 latency (eager, channels_last, torch.compile, TensorRT), per-layer CUDA profile, AMP training
throughput and a from-scratch learning proxy on real VisDrone frames. One command, sized for a few minutes of GPU.

Every model is measured side by side with its stock Ultralytics peer in the SAME run; ratios are the headline. Each
section runs in its own subprocess under a timeout (a CUDA fault, a hung compile or a slow TensorRT build costs that
section only, and what it finished is kept); errors are recorded in the JSON and the run goes on.

    python benchmarks/bench_gpu.py                                  # CUDA: the full run (< 5 min on one H200)
    python benchmarks/bench_gpu.py --quick --data .gpu/visdrone     # fewer runs and epochs, with the learning proxy
    python benchmarks/bench_gpu.py --skip-train --skip compile trt  # latency and profile only
    python benchmarks/bench_gpu.py                                  # no CUDA: a dry run (builds every model once on
                                                                    # CPU at 64 px, prints the plan, exits 0)
    python benchmarks/bench_gpu.py --cpu-smoke                      # every section on CPU at toy sizes (tests the code)

Outputs ``<out>/bench_gpu.json`` and ``<out>/bench_gpu.md`` (default ``benchmarks/results/gpu``).

Sections (``--skip NAME ...`` drops some):

- ``latency``: fused, eval, fp16, eager PyTorch; batch 1 and 32 at 640 and batch 1 at 1280, plus batch 32 with
  channels_last; CUDA events, warm-up, median. End-to-end heads (so-det26, yolo26) run their NMS-free one-to-one
  branch with its top-k (what they deploy); the others stop before NMS.
- ``compile``: ``torch.compile`` (default mode) of the fused fp16 model, batch 32 at 640; failures are recorded.
- ``trt``: ``YOLO(...).export(format="engine", half=True)`` at batch 1, 640, when ``tensorrt`` imports; latency of the
  engine and its parity with the fp32 PyTorch model on one random input (max abs diff / max abs output).
- ``profile``: per-layer CUDA time (forward pre/post hooks with CUDA events) of so-det-s and yolov8n-p2 at batch 32,
  640, fp16, fused.
- ``train``: images/s of forward + loss + backward + SGD step with AMP, batch 16 at 640, synthetic boxes.
- ``learn``: so-det-s, so-det26-s, yolov8n-p2 and yolo26n-p2 trained from scratch by the stock trainer with identical
  settings on ``--data DIR`` (a dataset written by ``so-det convert visdrone``, optionally shrunk), every 5th image
  held out; scored with the VisDrone metrics of so-det-ultra (docs/metrics.md) on the held-out fifth. Skipped with a
  message when ``--data`` is absent.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = [
    "so-det-s.yaml",
    "so-det-m.yaml",
    "so-det-l.yaml",
    "so-det26-s.yaml",
    "yolov8n-p2.yaml",
    "yolov8s-p2.yaml",
    "yolo11n.yaml",
    "yolo26n-p2.yaml",
]
PEER = {"so-det-s": "yolov8n-p2", "so-det-m": "yolov8s-p2", "so-det-l": "yolov8s-p2", "so-det26-s": "yolo26n-p2"}
COMPILE_MODELS = ["so-det-s.yaml", "yolov8n-p2.yaml", "so-det26-s.yaml", "yolo26n-p2.yaml"]  # pairs, in order
TRT_MODELS = ["so-det-s.yaml", "yolov8n-p2.yaml"]
PROFILE_MODELS = ["so-det-s.yaml", "yolov8n-p2.yaml"]
LEARN_MODELS = ["so-det-s.yaml", "so-det26-s.yaml", "yolov8n-p2.yaml", "yolo26n-p2.yaml"]
SECTIONS = ["latency", "profile", "train", "learn", "compile", "trt"]  # run in this order; the extras last
# Seconds per section (full run / --quick); the whole run is also capped by --budget.
TIMEOUTS = {"latency": 60, "profile": 25, "train": 40, "learn": 130, "compile": 90, "trt": 120}
QUICK_TIMEOUTS = {"latency": 40, "profile": 20, "train": 30, "learn": 80, "compile": 60, "trt": 90}


# ------------------------------------------------------------------------------------------------------ shared helpers


def stem(name: str) -> str:
    return Path(name).stem


def setup_imports():
    """so-det-ultra registered with Ultralytics, from the installed package or, failing that, this checkout."""
    try:
        import so_det_ultra
    except ImportError:
        sys.path.insert(0, str(REPO))
        import so_det_ultra
    so_det_ultra.register()
    return so_det_ultra


def build(name: str, nc: int):
    """DetectionModel of a YAML name with ``nc`` classes (Ultralytics' own YAMLs default to 80)."""
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(name, nc=nc, verbose=False)


def is_end2end(model) -> bool:
    return getattr(model.model[-1], "one2one_cv2", None) is not None


def inference_model(name, nc, device, half):
    """Fused eval model; an end-to-end head keeps its one-to-one (NMS-free) branch."""
    model = build(name, nc)
    if is_end2end(model):
        model.end2end = True
    model = model.fuse(verbose=False).eval().to(device)
    return model.half() if half else model


def timer(device):
    """``time_ms(fn, warmup, runs)``: median ms, CUDA events on a GPU, perf_counter on CPU."""
    import torch

    def time_ms(fn, warmup, runs):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return time_ms


class Part:
    """A section's results file, rewritten after every model so that a timeout keeps what was finished."""

    def __init__(self, path):
        self.path, self.data = Path(path), {"rows": {}, "errors": {}}

    def each(self, models, measure, *args):
        """``measure(name, *args)`` for every model; a failure is recorded and the next model runs."""
        import torch

        for name in models:
            try:
                row = measure(name, *args)
                self.data["rows"][stem(name)] = row
                print(stem(name), row, flush=True)
            except Exception as err:  # noqa: BLE001  (record and go on)
                self.data["errors"][stem(name)] = f"{type(err).__name__}: {err}"
                print(f"[{stem(name)}] {type(err).__name__}: {err}", flush=True)
                traceback.print_exc()
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.save()

    def skip(self, why):
        self.data["skipped"] = why
        self.save()
        print(f"skipped: {why}", flush=True)

    def save(self):
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def _dtype(device):
    import torch

    return torch.float16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------------------------ sections


def latency_row(name, a, device):
    import torch

    time_ms, dtype = timer(device), _dtype(device)
    model = inference_model(name, a.nc, device, device.type == "cuda")
    row = {"params": sum(p.numel() for p in model.parameters()), "end2end": bool(model.end2end)}
    with torch.inference_mode():
        for key, b, s in (("b1", 1, a.imgsz), ("bN", a.batch, a.imgsz), ("b1_large", 1, a.imgsz_large)):
            x = torch.rand(b, 3, s, s, device=device, dtype=dtype)
            row[key] = time_ms(lambda: model(x), a.warmup, a.runs)  # noqa: B023  (called at once)
        model = model.to(memory_format=torch.channels_last)
        x = torch.rand(a.batch, 3, a.imgsz, a.imgsz, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        row["bN_channels_last"] = time_ms(lambda: model(x), a.warmup, a.runs)
    return row


def compile_row(name, a, device):
    import torch

    time_ms = timer(device)
    torch._dynamo.reset()
    model = inference_model(name, a.nc, device, device.type == "cuda")
    x = torch.rand(a.batch, 3, a.imgsz, a.imgsz, device=device, dtype=_dtype(device))
    compiled = torch.compile(model)
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        eager = time_ms(lambda: model(x), a.warmup, a.runs)
        ms = time_ms(lambda: compiled(x), a.warmup, a.runs)
    return {"bN_compiled": ms, "bN_eager": eager, "compile_s": first}


def _first_tensor(y):
    while isinstance(y, (list, tuple)):
        y = y[0]
    return y


def trt_row(name, a, device, work):
    """TensorRT fp16 engine through the stock exporter: latency and parity with the fp32 PyTorch model."""
    import torch
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.nn.tasks import yaml_model_load

    d = {k: v for k, v in yaml_model_load(name).items() if k not in {"scale", "yaml_file"}}
    local = work / name  # keeps the scale letter in the file name
    local.write_text(yaml.safe_dump(dict(d, nc=a.nc), sort_keys=False))
    y = YOLO(str(local))
    t0 = time.perf_counter()
    engine = y.export(format="engine", half=True, imgsz=a.imgsz, batch=1, device=0, verbose=False)
    build_s = time.perf_counter() - t0
    backend = AutoBackend(engine, device=device, fp16=True, verbose=False)
    x = torch.rand(1, 3, a.imgsz, a.imgsz, device=device)
    xh = x.half()
    ref_model = y.model.fuse(verbose=False).eval().to(device).float()  # default export: the one-to-many head
    with torch.inference_mode():
        out = _first_tensor(backend(xh)).float()
        ref = _first_tensor(ref_model(x)).float()
        ms = timer(device)(lambda: backend(xh), a.warmup, a.runs)
    diff = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-9)) if out.shape == ref.shape else None
    return {"b1_trt_fp16": ms, "build_s": build_s, "rel_max_diff_vs_fp32": diff, "shape": list(out.shape)}


def _stamp(device):
    """A point in time on the device's clock: a recorded CUDA event, or perf_counter on CPU."""
    import torch

    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_ms(start, end):
    return start.elapsed_time(end) if hasattr(start, "elapsed_time") else (end - start) * 1e3


def profile_row(name, a, device):
    """Per-layer time: a pre-hook and a post-hook on every top-level layer record CUDA events (CPU: perf_counter)."""
    import torch

    model = inference_model(name, a.nc, device, device.type == "cuda")
    x = torch.rand(a.batch, 3, a.imgsz, a.imgsz, device=device, dtype=_dtype(device))
    marks = {}

    def pre(m, args):
        marks.setdefault(m.i, []).append([_stamp(device)])

    def post(m, args, out):
        marks[m.i][-1].append(_stamp(device))

    with torch.inference_mode():
        total = timer(device)(lambda: model(x), a.warmup, a.runs)  # without hooks
        hooks = [
            h
            for layer in model.model
            for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))
        ]
        for _ in range(a.runs):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    layers = {
        f"{layer.i:02d} {layer.type.split('.')[-1]}": round(
            statistics.median(_elapsed_ms(*m) for m in marks[layer.i]), 4
        )
        for layer in model.model
    }
    return {"total_ms": total, "layers_ms": layers}


def synthetic_batch(a, device):
    """A training batch of random images with 16 small boxes each (aerial-like sizes), for throughput only."""
    import torch

    b, s, n = a.train_batch, a.train_imgsz, 16
    g = torch.Generator().manual_seed(0)
    wh = torch.rand(b * n, 2, generator=g) * 0.05 + 0.005
    return {
        "img": torch.rand(b, 3, s, s, generator=g).to(device),
        "batch_idx": torch.arange(b).repeat_interleave(n).float().to(device),
        "cls": torch.randint(0, a.nc, (b * n, 1), generator=g).float().to(device),
        "bboxes": torch.cat([torch.rand(b * n, 2, generator=g) * 0.9 + 0.05, wh], 1).to(device),
    }


def train_row(name, a, device, batch):
    """Images/s of forward + loss + backward + SGD step, AMP (fp16 autocast + GradScaler) on CUDA."""
    import torch
    from ultralytics.cfg import get_cfg

    cuda = device.type == "cuda"
    model = build(name, a.nc).to(device).train()
    model.args = get_cfg()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss, _ = model.loss(batch)
        scaler.scale(loss.sum()).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(a.train_warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.train_steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    row = {"img_s": a.train_steps * a.train_batch / (time.perf_counter() - t0), "loss": type(model.criterion).__name__}
    if cuda:
        row["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return row


def heldout_dataset(src: Path, out: Path) -> Path:
    """A copy (by symlink) of a converted dataset with every 5th image (sorted by name) moved to ``val``."""
    import yaml

    d = yaml.safe_load((src / "data.yaml").read_text())
    if not isinstance(d.get("so_det"), dict):
        raise ValueError(f"{src / 'data.yaml'} has no so_det: key; convert the sample with `so-det convert visdrone`")
    side = d["so_det"].get("sidecars", "sidecars")
    images = sorted(p for p in (src / "images").rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(images) < 10:
        raise ValueError(f"{src / 'images'} holds {len(images)} images; the learning proxy needs at least 10")
    for k, img in enumerate(images):
        split = "val" if k % 5 == 4 else "train"
        rel = img.relative_to(src / "images")
        for kind, source in (
            ("images", img),
            ("labels", (src / "labels" / rel).with_suffix(".txt")),
            (side, (src / side / rel).with_suffix(".json")),
        ):
            dst = out / kind / split / source.name
            if source.exists() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(source.resolve())
    data = dict(d, path=str(out.resolve()), train="images/train", val="images/val")
    data.pop("test", None)
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "data.yaml"


def learn_row(name, a, device, data, work):
    """Stock trainer from scratch, then val on the held-out fifth: NMS, and NMS-free for end-to-end heads."""
    from ultralytics import YOLO

    t0 = time.perf_counter()
    y = YOLO(name)
    common = dict(imgsz=a.learn_imgsz, batch=a.learn_batch, device=0 if device.type == "cuda" else "cpu")
    y.train(
        data=str(data),
        epochs=a.epochs,
        workers=a.workers,
        amp=True,
        seed=0,
        plots=False,
        val=False,
        project=str(work / "runs"),
        name=stem(name),
        exist_ok=True,
        verbose=False,
        **common,
    )
    row = {"train_s": time.perf_counter() - t0}
    for key, nms in {"nms": None, "nms_free": False}.items():
        if key == "nms_free" and not is_end2end(y.model):
            continue
        m = y.val(
            data=str(data),
            split="val",
            nms=nms,
            plots=False,
            verbose=False,
            project=str(work / "val"),
            name=f"{stem(name)}-{key}",
            exist_ok=True,
            **common,
        )
        so = getattr(m, "so_det", None) or {}
        row[key] = {
            "mAP50": float(m.box.map50),
            "mAP50-95": float(m.box.map),
            **{f"so_det_{k}": so.get(k) for k in ("AP", "AP50", "AP_small", "AP_medium", "AP_large")},
        }
    return row


def sec_latency(a, part, device):
    part.each(a.models, latency_row, a, device)


def sec_compile(a, part, device):
    part.each(a.compile_models, compile_row, a, device)


def sec_trt(a, part, device):
    if importlib.util.find_spec("tensorrt") is None:
        return part.skip("tensorrt is not importable")
    part.each(a.trt_models, trt_row, a, device, Path(tempfile.mkdtemp(prefix="bench_gpu_trt_")))


def sec_profile(a, part, device):
    part.each(a.profile_models, profile_row, a, device)


def sec_train(a, part, device):
    part.each(a.models, train_row, a, device, synthetic_batch(a, device))


def sec_learn(a, part, device):
    if not a.data:
        return part.skip("no --data DIR (a dataset from `so-det convert visdrone`) given")
    work = Path(a.out).resolve() / "learn"
    data = heldout_dataset(Path(a.data).resolve(), work / "data")
    part.data["settings"] = dict(epochs=a.epochs, imgsz=a.learn_imgsz, batch=a.learn_batch, amp=True, seed=0)
    part.each(a.learn_models, learn_row, a, device, data, work)


RUNNERS = {
    "latency": sec_latency,
    "compile": sec_compile,
    "trt": sec_trt,
    "profile": sec_profile,
    "train": sec_train,
    "learn": sec_learn,
}


def run_section(a):
    """Entry of a section subprocess (``--section NAME --part FILE``)."""
    import torch

    setup_imports()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu_smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    part = Part(a.part)
    part.save()
    RUNNERS[a.section](a, part, device)


# ------------------------------------------------------------------------------------------------------- orchestration


def environment():
    import torch

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("ultralytics", "so_det_ultra", "tensorrt", "onnx", "onnxruntime", "triton"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env


def section_argv(a, section, part):
    """The options that the section subprocess needs, passed through."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--section", section, "--part", str(part)]
    for k, v in vars(a).items():
        if k in {"section", "part", "skip", "skip_train", "quick", "budget", "json"} or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    return argv


def orchestrate(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"env": environment(), "args": vars(a), "sections": {}}
    deadline = time.perf_counter() + a.budget
    timeouts = QUICK_TIMEOUTS if a.quick else TIMEOUTS
    for section in SECTIONS:
        if section in a.skip:
            results["sections"][section] = {"status": "skipped (--skip)"}
            continue
        left = deadline - time.perf_counter()
        if left < 10:
            results["sections"][section] = {"status": f"skipped: the --budget of {a.budget} s is spent"}
            continue
        limit = min(timeouts[section] * a.timeout_scale, left)
        part = out / f"part_{section}.json"
        part.unlink(missing_ok=True)
        print(f"\n=== {section} (timeout {limit:.0f} s) ===", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(section_argv(a, section, part), timeout=limit)
            status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {limit:.0f} s (partial results kept)"
        res = json.loads(part.read_text()) if part.is_file() else {}
        if res.get("skipped"):
            status = f"skipped: {res['skipped']}"
        elif res.get("errors") and status == "ok":
            status = f"ok with {len(res['errors'])} error(s)"
        results["sections"][section] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), **res}
        (out / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))
        part.unlink(missing_ok=True)
    md = markdown(results)
    (out / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "bench_gpu.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'}")


def _f(v, fmt="{:.1f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def _ratio(rows, name, key):
    peer = PEER.get(name)
    if peer in rows and isinstance(rows[name].get(key), (int, float)) and isinstance(rows[peer].get(key), float):
        return f"{rows[name][key] / rows[peer][key]:.2f}x {peer}"
    return ""


def markdown(results) -> str:
    env, secs, args = results["env"], results["sections"], results["args"]
    s, b, big = args["imgsz"], args["batch"], args["imgsz_large"]
    lines = [
        f"{env['date']}; GPU {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}); "
        f"ultralytics {env['ultralytics']}; so-det-ultra {env['so_det_ultra']}; tensorrt {env['tensorrt']}",
        "",
        "Section status: " + "; ".join(f"{k}: {v.get('status')}" for k, v in secs.items()),
    ]
    lat = secs.get("latency", {}).get("rows", {})
    comp = secs.get("compile", {}).get("rows", {})
    trt = secs.get("trt", {}).get("rows", {})
    train = secs.get("train", {}).get("rows", {})
    if lat or train:
        lines += [
            "",
            "fp16, fused, eager unless noted; ms are medians (CUDA events); ratio = vs the stock peer in this run"
            if env["gpu"]
            else "CPU smoke run: fp32, perf_counter, toy sizes; it tests the code, these are not benchmark figures",
            "",
            f"| model | params (M) | b1 {s} ms | b{b} {s} ms | b{b} vs peer | b1 {big} ms | b{b} channels_last ms | "
            f"b{b} compiled ms | b1 TensorRT fp16 ms | "
            f"train img/s (AMP, b{args['train_batch']}, {args['train_imgsz']}) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in dict.fromkeys([*lat, *train]):
            r, c, t = lat.get(name, {}), comp.get(name, {}), trt.get(name, {})
            lines.append(
                f"| {name} | {_f(r.get('params', 0) / 1e6 if r.get('params') else None, '{:.2f}')} | "
                f"{_f(r.get('b1'), '{:.2f}')} | {_f(r.get('bN'), '{:.2f}')} | "
                f"{_ratio(lat, name, 'bN')} | "
                f"{_f(r.get('b1_large'), '{:.2f}')} | {_f(r.get('bN_channels_last'), '{:.2f}')} | "
                f"{_f(c.get('bN_compiled'), '{:.2f}')} | {_f(t.get('b1_trt_fp16'), '{:.2f}')} | "
                f"{_f(train.get(name, {}).get('img_s'))} |"
            )
    if trt:
        lines += ["", "TensorRT parity (fp16 engine vs fp32 PyTorch, max abs diff / max abs output): "]
        lines[-1] += "; ".join(f"{k} {_f(v.get('rel_max_diff_vs_fp32'), '{:.1e}')}" for k, v in trt.items())
    prof = secs.get("profile", {}).get("rows", {})
    for name, r in prof.items():
        top = sorted(r["layers_ms"].items(), key=lambda kv: -kv[1])[:8]
        lines += [
            "",
            f"Per-layer time, {name}, batch {b}, {s}, fp16, fused: "
            f"total {r['total_ms']:.2f} ms (median, no hooks), layers sum {sum(r['layers_ms'].values()):.2f} ms; "
            "top layers: " + ", ".join(f"{k} {v:.2f}" for k, v in top),
        ]
    learn = secs.get("learn", {})
    if learn.get("rows"):
        s = learn.get("settings", {})
        lines += [
            "",
            f"Learning proxy: from scratch, {s.get('epochs')} epochs, imgsz {s.get('imgsz')}, batch {s.get('batch')}, "
            "AMP, optimizer auto, seed 0; scored on the held-out fifth (VisDrone protocol, docs/metrics.md)",
            "",
            "| model | inference | mAP50 | mAP50-95 | VisDrone AP | AP50 | AP_small | train s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in learn["rows"].items():
            for mode in ("nms", "nms_free"):
                if mode in r:
                    v = r[mode]
                    lines.append(
                        f"| {name} | {'NMS' if mode == 'nms' else 'NMS-free'} | {_f(v['mAP50'], '{:.4f}')} | "
                        f"{_f(v['mAP50-95'], '{:.4f}')} | {_f(v['so_det_AP'], '{:.4f}')} | "
                        f"{_f(v['so_det_AP50'], '{:.4f}')} | {_f(v['so_det_AP_small'], '{:.4f}')} | "
                        f"{_f(r['train_s'], '{:.0f}')} |"
                    )
    elif learn.get("skipped"):
        lines += ["", f"Learning proxy: skipped ({learn['skipped']})"]
    errors = {f"{k}/{m}": e for k, v in secs.items() for m, e in (v.get("errors") or {}).items()}
    if errors:
        lines += ["", "Errors:", *(f"- {k}: {e}" for k, e in errors.items())]
    return "\n".join(lines) + "\n"


def dry_run(a):
    """No CUDA device: build each model once on CPU at 64 px, print the plan, exit 0."""
    print("no CUDA device: dry run (use --cpu-smoke to run every section on CPU at toy sizes)")
    timeouts = QUICK_TIMEOUTS if a.quick else TIMEOUTS
    try:
        import torch

        setup_imports()
        for name in a.models:
            model = inference_model(name, a.nc, torch.device("cpu"), half=False)
            with torch.inference_mode():
                y = _first_tensor(model(torch.zeros(1, 3, 64, 64)))
            n = sum(p.numel() for p in model.parameters())
            print(f"  built {stem(name)}: {n / 1e6:.2f}M params (fused), end2end {model.end2end}, out {tuple(y.shape)}")
    except Exception as err:  # noqa: BLE001  (a dry run reports, it does not fail)
        print(f"  could not build the models here: {type(err).__name__}: {err}")
    print("plan on a CUDA machine:")
    for s in SECTIONS:
        state = "skip" if s in a.skip else f"timeout {timeouts[s] * a.timeout_scale:.0f} s"
        print(f"  {s:8s} {state}")
    print(
        f"  latency: {len(a.models)} models, fp16 fused eager, b1/b{a.batch} at {a.imgsz}, b1 at {a.imgsz_large}, "
        f"{a.warmup} warm-up + {a.runs} runs; compile: {a.compile_models}; trt: {a.trt_models} "
        f"(tensorrt importable: {importlib.util.find_spec('tensorrt') is not None}); profile: {a.profile_models}; "
        f"train: b{a.train_batch} at {a.train_imgsz}, {a.train_steps} steps; learn: {a.learn_models}, "
        f"{a.epochs} epochs, data {a.data or 'none (skipped)'}; total budget {a.budget} s"
    )


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS, help="latency and training-throughput models")
    p.add_argument("--compile-models", nargs="+", default=COMPILE_MODELS)
    p.add_argument("--trt-models", nargs="+", default=TRT_MODELS)
    p.add_argument("--profile-models", nargs="+", default=PROFILE_MODELS)
    p.add_argument("--learn-models", nargs="+", default=LEARN_MODELS)
    p.add_argument("--data", help="converted VisDrone sample (so-det convert visdrone) for the learning proxy")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu"))
    p.add_argument("--nc", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--imgsz-large", type=int, default=1280)
    p.add_argument("--batch", type=int, default=32, help="the large inference batch")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-imgsz", type=int, default=640)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--train-warmup", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5, help="learning-proxy epochs")
    p.add_argument("--learn-imgsz", type=int, default=640)
    p.add_argument("--learn-batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("--skip-train", action="store_true", help="skip the train and learn sections")
    p.add_argument("--quick", action="store_true", help="fewer runs, steps and epochs; shorter timeouts")
    p.add_argument("--budget", type=float, default=285, help="seconds for the whole run")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies every section timeout")
    p.add_argument("--cpu-smoke", action="store_true", help="run every section on CPU at toy sizes")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.skip_train:
        a.skip = sorted({*a.skip, "train", "learn"})
    if a.quick and not a.section:
        a.runs, a.warmup, a.train_steps, a.epochs = min(a.runs, 15), min(a.warmup, 5), min(a.train_steps, 5), 3
    if a.cpu_smoke and not a.section:
        a.imgsz, a.imgsz_large, a.batch, a.runs, a.warmup = 64, 96, 2, 2, 1
        a.train_imgsz, a.train_batch, a.train_steps, a.train_warmup = 64, 2, 1, 1
        a.learn_imgsz, a.learn_batch, a.epochs, a.workers = 64, 4, 1, 0
        a.timeout_scale = max(a.timeout_scale, 4.0)  # CPU is slow; the section bodies are what is tested
        a.budget = max(a.budget, 2400)
    return a


def main(argv=None):
    a = parse(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if a.section:
        return run_section(a)
    import torch

    if not torch.cuda.is_available() and not a.cpu_smoke:
        return dry_run(a)
    orchestrate(a)


if __name__ == "__main__":
    main()
