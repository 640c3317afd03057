"""The sections of ``bench_gpu.py``: one function per model and section, each returning one row of figures.

``bench_gpu.py`` runs every section in its own subprocess (``--section NAME``) and calls :data:`RUNNERS`; a section's
rows go through :class:`Part`, which rewrites the section's results file after every model. What each section
measures: the docstring of ``bench_gpu.py`` and docs/models.md.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path


def stem(name: str) -> str:
    return Path(name).stem


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


def first_tensor(y):
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
        out = first_tensor(backend(xh)).float()
        ref = first_tensor(ref_model(x)).float()
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
