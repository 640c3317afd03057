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

Outputs ``<out>/bench_gpu.json`` and ``<out>/bench_gpu.md`` (default ``benchmarks/results/gpu``). This file runs the
sections (each in a subprocess) and writes the report; what each section measures is in ``gpu_sections.py``.

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
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/gpu_sections.py, beside this script (a script's own folder is on sys.path)
from gpu_sections import RUNNERS, Part, first_tensor, inference_model, stem

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


def setup_imports():
    """so-det-ultra registered with Ultralytics, from the installed package or, failing that, this checkout."""
    try:
        import so_det_ultra
    except ImportError:
        sys.path.insert(0, str(REPO))
        import so_det_ultra
    so_det_ultra.register()
    return so_det_ultra


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
    env, secs = results["env"], results["sections"]
    lines = [
        f"{env['date']}; GPU {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}); "
        f"ultralytics {env['ultralytics']}; so-det-ultra {env['so_det_ultra']}; tensorrt {env['tensorrt']}",
        "",
        "Section status: " + "; ".join(f"{k}: {v.get('status')}" for k, v in secs.items()),
    ]
    lines += _speed_table(results) + _profile_lines(results) + _learn_table(secs.get("learn", {}))
    errors = {f"{k}/{m}": e for k, v in secs.items() for m, e in (v.get("errors") or {}).items()}
    if errors:
        lines += ["", "Errors:", *(f"- {k}: {e}" for k, e in errors.items())]
    return "\n".join(lines) + "\n"


def _speed_table(results) -> list:
    """Latency, compile, TensorRT and training throughput: one row per model, and the TensorRT parity line."""
    env, secs, args = results["env"], results["sections"], results["args"]
    s, b, big = args["imgsz"], args["batch"], args["imgsz_large"]
    lat, comp, trt, train = (secs.get(k, {}).get("rows", {}) for k in ("latency", "compile", "trt", "train"))
    lines = []
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
    return lines


def _profile_lines(results) -> list:
    s, b = results["args"]["imgsz"], results["args"]["batch"]
    lines = []
    for name, r in results["sections"].get("profile", {}).get("rows", {}).items():
        top = sorted(r["layers_ms"].items(), key=lambda kv: -kv[1])[:8]
        lines += [
            "",
            f"Per-layer time, {name}, batch {b}, {s}, fp16, fused: "
            f"total {r['total_ms']:.2f} ms (median, no hooks), layers sum {sum(r['layers_ms'].values()):.2f} ms; "
            "top layers: " + ", ".join(f"{k} {v:.2f}" for k, v in top),
        ]
    return lines


def _learn_table(learn: dict) -> list:
    if not learn.get("rows"):
        return ["", f"Learning proxy: skipped ({learn['skipped']})"] if learn.get("skipped") else []
    s = learn.get("settings", {})
    lines = [
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
    return lines


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
                y = first_tensor(model(torch.zeros(1, 3, 64, 64)))
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
