"""High-resolution inference on real VisDrone frames: dense vs ESOD sparse vs sliced, side by side in one run.

Frames: the 1920x1080 and 2000x1500 images of ``../shared/data/visdrone-sample`` that are held out (every 5th of each
size, sorted by name). Every mode runs the same so-det-esod model at the frame's own resolution (long side 1920 /
2000, letterboxed to a multiple of 32), on the CPU, one frame after the other, the modes interleaved per frame.

- dense: the whole frame through the whole network (what ``yolo predict imgsz=1920`` does), NMS.
- sparse: ESOD (so_det_ultra.highres.sparse) with the heatmap from (a) an oracle drawn from the ground truth
  (``heatmap_target`` of the GT boxes: isolates the slicing machinery), (b) the model's own seeker.
- sliced: 640 px tiles, 20 % overlap, plus a 640 full-frame pass, NMS merge (so_det_ultra.highres.sliced).

Reported per mode (learned-seeker modes first): mean latency per frame (over all frames and timed rounds; ratios are
ratios of these means), GFLOPs per frame (every op actually run, counted by so_det_ultra.utils.flops.FlopCounter
around the whole predictor), patches or tiles (+1 full-frame pass) per frame, GT coverage (seeker recall: share of GT
objects >= 4 px whose centre lies in a kept patch core, the ceiling sparse recall can reach relative to dense) and
detection recall (IoU 0.5, objects >= 4 px, conf >= --conf).

Then, per frame set (each size, and all), the ceiling and the engine's efficiency (``highres_efficiency.py``): the
ideal speed-up the heatmap allows, the measured one and their ratio, for the oracle and the learned seeker; the
output ends with ``engine efficiency E (oracle Sx, ideal Ix); learned Lx at recall -R pts``.

Weights: without trained weights the detector finds nothing, so recall is only meaningful with ``--weights``. The
``train`` step fits so-det-esod on native-resolution 256 px crops of the other sample images (CPU, ~25 min), densely
or, with ``--patch N``, with ESOD's patch training (``esod_train:``, so_det_ultra.training.esod)::

    python benchmarks/bench_highres.py train --epochs 5 --out runs/highres          # writes runs/highres/train/weights
    python benchmarks/bench_highres.py train --tile 512 --patch 2 --out runs/highres-patch   # 256 px patches
    python benchmarks/bench_highres.py bench --weights runs/highres/train/weights/best.pt --frames 6
    python benchmarks/bench_highres.py head        # the sparse head alone against the dense Detect head

Seekers fitted onto trained detectors (``so-det fit-seeker``): ``fit`` fits one on the sample images outside the
benchmark frames (never on them), ``compare`` measures checkpoints side by side on the benchmark frames, each with
its learned heatmap and with the oracle::

    python benchmarks/bench_highres.py fit --weights runs/dense/best.pt --out runs/dense/best-seeker.pt
    python benchmarks/bench_highres.py compare --weights "joint=runs/dense/best.pt" "fitted=runs/dense/best-seeker.pt"
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import cv2
import highres_efficiency as eff  # this folder: on sys.path when run as a script
import numpy as np
import torch
from highres_efficiency import coverage, letterbox_geometry, oracle_heatmap  # noqa: F401 (esod_recipe.py)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "visdrone-sample"
SIZES = ((1080, 1920), (1500, 2000))


# --- data -------------------------------------------------------------------------------------------------------------


def ground_truth(stem: str, sample: Path, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 5) class, x1, y1, x2, y2 objects and (M, 4) ignored regions of one sample image (package's parser)."""
    from so_det_ultra.data.visdrone import Summary, parse_annotation

    lines = (sample / "annotations" / f"{stem}.txt").read_text().splitlines()
    ann = parse_annotation(lines, w, h, stem, Summary())
    objs = np.array([(o.cls, *o.box) for o in ann.objects], np.float32).reshape(-1, 5)
    return objs, np.array(ann.ignore, np.float32).reshape(-1, 4)


def split_frames(sample: Path):
    """Held-out high-resolution frames (every 5th of each size) and the images left for training."""
    held, rest = [], []
    by_size = {s: [] for s in SIZES}
    for p in sorted((sample / "images").glob("*.jpg")):
        hw = cv2.imread(str(p)).shape[:2]
        (by_size[hw] if hw in by_size else rest).append(p)
    for paths in by_size.values():
        for k, p in enumerate(paths):
            (held if k % 5 == 4 else rest).append(p)
    return held, rest


def make_crops(paths, sample: Path, out: Path, tile: int = 640, max_crops: int = 600) -> Path:
    """Native-resolution ``tile`` crops (no overlap) of ``paths`` with their labels; crops without objects dropped."""
    from so_det_ultra.data.visdrone import NAMES
    from so_det_ultra.highres.sliced import tile_windows

    rows_by_crop = []
    for p in paths:
        img = cv2.imread(str(p))
        h, w = img.shape[:2]
        objs, _ = ground_truth(p.stem, sample, w, h)
        for x0, y0, x1, y1 in tile_windows(h, w, tile, 0.0):
            b = objs[:, 1:].copy()
            b[:, [0, 2]] = b[:, [0, 2]].clip(x0, x1) - x0
            b[:, [1, 3]] = b[:, [1, 3]].clip(y0, y1) - y0
            area = (objs[:, 3] - objs[:, 1]) * (objs[:, 4] - objs[:, 2])
            keep = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) >= 0.5 * area  # at least half the object visible
            if keep.any():
                rows_by_crop.append((p, (x0, y0, x1, y1), objs[keep, 0], b[keep]))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows_by_crop))[:max_crops]
    for k, i in enumerate(sorted(order)):
        p, (x0, y0, x1, y1), cls, b = rows_by_crop[i]
        split = "val" if k % 10 == 9 else "train"
        name = f"{p.stem}_{x0}_{y0}"
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / "images" / split / f"{name}.jpg"), cv2.imread(str(p))[y0:y1, x0:x1])
        cw, ch = x1 - x0, y1 - y0
        lines = [
            f"{int(c)} {(q[0] + q[2]) / 2 / cw:.6f} {(q[1] + q[3]) / 2 / ch:.6f} {(q[2] - q[0]) / cw:.6f} "
            f"{(q[3] - q[1]) / ch:.6f}"
            for c, q in zip(cls, b)
        ]
        (out / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + "\n")
    data = out / "data.yaml"
    data.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames: {dict(enumerate(NAMES))}\n")
    return data


def train(a):
    from ultralytics import YOLO

    held, rest = split_frames(Path(a.sample))
    data = make_crops(rest, Path(a.sample), Path(a.out) / "crops", tile=a.tile, max_crops=a.max_crops)
    print(f"{len(rest)} training images -> crops in {data.parent}; {len(held)} held-out frames for the benchmark")
    YOLO(train_model(a)).train(
        data=str(data),
        epochs=a.epochs,
        imgsz=a.tile,
        batch=a.batch,
        workers=2,
        device="cpu",
        project=str(Path(a.out).resolve()),
        name="train",
        exist_ok=True,
        plots=False,
        mosaic=0.5,
        close_mosaic=0,
    )


def train_model(a) -> str:
    """The model to train: a checkpoint as given, or the model YAML with the loss and patch-training options set."""
    if not a.model.endswith(".yaml"):
        return a.model
    import yaml

    from so_det_ultra import paths

    src = Path(a.model) if Path(a.model).is_file() else paths.model_cfg(a.model)
    cfg = yaml.safe_load(Path(src).read_text())
    cfg["loss"] = {**cfg.get("loss", {}), "weights": a.weights_mode, "frame_area": a.frame_area}
    cfg.pop("esod_train", None)  # the shipped YAML patch-trains (the official recipe); 0 here means dense training
    if a.patch:
        cfg["esod_train"] = {"patch": a.patch, "warmup_epochs": a.warmup_epochs, "warmup_keep": "all"}
    out = Path(a.out) / Path(a.model).name  # same file name: the scale letter is read from it
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(out)


# --- measurement ------------------------------------------------------------------------------------------------------


def recall(det_xyxy: np.ndarray, gt: np.ndarray, min_size: float = 4.0, iou: float = 0.5) -> tuple[int, int]:
    """(found, total) GT objects with both sides >= ``min_size`` matched by a detection at IoU >= ``iou``."""
    import torchvision

    gt = gt[((gt[:, 3] - gt[:, 1]) >= min_size) & ((gt[:, 4] - gt[:, 2]) >= min_size)]
    if not len(gt) or not len(det_xyxy):
        return 0, len(gt)
    m = torchvision.ops.box_iou(torch.as_tensor(gt[:, 1:]), torch.as_tensor(det_xyxy, dtype=torch.float32))
    return int((m.max(1).values >= iou).sum()), len(gt)


def bench(a):
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression

    from so_det_ultra.highres import common
    from so_det_ultra.highres.sliced import sliced_predict
    from so_det_ultra.highres.sparse import SparseModel, sparse_predict
    from so_det_ultra.utils.flops import FlopCounter

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    eff.clock = eff.CLOCKS[a.clock]
    sample = Path(a.sample)
    held, _ = split_frames(sample)
    sizes = {p: cv2.imread(str(p)).shape[:2] for p in held}
    frames = [p for hw in SIZES for p in [q for q in held if sizes[q] == hw][: a.frames]]
    model = common.load_model(YOLO(a.weights or a.model), "cpu")
    sm = SparseModel(model)
    images = [cv2.imread(str(p)) for p in frames]
    gts = [ground_truth(p.stem, sample, im.shape[1], im.shape[0]) for p, im in zip(frames, images)]
    print(
        f"model {a.weights or a.model}: {sum(p.numel() for p in model.parameters()):,} params; "
        f"{len(frames)} frames {sorted({im.shape[:2] for im in images})}; torch threads {a.threads}, {a.clock} clock"
    )

    sparse_modes = {  # learned seeker first (the goal is stated for it), then the oracle heatmap
        "sparse-seeker": dict(oracle=False),
        "sparse-seeker+head": dict(oracle=False, sparse_head=True),
        "sparse-seeker no-prune": dict(oracle=False, prune=False),
        "sparse-oracle": dict(oracle=True),
        "sparse-oracle+head": dict(oracle=True, sparse_head=True),
    }
    sparse_modes.update({f"sparse-oracle p{k}": dict(oracle=True, patch=k) for k in a.patch_sweep})
    for m in a.margin_sweep:  # recall and speed against the margin, with both heatmaps
        sparse_modes[f"sparse-oracle margin {m}"] = dict(oracle=True, margin=m)
        sparse_modes[f"sparse-seeker margin {m}"] = dict(oracle=False, margin=m)
    sparse_modes["sparse-oracle merged"] = dict(oracle=True, merge_crops=True)  # crop merging, off by default
    if a.modes:
        sparse_modes = {k: v for k, v in sparse_modes.items() if k in a.modes}
    modes = ("dense", *sparse_modes, *(("sliced",) if not a.modes or "sliced" in a.modes else ()))
    rows = {
        m: {"ms": [], "found": 0, "total": 0, "cov": 0, "covn": 0, "units": [], "gflops": [], "parts": []}
        for m in modes
    }
    oracle = oracle_heatmap(gts, sm.cell)
    cover, parts, shapes = {m: [] for m in modes if m.startswith("sparse")}, [], {}

    def run(mode, n, img):
        if mode == "dense":
            x = common.letterbox(img, None, sm.stride)
            with torch.no_grad():  # not inference_mode: FlopCounter does not see convs under it
                det = non_max_suppression(model(x)[0], a.conf, 0.7, max_det=a.max_det, max_time_img=60)[0]
            return common.to_results(det, img, str(frames[n]), model.names, tuple(x.shape[2:])), 1
        if mode == "sliced":
            res = sliced_predict(model, img, tile=640, overlap=0.2, imgsz=640, conf=a.conf, max_det=a.max_det)[0]
            return res, res.n_tiles + 1
        opt = dict(sparse_modes[mode])
        if opt.pop("oracle"):
            heat, thr = (lambda k, path, hw, cells: oracle(n, img.shape[:2], hw, cells)), a.thr
        else:
            heat, thr = None, a.seeker_thr
        if a.margin is not None:
            opt.setdefault("margin", a.margin)
        res = sparse_predict(sm, img, heatmap=heat, conf=a.conf, thr=thr, max_det=a.max_det, **opt)[0]
        return res, len(res.patches)

    for n, img in enumerate(images):  # untimed pass: FLOPs, recall, coverage (and warm-up)
        for mode in modes:
            with FlopCounter() as fc:
                res, units = run(mode, n, img)
            r = rows[mode]
            r["gflops"].append(fc.gflops)
            r["units"].append(units)
            f, t = recall(res.boxes.xyxy.numpy(), gts[n][0])
            r["found"], r["total"] = r["found"] + f, r["total"] + t
            if mode.startswith("sparse"):
                x_hw = common.letterbox(img, None, sm.stride).shape[2:]
                c, t = coverage(res.patches, gts[n][0], *letterbox_geometry(*img.shape[:2], x_hw), sm.cell)
                r["cov"], r["covn"] = r["cov"] + c, r["covn"] + t
                cover[mode].append(eff.covered(res.patches, (x_hw[0] // sm.cell, x_hw[1] // sm.cell), res.runs))
                if res.patches:  # the crop shape the engine runs, for the rest's cost at patch scale
                    shapes.setdefault(
                        n,
                        (
                            res.patches[0].crop[2] - res.patches[0].crop[0],
                            res.patches[0].crop[3] - res.patches[0].crop[1],
                        ),
                    )
    for _ in range(a.rounds):  # timed rounds, modes interleaved per frame
        for n, img in enumerate(images):
            for mode in modes:
                t0 = eff.clock()
                res, _ = run(mode, n, img)
                rows[mode]["ms"].append((eff.clock() - t0) * 1000)
                rows[mode]["parts"].append(getattr(res, "speed", {}))
            parts.append(eff.time_parts(sm, img, a.conf, a.max_det, shapes.get(n)))
    rec = report(rows, a)
    sets = {f"{w}x{h}": [n for n, im in enumerate(images) if im.shape[:2] == (h, w)] for h, w in SIZES}
    summary = eff.summarise(
        rows, parts, cover, {**{k: v for k, v in sets.items() if v}, "all": list(range(len(images)))}
    )
    eff.print_table(summary)
    if ("all", "sparse-oracle") in summary and ("all", "sparse-seeker") in summary:
        print(eff.final_line(summary, "sparse-oracle", "sparse-seeker", 100 * (rec("sparse-seeker") - rec("dense"))))


def rest_data(sample: Path, folder: Path) -> Path:
    """data.yaml of the sample images outside the benchmark frames (``split_frames``' rest), converted once into
    ``folder`` with ``so-det convert visdrone`` (images linked, ignored regions in the sidecars, not painted)."""
    from so_det_ultra.data.visdrone import convert_visdrone

    _, rest = split_frames(sample)
    data = folder / "data" / "data.yaml"
    names = sorted(p.stem for p in rest)
    listed = folder / "frames.txt"
    if data.is_file() and listed.is_file() and listed.read_text().split() == names:
        return data
    src = folder / "VisDrone2019-DET-train"
    for sub, suffix in (("images", ".jpg"), ("annotations", ".txt")):
        (src / sub).mkdir(parents=True, exist_ok=True)
        for stale in (src / sub).iterdir():
            stale.unlink()
        for name in names:
            (src / sub / f"{name}{suffix}").symlink_to((sample / sub / f"{name}{suffix}").resolve())
    convert_visdrone(src, folder / "data", split="train", images="symlink", force=True, show_progress=False)
    listed.write_text("\n".join(names) + "\n")
    return data


def fit(a):
    """``so-det fit-seeker`` on the sample images outside the benchmark frames (``rest_data``)."""
    from so_det_ultra.training.seeker import fit_seeker

    torch.set_num_threads(a.threads)
    data = rest_data(Path(a.sample), Path(a.data_dir))
    held, rest = split_frames(Path(a.sample))
    print(f"fitting on {len(rest)} sample images ({data}); the {len(held)} benchmark frames are left out")
    keys = ("epochs", "variants", "recall", "recall_of", "det_conf", "cache", "holdout", "fraction")
    opts = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    print(fit_seeker(a.weights, data, a.out, force=a.force, **opts))


def compare(a):
    """Checkpoints with a seeker side by side on the benchmark frames: for each, dense, sparse with its learned heatmap
    (its stored threshold, else ESOD's 0.3) and sparse with the oracle heatmap, interleaved per frame in one run."""
    from so_det_ultra.highres import common
    from so_det_ultra.highres.sparse import SparseModel, sparse_predict

    torch.set_num_threads(a.threads)
    sample = Path(a.sample)
    held, _ = split_frames(sample)
    sizes = {p: cv2.imread(str(p)).shape[:2] for p in held}
    frames = [p for hw in SIZES for p in [q for q in held if sizes[q] == hw][: a.frames]]
    images = [cv2.imread(str(p)) for p in frames]
    gts = [ground_truth(p.stem, sample, im.shape[1], im.shape[0]) for p, im in zip(frames, images)]
    runs = []
    for spec in a.weights:
        label, _, path = spec.rpartition("=")
        sm = SparseModel(common.load_model(path))
        info = torch.load(path, map_location="cpu", weights_only=False).get("fit_seeker") or {}
        source = info.get("source")
        dense = sm.model  # a fitted checkpoint's dense baseline is its source, the detector without the seeker
        if source and Path(source).is_file() and not a.dense_with_seeker:
            dense = common.load_model(source)
        runs.append(
            {"label": label or Path(path).stem, "sm": sm, "dense": dense, "oracle": oracle_heatmap(gts, sm.cell)}
        )
    print(
        f"{len(frames)} frames {sorted({im.shape[:2] for im in images})}; torch threads {a.threads}; conf {a.conf}; "
        f"oracle threshold {a.thr}"
    )
    stats = {(r["label"], m): {"ms": [], "found": 0, "total": 0, "cov": 0, "covn": 0, "units": []} for r in runs
             for m in ("dense", "learned", "oracle")}  # fmt: skip

    def one(r, mode, n, img):
        if mode == "dense":
            x = common.letterbox(img, None, r["sm"].stride)
            with torch.no_grad():
                det = non_max_suppression(r["dense"](x)[0], a.conf, 0.7, max_det=a.max_det, max_time_img=60)[0]
            return common.to_results(det, img, str(frames[n]), r["sm"].names, tuple(x.shape[2:]))
        heat = (lambda k, path, hw, cells: r["oracle"](n, img.shape[:2], hw, cells)) if mode == "oracle" else None
        thr = a.thr if mode == "oracle" else None
        margin = {} if a.margin is None else {"margin": a.margin}
        return sparse_predict(r["sm"], img, heatmap=heat, thr=thr, conf=a.conf, max_det=a.max_det, **margin)[0]

    from ultralytics.utils.nms import non_max_suppression

    for rnd in range(a.rounds + 1):  # round 0: untimed (recall, coverage, warm-up)
        for n, img in enumerate(images):
            for r in runs:
                for mode in ("dense", "learned", "oracle"):
                    t0 = eff.clock()
                    res = one(r, mode, n, img)
                    st = stats[r["label"], mode]
                    if rnd:
                        st["ms"].append((eff.clock() - t0) * 1000)
                        continue
                    f, t = recall(res.boxes.xyxy.numpy(), gts[n][0])
                    st["found"], st["total"] = st["found"] + f, st["total"] + t
                    if mode != "dense":
                        st["units"].append(len(res.patches))
                        x_hw = common.letterbox(img, None, r["sm"].stride).shape[2:]
                        geo = letterbox_geometry(*img.shape[:2], x_hw)
                        c, t = coverage(res.patches, gts[n][0], *geo, r["sm"].cell)
                        st["cov"], st["covn"] = st["cov"] + c, st["covn"] + t
    print(compare_table(runs, stats))


def compare_table(runs, stats) -> str:
    """The side-by-side table of :func:`compare` (markdown) and one verdict line per checkpoint."""

    def rec(st):
        return 100 * st["found"] / max(st["total"], 1)

    lines = [
        "| detector / seeker | heatmap | threshold | patches/frame | seeker recall | recall dense | recall sparse | "
        "dense ms | sparse ms | x dense | of oracle's x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for r in runs:
        d = stats[r["label"], "dense"]
        dense_ms, speed = statistics.mean(d["ms"] or [float("nan")]), {}
        for mode in ("learned", "oracle"):
            st = stats[r["label"], mode]
            speed[mode] = dense_ms / statistics.mean(st["ms"] or [float("nan")])
        for mode in ("learned", "oracle"):
            st = stats[r["label"], mode]
            thr = r["sm"].threshold if mode == "learned" else "GT"
            cells = (
                r["label"],
                mode,
                thr if isinstance(thr, str) else f"{thr:.2f}",
                f"{statistics.mean(st['units']):.1f}",
                f"{100 * st['cov'] / max(st['covn'], 1):.1f} %",
                f"{rec(d):.1f} %",
                f"{rec(st):.1f} % ({rec(st) - rec(d):+.1f})",
                f"{dense_ms:.0f}",
                f"{statistics.mean(st['ms'] or [0]):.0f}",
                f"{speed[mode]:.2f}x",
                f"{speed[mode] / speed['oracle']:.2f}",
            )
            lines.append("| " + " | ".join(cells) + " |")
        delta = rec(stats[r["label"], "learned"]) - rec(d)
        verdicts.append(
            f"{r['label']}: learned {speed['learned']:.2f}x = {speed['learned'] / speed['oracle']:.2f} of the oracle's "
            f"{speed['oracle']:.2f}x (goal >= 0.9), detector recall {delta:+.1f} points vs dense (goal >= -2)"
        )
    return "\n".join(["", *lines, "", *verdicts])


def head(a):
    """Dense Detect vs the sparse head alone, on 12 patch-sized feature maps, for clustered masks of growing density."""
    import torch.nn.functional as F

    from so_det_ultra.highres import common
    from so_det_ultra.highres.sparse_head import dilate, sparse_detect

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = common.load_model(a.model)
    det, p4_cells = model.model[-1], 34  # 272 px crops: strides 4 / 8 / 16 give 68 / 34 / 17 cells
    chans = [s[0].conv.in_channels for s in det.cv2]
    feats = [torch.randn(12, c, p4_cells * 8 // int(s), p4_cells * 8 // int(s)) for c, s in zip(chans, det.stride)]
    print("| share of cells | dense head ms | sparse head ms | speed-up |\n|---|---|---|---|")
    for seeds in (0.003, 0.01, 0.03):
        m8 = dilate(torch.rand(12, p4_cells, p4_cells) < seeds, 2)
        masks = [m8.repeat_interleave(2, 1).repeat_interleave(2, 2), m8, F.max_pool2d(m8[:, None].float(), 2)[:, 0] > 0]
        ms = {}
        runs = (("dense", lambda: det(feats)), ("sparse", lambda m=masks: sparse_detect(det, feats, m)))
        for name, fn in runs:
            with torch.no_grad():
                fn()
                t0 = eff.clock()
                for _ in range(a.rounds):
                    fn()
            ms[name] = (eff.clock() - t0) / a.rounds * 1000
        print(
            f"| {100 * m8.float().mean():.0f} % | {ms['dense']:.0f} | {ms['sparse']:.0f} | "
            f"{ms['dense'] / ms['sparse']:.2f}x |"
        )


def report(rows, a):
    dense = statistics.mean(rows["dense"]["ms"])
    print("\n| mode | mean ms/frame | x dense | GFLOPs/frame | patches or tiles/frame | GT coverage | recall@0.5 |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        ms = statistics.mean(r["ms"])
        cov = f"{100 * r['cov'] / max(r['covn'], 1):.1f} %" if mode.startswith("sparse") else "100 %"
        units = f"{statistics.mean(r['units']):.1f} (min {min(r['units'])}, max {max(r['units'])})"
        print(
            f"| {mode} | {ms:.0f} | {dense / ms:.2f}x | {statistics.mean(r['gflops']):.1f} | {units} | {cov} | "
            f"{100 * r['found'] / max(r['total'], 1):.1f} % ({r['found']}/{r['total']}) |"
        )
    print("\nwhere sparse time goes (mean ms per frame):")
    for mode, r in rows.items():
        if mode.startswith("sparse"):
            keys = ("preprocess", "stem", "select", "patches", "postprocess")
            print(f"  {mode}: " + ", ".join(f"{k} {statistics.mean(p[k] for p in r['parts']):.0f}" for k in keys))
    sliced = statistics.mean(rows["sliced"]["ms"]) if "sliced" in rows else None

    def rec(m):
        return rows[m]["found"] / max(rows[m]["total"], 1)

    for m in [k for k in rows if k.startswith("sparse")]:
        ms = statistics.mean(rows[m]["ms"])
        vs_sliced = f", {sliced / ms:.2f}x faster than sliced (goal >= 5x)" if sliced else ""
        print(
            f"{m}: {dense / ms:.2f}x faster than dense (goal >= 3x){vs_sliced}, "
            f"recall {100 * (rec(m) - rec('dense')):+.1f} points vs dense (goal >= -2)"
        )
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("train", "bench", "head", "fit", "compare"):
        s = sub.add_parser(name)
        s.add_argument("--sample", default=str(SAMPLE))
        s.add_argument("--model", default="so-det-esod-s.yaml")
        s.add_argument("--threads", type=int, default=2)
    t = sub.choices["train"]
    t.add_argument("--out", default="runs/highres")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--tile", type=int, default=256, help="crop size = training imgsz (native resolution)")
    t.add_argument("--max-crops", type=int, default=600)
    t.add_argument("--patch", type=int, default=0, help="ESOD patch training: patches per side (0: dense training)")
    t.add_argument("--warmup-epochs", type=int, default=1, help="patch training: ground-truth-patch epochs")
    t.add_argument("--weights-mode", default="official", choices=("official", "none"), help="ESODLoss weights")
    t.add_argument(
        "--frame-area",
        type=float,
        default=1920 * 1080,
        help="ESODLoss frame_area: native-resolution crops of ~1080p frames count object areas in input pixels",
    )
    b = sub.choices["bench"]
    b.add_argument("--weights", help="trained checkpoint with a seeker, fitted ones too (default: untrained --model)")
    b.add_argument("--frames", type=int, default=4, help="held-out frames per size (1920x1080, 2000x1500)")
    b.add_argument("--rounds", type=int, default=2, help="timed rounds over all frames (after one warm-up round)")
    b.add_argument("--conf", type=float, default=0.01)
    b.add_argument("--max-det", type=int, default=5000, help="high, so the cap does not decide recall")
    b.add_argument("--thr", type=float, default=0.5, help="heatmap threshold with the oracle heatmap")
    b.add_argument(
        "--seeker-thr",
        type=float,
        default=None,
        help="heatmap threshold with the model's seeker (default: its stored one)",
    )
    b.add_argument("--patch-sweep", type=int, nargs="*", default=[16], help="extra oracle runs at these patch sizes")
    b.add_argument("--margin", type=int, help="context cells around each patch (default: sparse_predict's)")
    b.add_argument("--margin-sweep", type=int, nargs="*", default=[2], help="extra runs at these margins")
    b.add_argument("--modes", nargs="*", help="only these sparse modes (and sliced if named); dense always runs")
    b.add_argument("--clock", choices=tuple(eff.CLOCKS), default="wall", help="cpu: CPU time (a loaded machine)")
    h = sub.choices["head"]
    h.add_argument("--rounds", type=int, default=5)
    f = sub.choices["fit"]
    f.add_argument("--weights", required=True, help="trained detection checkpoint")
    f.add_argument("--out", required=True, help="fitted checkpoint to write")
    f.add_argument("--data-dir", default="/tmp/bench_highres/rest", help="where the rest of the sample is converted")
    f.add_argument("--epochs", type=int, help="fit_seeker epochs (default: fit_seeker's)")
    f.add_argument("--variants", type=int, help="fit_seeker variants (default: fit_seeker's)")
    f.add_argument("--recall", type=float, help="fit_seeker recall target (default: fit_seeker's)")
    f.add_argument("--recall-of", choices=("objects", "detections"), help="fit_seeker recall_of (default: its own)")
    f.add_argument("--det-conf", type=float, help="fit_seeker det_conf (default: its own)")
    f.add_argument("--holdout", type=float, help="fit_seeker holdout (default: fit_seeker's)")
    f.add_argument("--cache", help="fit_seeker cache (default: fit_seeker's)")
    f.add_argument("--fraction", type=float, help="fit_seeker fraction of the images (default: fit_seeker's)")
    f.add_argument("--force", action="store_true", help="replace --out")
    c = sub.choices["compare"]
    c.add_argument("--weights", nargs="+", required=True, help="LABEL=checkpoint, each with a seeker")
    c.add_argument("--frames", type=int, default=4, help="held-out frames per size (1920x1080, 2000x1500)")
    c.add_argument("--rounds", type=int, default=2, help="timed rounds over all frames (after one untimed round)")
    c.add_argument("--conf", type=float, default=0.01)
    c.add_argument("--max-det", type=int, default=5000, help="high, so the cap does not decide recall")
    c.add_argument("--thr", type=float, default=0.5, help="heatmap threshold with the oracle heatmap")
    c.add_argument("--margin", type=int, help="context cells around each patch (default: sparse_predict's)")
    c.add_argument("--dense-with-seeker", action="store_true", help="time a fitted model's dense pass with its seeker")
    a = p.parse_args(argv)
    {"train": train, "bench": bench, "head": head, "fit": fit, "compare": compare}[a.step](a)


if __name__ == "__main__":
    main()
