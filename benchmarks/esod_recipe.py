"""ESOD's training recipe on the shared VisDrone sample: the seeker's loss balance, and dense vs patch training.

``balance``: the seeker's share of the loss, and of the gradient reaching the shared backbone (the output of backbone
P3, layer 4 of so-det-esod, which both the seeker and the detector read), with our gains and with the official ones.
Official (github alibaba/esod, ``utils/loss.py`` lines 181-189, ``data/hyps/hyp.visdrone.yaml``): ``(lbox * 0.05 +
lobj * 1.0 * 0.5 + lcls * 0.5) + 0.2 * lpixl``. Ours: Ultralytics' v8 loss ``box * 7.5 + cls * 0.5 + dfl * 1.5`` plus
``gain * BCE``. The official terms are YOLOv5's formulas (``utils/loss.py`` ``ComputeLoss``) evaluated on our head
with Ultralytics' assignment (the anchors its task-aligned assigner makes positive): ``lbox`` the mean ``1 - CIoU``
over positives, ``lobj`` the per-level mean BCE of an objectness (our head has none: the largest class logit, target
the IoU at positives and 0 elsewhere) weighted by YOLOv5's level balance (4.0, 1.0, 0.4), ``lcls`` the mean BCE over
positives x classes. The seeker term is the same in both. The gain that gives our recipe the official gradient share
is ``0.2 * |G_det(ours)| / |G_det(official)|`` (gradients are linear in the gains); the same with the losses for the
loss share.

``train``: so-det-esod-s from scratch on native-resolution crops of the sample images outside the benchmark frames
(``bench_highres.py``'s split and crops), densely (``esod_train:`` removed) or with the official patch training; the
same time budget for both (Ultralytics' ``time=`` hours)::

    python benchmarks/esod_recipe.py balance --batches 6
    python benchmarks/esod_recipe.py train --mode dense --hours 1.2 --out runs/dense    # runs/dense/best.pt
    python benchmarks/esod_recipe.py train --mode patch --hours 1.2 --out runs/patch
    python benchmarks/esod_recipe.py train --mode plain --model yolov8n-p2.yaml --epochs 10 --out runs/v8p2
    python benchmarks/esod_recipe.py recalibrate --weights runs/dense/best.pt --out runs/dense/best-bn.pt
    python benchmarks/esod_recipe.py evaluate --weights runs/dense/best-bn.pt runs/patch/best-bn.pt

``evaluate``: on the held-out frames (``bench_highres.py``'s), each at its own resolution, dense and sparse (learned
seeker, the official defaults: threshold 0.3, ``w/8 x h/8``-cell patches) one after the other per frame: mean ms per
frame, patches per frame, seeker recall (GT objects >= 4 px whose centre lies in a kept patch core) and detector
recall (IoU 0.5, conf >= ``--conf``). ``bench_highres.py bench`` measures the speed-ups in full.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = {"box": 0.05, "obj": 1.0 * 0.5, "cls": 0.5, "seek": 0.2}  # hyp.visdrone.yaml; lobj * obj * 0.5 (line 182)
BALANCE = (4.0, 1.0, 0.4)  # YOLOv5's per-level objectness balance (utils/loss.py), P2/P3/P4 here
FRAME_1080P = 1920 * 1080


def _bench_highres():
    spec = importlib.util.spec_from_file_location("bench_highres", REPO / "benchmarks" / "bench_highres.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_highres"] = mod
    spec.loader.exec_module(mod)
    return mod


def crops(a) -> Path:
    """data.yaml of the native-resolution training crops (made once per ``--out`` folder)."""
    bh = _bench_highres()
    held, rest = bh.split_frames(Path(a.sample))
    return bh.make_crops(rest, Path(a.sample), Path(a.data_dir), tile=a.tile, max_crops=a.max_crops)


def model_cfg(mode: str, gain: float, patch: int, frame_area: float) -> dict:
    import yaml

    from so_det_ultra import paths

    cfg = yaml.safe_load(paths.model_cfg("so-det-esod.yaml").read_text())
    cfg["loss"] = {**cfg["loss"], "gain": gain, "frame_area": frame_area}
    if mode == "dense":
        cfg.pop("esod_train", None)
    else:
        cfg["esod_train"] = {**cfg["esod_train"], "patch": patch}
    return cfg


# --- balance ----------------------------------------------------------------------------------------------------------


def load_batches(data: Path, n: int, bs: int):
    """``n`` batches of ``bs`` training crops as Ultralytics batches (no augmentation), in file order."""
    import cv2

    files = sorted((data.parent / "images" / "train").glob("*.jpg"))[: n * bs]
    for i in range(0, len(files) - bs + 1, bs):
        imgs, idx, cls, boxes, areas = [], [], [], [], []
        for j, f in enumerate(files[i : i + bs]):
            im = cv2.imread(str(f))[:, :, ::-1]
            imgs.append(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255)
            rows = np.loadtxt(data.parent / "labels" / "train" / f"{f.stem}.txt", ndmin=2)
            h, w = im.shape[:2]
            idx += [j] * len(rows)
            cls.append(rows[:, :1])
            boxes.append(rows[:, 1:5])
            areas.append(np.stack((rows[:, 3] * rows[:, 4] * w * h, np.full(len(rows), FRAME_1080P)), 1))
        cat = lambda v: torch.from_numpy(np.concatenate(v)).float()  # noqa: E731
        yield {"img": torch.stack(imgs), "batch_idx": torch.tensor(idx).float(), "cls": cat(cls),
               "bboxes": cat(boxes), "esod_area": cat(areas)}  # fmt: skip


def yolov5_terms(crit, preds, batch) -> dict:
    """YOLOv5's ungained ``lbox``, ``lobj``, ``lcls`` on our head's predictions (positives: Ultralytics' assigner)."""
    import torch.nn.functional as F
    from ultralytics.utils.metrics import bbox_iou

    (fg, gt_idx, tboxes, anchors, stride), _, _ = crit.get_assigned_targets_and_loss(preds, batch)
    scores = preds["scores"].permute(0, 2, 1)  # (b, A, nc) logits
    pboxes = crit.bbox_decode(anchors, preds["boxes"].permute(0, 2, 1)) * stride
    iou = bbox_iou(pboxes[fg], tboxes[fg], xywh=False, CIoU=True).squeeze(-1)
    lbox = (1 - iou).mean() if fg.any() else scores.sum() * 0
    tobj = torch.zeros(fg.shape, device=scores.device)
    tobj[fg] = iou.detach().clamp(0).to(tobj.dtype)
    obj = scores.max(-1).values
    sizes = [f.shape[2] * f.shape[3] for f in preds["feats"]]
    lobj = sum(
        F.binary_cross_entropy_with_logits(o, t) * b
        for o, t, b in zip(obj.split(sizes, 1), tobj.split(sizes, 1), BALANCE)
    )
    labels = torch.zeros_like(scores)
    cls = crit.preprocess(
        torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1),
        len(fg),
        torch.ones(4),
    )[..., 0]
    labels[fg, cls.gather(1, gt_idx)[fg].long()] = 1.0
    lcls = F.binary_cross_entropy_with_logits(scores[fg], labels[fg]) if fg.any() else scores.sum() * 0
    return {"box": lbox, "obj": lobj, "cls": lcls}


def term_grads(model, batch, k: int = 4):
    """Ungained loss terms and their gradients at the output of layer ``k``: ours (box, cls, dfl), YOLOv5's (box,
    obj, cls) and the seeker's, as {recipe: {term: (value, gradient)}}."""
    from so_det_ultra.nn.graph import run_layers

    crit = model.criterion
    y = []
    preds = run_layers(list(model.model), batch["img"], y)
    loss, _ = crit(preds, batch)
    bs = batch["img"].shape[0]
    gains = torch.tensor([crit.hyp.box, crit.hyp.cls, crit.hyp.dfl, crit.gain])
    terms = {
        "ours": dict(zip(("box", "cls", "dfl", "seek"), loss / bs / gains)),
        "official": yolov5_terms(crit, preds, batch),
    }
    terms["official"]["seek"] = terms["ours"]["seek"]
    out = {}
    for recipe, parts in terms.items():
        out[recipe] = {
            n: (float(v.detach()), torch.autograd.grad(v, y[k], retain_graph=True, allow_unused=True)[0])
            for n, v in parts.items()
        }
    return out


def combine(parts: dict, g: dict):
    """(detection loss, seeker loss, detection gradient, seeker gradient) with gains ``g``."""
    det = [n for n in parts if n != "seek"]
    gdet = sum(g[n] * parts[n][1] for n in det if parts[n][1] is not None)
    return sum(g[n] * parts[n][0] for n in det), g["seek"] * parts["seek"][0], gdet, g["seek"] * parts["seek"][1]


def balance(a):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    data = crops(a)
    if a.weights:
        from ultralytics import YOLO

        model = YOLO(a.weights).model.float().requires_grad_(True)
    else:
        model = DetectionModel(model_cfg("dense", 0.2, 2, FRAME_1080P), nc=10, verbose=False)
    model.args = get_cfg()
    model.train()
    model.criterion = model.init_criterion()
    model.criterion.gain = 1.0  # raw BCE; the gains are applied below
    model.criterion.cls_ratio = [1.83, 5.35, 13.82, 1.00, 5.80, 11.25, 30.11, 44.63, 24.45, 4.89]  # gen_mask's list
    ours = {"box": model.args.box, "cls": model.args.cls, "dfl": model.args.dfl, "seek": a.gain}
    sums = {name: np.zeros(4) for name in ("ours", "official")}
    for batch in load_batches(data, a.batches, a.batch):
        terms = term_grads(model, batch)
        for name, g in (("ours", ours), ("official", OFFICIAL)):
            det, seek, gdet, gseek = combine(terms[name], g)
            sums[name] += (det, seek, float(gdet.norm()), float(gseek.norm()))
        print({r: {n: round(v, 4) for n, (v, _) in t.items()} for r, t in terms.items()}, flush=True)
    report(sums, a.gain)


def report(sums, gain):
    print("\n| gains | detection loss | seeker loss | seeker share of loss | seeker share of gradient norm |")
    print("|---|---|---|---|---|")
    for name, (det, seek, gdet, gseek) in sums.items():
        print(f"| {name} | {det:.4f} | {seek:.4f} | {seek / (det + seek):.4f} | {gseek / (gdet + gseek):.4f} |")
    det, seek, gdet, gseek = sums["ours"]
    odet, oseek, ogdet, ogseek = sums["official"]
    g_grad = OFFICIAL["seek"] * gdet / ogdet  # seeker gradient / detection gradient equal to the official ratio
    g_loss = OFFICIAL["seek"] * det / odet
    print(f"\ngain matching the official gradient share: {g_grad:.2f}; matching the loss share: {g_loss:.2f}")
    print(f"(measured with gain {gain}: ours/official detection gradient norm {gdet / ogdet:.1f}x)")


# --- recalibrate ----------------------------------------------------------------------------------------------------


def recalibrate(a):
    """BatchNorm running statistics recomputed on the training crops with the model's own training forward (dense or
    patch), then saved: after a few CPU epochs the running averages (momentum 0.03) lag the weights so far that the
    eval-mode seeker outputs its prior everywhere (precise BN: Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
    2021)."""
    import cv2
    from ultralytics import YOLO

    from so_det_ultra.training.esod import patch_preds, train_config

    files = sorted((Path(a.data_dir) / "images" / "train").glob("*.jpg"))
    model = YOLO(a.weights).model.float()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momentum = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over all the batches
    cfg = train_config(model)
    model.train()
    with torch.no_grad():
        for i in range(0, len(files), a.batch):
            imgs = [cv2.imread(str(f))[:, :, ::-1] for f in files[i : i + a.batch]]
            x = torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255 for im in imgs])
            empty = {"img": x, "batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4)}
            model(x) if cfg is None else patch_preds(model, empty, cfg)
    for bn, mom in zip(bns, momentum):
        bn.momentum = mom
    ckpt = torch.load(a.weights, weights_only=False)
    for key in ("ema", "model"):
        if ckpt.get(key) is not None:
            ckpt[key] = model.eval().to(next(ckpt[key].parameters()).dtype)
    torch.save(ckpt, a.out)
    print(f"{a.weights}: BatchNorm statistics of {len(bns)} layers recomputed on {len(files)} crops -> {a.out}")


# --- evaluate -------------------------------------------------------------------------------------------------------


def evaluate(a):
    """Dense vs sparse (learned seeker, official defaults) on the held-out high-resolution frames, per checkpoint."""
    import time

    import cv2
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression

    from so_det_ultra.highres import common
    from so_det_ultra.highres.sparse import SparseModel, sparse_predict

    bh = _bench_highres()
    torch.set_num_threads(a.threads)
    held, _ = bh.split_frames(Path(a.sample))
    sizes = {p: cv2.imread(str(p)).shape[:2] for p in held}
    frames = [p for hw in bh.SIZES for p in [q for q in held if sizes[q] == hw][: a.frames]]
    images = [cv2.imread(str(p)) for p in frames]
    gts = [bh.ground_truth(p.stem, Path(a.sample), im.shape[1], im.shape[0])[0] for p, im in zip(frames, images)]
    print(f"{len(frames)} frames {sorted({im.shape[:2] for im in images})}; torch threads {a.threads}; conf {a.conf}")
    print(
        "| checkpoint | dense ms (network) | sparse ms (network) | x dense (network) | patches/frame | seeker recall "
        "| recall dense | recall sparse |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w in a.weights:
        model = common.load_model(YOLO(w), "cpu")
        sm = SparseModel(model)
        acc = {"dms": 0.0, "sms": 0.0, "dnet": 0.0, "snet": 0.0, "patches": [], "cov": [0, 0], "dense": [0, 0]}
        acc["sparse"] = [0, 0]
        for img, gt in zip(images, gts):
            t0 = time.perf_counter()
            x = common.letterbox(img, None, sm.stride)
            with torch.no_grad():
                tn = time.perf_counter()
                raw = model(x)[0]
                acc["dnet"] += (time.perf_counter() - tn) * 1000
                det = non_max_suppression(raw, a.conf, 0.7, max_det=a.max_det, max_time_img=60)[0]
            dense = common.to_results(det, img, "", model.names, tuple(x.shape[2:]))
            t1 = time.perf_counter()
            res = sparse_predict(sm, img, conf=a.conf, max_det=a.max_det)[0]
            t2 = time.perf_counter()
            acc["dms"], acc["sms"] = acc["dms"] + (t1 - t0) * 1000, acc["sms"] + (t2 - t1) * 1000
            acc["snet"] += res.speed["inference"]
            acc["patches"].append(len(res.patches))
            geo = bh.letterbox_geometry(*img.shape[:2], tuple(x.shape[2:]))
            for key, (f, t) in (
                ("cov", bh.coverage(res.patches, gt, *geo, sm.cell)),
                ("dense", bh.recall(dense.boxes.xyxy.numpy(), gt)),
                ("sparse", bh.recall(res.boxes.xyxy.numpy(), gt)),
            ):
                acc[key] = [acc[key][0] + f, acc[key][1] + t]
        pct = {k: 100 * acc[k][0] / max(acc[k][1], 1) for k in ("cov", "dense", "sparse")}
        n = len(images)
        print(
            f"| {w} | {acc['dms'] / n:.0f} ({acc['dnet'] / n:.0f}) | {acc['sms'] / n:.0f} ({acc['snet'] / n:.0f}) | "
            f"{acc['dms'] / acc['sms']:.2f}x ({acc['dnet'] / acc['snet']:.2f}x) | "
            f"{np.mean(acc['patches']):.1f} ({min(acc['patches'])}-{max(acc['patches'])}) | {pct['cov']:.1f} % | "
            f"{pct['dense']:.1f} % | {pct['sparse']:.1f} % ({pct['sparse'] - pct['dense']:+.1f}) |",
            flush=True,
        )


# --- train ------------------------------------------------------------------------------------------------------------


def train(a):
    import yaml
    from ultralytics import YOLO

    data = crops(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.mode == "plain":  # a detector without a seeker (so-det-s, yolov8n-p2): the same crops and budget
        cfg_path = a.model
    else:
        cfg_path = out / "so-det-esod-s.yaml"  # the scale letter is read from the file name
        cfg_path.write_text(yaml.safe_dump(model_cfg(a.mode, a.gain, a.patch, a.frame_area), sort_keys=False))
    YOLO(str(cfg_path)).train(
        data=str(data), epochs=a.epochs, time=a.hours, imgsz=a.tile, batch=a.batch, workers=a.workers, device="cpu",
        project=str(out.resolve()), name="train", exist_ok=True, plots=False, mosaic=0.5, close_mosaic=0, seed=0,
    )  # fmt: skip
    best = out / "train" / "weights" / "best.pt"
    if best.is_file():
        shutil.copy2(best, out / "best.pt")
        print(f"checkpoint: {out / 'best.pt'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("balance", "train", "evaluate", "recalibrate"):
        s = sub.add_parser(name)
        s.add_argument("--sample", default=str(REPO.parent / "shared" / "data" / "visdrone-sample"))
        s.add_argument("--data-dir", default="/tmp/esod_recipe/crops", help="where the crops are written")
        s.add_argument("--tile", type=int, default=256, help="crop size = training imgsz (native resolution)")
        s.add_argument("--max-crops", type=int, default=600)
        s.add_argument("--batch", type=int, default=16)
        s.add_argument("--gain", type=float, default=None, help="ESODLoss gain (default: the shipped YAML's)")
    b = sub.choices["balance"]
    b.add_argument("--batches", type=int, default=6)
    b.add_argument("--weights", help="a trained checkpoint instead of a fresh so-det-esod-s")
    t = sub.choices["train"]
    t.add_argument("--mode", choices=("dense", "patch", "plain"), required=True, help="plain: --model, no seeker")
    t.add_argument("--model", default="so-det-s.yaml", help="--mode plain: the model YAML to train")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--hours", type=float, default=None, help="time budget (overrides --epochs, Ultralytics time=)")
    t.add_argument("--patch", type=int, default=2, help="patches per side (256 px crops: 2 -> 128 px patches)")
    t.add_argument("--frame-area", type=float, default=FRAME_1080P, help="crops of ~1080p frames: 1080p areas")
    t.add_argument("--workers", type=int, default=1)
    r = sub.choices["recalibrate"]
    r.add_argument("--weights", required=True)
    r.add_argument("--out", required=True)
    e = sub.choices["evaluate"]
    e.add_argument("--weights", nargs="+", required=True, help="checkpoints (dense- and patch-trained)")
    e.add_argument("--frames", type=int, default=4, help="held-out frames per size (1920x1080, 2000x1500)")
    e.add_argument("--conf", type=float, default=0.01)
    e.add_argument("--max-det", type=int, default=5000)
    e.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.gain is None:
        import yaml

        from so_det_ultra import paths

        a.gain = float(yaml.safe_load(paths.model_cfg("so-det-esod.yaml").read_text())["loss"]["gain"])
    {"balance": balance, "train": train, "evaluate": evaluate, "recalibrate": recalibrate}[a.step](a)


if __name__ == "__main__":
    main()
