"""Fit ESOD's object seeker onto a trained, frozen detector, and choose its heatmap threshold from held-out recall.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3 (the
object seeker on backbone P3, its Gaussian heatmap target, the AdaSlicer); official code github alibaba/esod. The
paper trains the seeker jointly with the detector. Fitting it alone on a detector trained without one is ours (an
interpretation: the seeker is 22k parameters on stride-8 features the detector computes anyway, so it can be learnt
after the fact). Recipe and measurements: docs/highres.md, "Sparse inference for a model you already trained";
the command is ``so-det fit-seeker``.

What :func:`fit_seeker` does with a checkpoint:

1. a model with an :class:`~so_det_ultra.nn.esod.ObjectSeeker` keeps it (re-fitted); any other Ultralytics detection
   model gets one inserted after its stride-8 backbone output (:func:`.seeker_model.add_seeker`); the head and every
   other layer are untouched, so dense predictions stay bit-identical;
2. every other parameter and every BatchNorm statistic is frozen (the whole model stays in eval mode); the seeker's
   own BatchNorm statistics are measured once on the training features and then held too, so the seeker computes the
   same function in training and at inference;
3. the seeker learns ESOD's heatmap loss (:func:`~so_det_ultra.losses.esod.heatmap_bce` on
   :func:`~so_det_ultra.losses.esod.heatmap_target`, official per-cell weights, ignored regions neither positive
   nor negative) on native-resolution full frames: each frame as it is and ``variants - 1`` flipped and
   scale-jittered copies, whose stride-8 features are computed once (:class:`~.seeker_data.FeatureCache`);
4. the threshold is chosen on the held-out frames (:func:`.seeker_threshold.choose_threshold`) and stored as
   ``ObjectSeeker.thr``, which sparse inference uses when no threshold is given;
5. the checkpoint is the input's dict with the fitted model, Ultralytics' date and version stamps, this package's
   version in the model YAML, and a ``fit_seeker`` record of the settings and results.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from so_det_ultra._version import __version__
from so_det_ultra.losses.esod import WEIGHTS, class_ratio, heatmap_bce
from so_det_ultra.nn.esod import SEEKER_STRIDE, ObjectSeeker
from so_det_ultra.nn.graph import model_stride, sources
from so_det_ultra.nn.slicer import THRESHOLD
from so_det_ultra.training.seeker_data import (
    FeatureCache,
    frame_geometry,
    frame_input,
    frame_target,
    input_size,
    load_frames,
)
from so_det_ultra.training.seeker_model import (
    add_seeker,
    calibrate_bn,
    freeze_all_but_seeker,
    load_checkpoint,
    round_like_checkpoint,
    seeker_logits,
    write_checkpoint,
)
from so_det_ultra.training.seeker_threshold import choose_threshold, object_centres, recall_at

RECALL_OF = ("objects", "detections")  # what the held-out recall counts (fit_seeker recall_of)


# --- fitting --------------------------------------------------------------------------------------------------------


def fit_seeker(
    model,
    data,
    out=None,
    *,
    epochs: int = 12,
    variants: int = 2,
    scale: float = 0.25,
    imgsz: int | None = None,
    layer: int | None = None,
    cache: str = "ram",
    device: str | None = None,
    recall: float = 0.98,
    recall_of: str = "objects",
    det_conf: float = 0.25,
    thr: float | None = None,
    holdout: float = 0.1,
    split: str = "train",
    fraction: float = 1.0,
    lr: float = 0.003,
    weights: str = "official",
    frame_area: float | None = None,
    min_size: float = 4.0,
    patch: int | None = None,
    prune: bool = True,
    seed: int = 0,
    force: bool = False,
    unsafe_load: bool = False,
    verbose: bool = True,
) -> Path:
    """Fit an ESOD seeker onto the frozen detector of checkpoint ``model`` and write ``out`` (see the module docs).

    Args:
        model (str | Path): Ultralytics detection checkpoint (``.pt``): yolov8/yolo11/yolo26, so-det, so-det26 (a
            seeker is inserted) or so-det-esod (its seeker is re-fitted).
        data (str | Path): Data YAML (``so-det convert`` output or any ``yolo train`` data); sidecar ignored
            regions are honoured when it has a ``so_det:`` key.
        out (str | Path, optional): Checkpoint to write; default ``<model stem>-seeker.pt`` beside ``model``.
        epochs (int): Passes over the training frames.
        variants (int): Feature copies per training frame: the frame itself, then flipped and scale-jittered ones.
        scale (float): Scale jitter: copies are resized by a factor in ``[1 - scale, 1 + scale]``.
        imgsz (int, optional): Long side the frames are letterboxed to (as ``sparse_predict(imgsz=...)``); None
            keeps each frame's own resolution.
        layer (int, optional): Layer the inserted seeker reads; None: the last stride-8 backbone layer.
        cache (str): ``ram`` (features computed once, kept as fp16), a folder (computed once, saved there, reused by
            later fits of the same model) or ``none`` (recomputed at every use).
        device (str, optional): Torch device; None: ``cuda:0`` when available, else the CPU.
        recall (float): Held-out seeker recall the chosen threshold keeps.
        recall_of (str): What that recall counts: ``objects`` (the ground-truth objects, the default) or
            ``detections`` (the ground-truth objects the dense model finds, at ``det_conf`` and IoU 0.5: the objects
            sparse inference can lose; one dense pass per held-out frame).
        det_conf (float): Confidence of the dense detections for ``recall_of="detections"``.
        thr (float, optional): Store this threshold instead of choosing one.
        holdout (float): Share of the frames (every ``1 / holdout``-th) held out for recall and the threshold.
        split (str): Split of ``data`` to fit on.
        fraction (float): Share of the split to use (Ultralytics' ``fraction``).
        lr (float): AdamW learning rate (cosine decay to 5 % of it).
        weights (str): ``official`` (ESOD's per-cell weights) or ``none`` (plain BCE).
        frame_area (float, optional): Original-frame area (px) for the official weights; None: each image's own.
        min_size (float): Objects smaller than this (px, either side) do not count towards recall.
        patch (int, optional): Patch side in cells for recall, as sparse inference; None: ESOD's ``w/8 x h/8``.
        prune (bool): Patch pruning as sparse inference (default on).
        seed (int): Seed of the augmentation and the training order.
        force (bool): Replace an existing ``out``.
        unsafe_load (bool): Read ``model`` with full pickle loading (it can run code stored in the file; only for
            files you trust); by default it is read weights-only and a file naming other code is refused.
        verbose (bool): Progress bars and the summary.

    Returns:
        (Path): The checkpoint written.
    """
    from ultralytics.utils import LOGGER

    t_start = time.perf_counter()
    _check(weights, cache, recall, recall_of, holdout, variants, epochs)
    out = Path(out) if out else Path(model).with_name(f"{Path(model).stem}-seeker.pt")
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out} exists; pass force=True (so-det fit-seeker --force) to replace it")
    device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    say = LOGGER.info if verbose else (lambda *_: None)

    ckpt, net = load_checkpoint(model, unsafe_load)
    net = net.to(device)
    had = any(isinstance(m, ObjectSeeker) for m in net.model)
    k = add_seeker(net, layer)
    seeker = freeze_all_but_seeker(net, k)
    src, stride = sources(seeker)[0], model_stride(net)
    frames, cfg = load_frames(data, split, fraction)
    every = max(2, round(1 / holdout))
    held = [f for n, f in enumerate(frames) if n % every == every - 1]
    train = [f for n, f in enumerate(frames) if n % every != every - 1]
    if not train or not held:
        raise ValueError(f"{len(frames)} frames in {data} ({split}): too few to hold out every {every}th")
    say(
        f"fit-seeker: {'re-fitting the ObjectSeeker' if had else 'ObjectSeeker inserted'} at layer {k} (reads layer "
        f"{src}, stride {SEEKER_STRIDE}); {len(train)} training frames x {variants} variants, {len(held)} held out; "
        f"features: {cache}"
    )

    feats = FeatureCache(net.model, src, stride, cache, device)
    plan = _augmentations(train, variants, scale, imgsz, stride, rng)
    cls_ratio = _cls_ratio(net, frames, cfg.get("names"))
    targets = {
        (i, s, fl): _target(f, s, fl, stride, weights, cls_ratio, frame_area) for i, f, vs in plan for s, fl in vs
    }
    held_keys = [(len(train) + n, f, input_size(f.hw, imgsz, stride), False) for n, f in enumerate(held)]
    held_centres = [_centres(f, s, stride, min_size) for _, f, s, _ in held_keys]
    t0 = time.perf_counter()
    if cache != "none":
        _fill(feats, [(i, f, s, fl) for i, f, vs in plan for s, fl in vs] + held_keys, verbose)
    t_cache = time.perf_counter() - t0
    calibrate_bn(seeker, (feats.get(i, f, *vs[0]) for i, f, vs in plan))
    slicer = {"patch": patch, "align": max(stride // SEEKER_STRIDE, 1), "prune": prune}
    monitor = THRESHOLD if thr is None else thr
    t0 = time.perf_counter()
    history = train_seeker(
        seeker, feats, plan, targets, (held_keys, held_centres), epochs, lr, rng, slicer, monitor, verbose
    )
    t_train = time.perf_counter() - t0

    round_like_checkpoint(seeker, ckpt)  # the threshold is chosen for the weights as they will be stored
    if recall_of == "detections":
        held_centres = [_detected_centres(net, f, s, stride, min_size, det_conf) for _, f, s, _ in held_keys]
    held_frames = list(zip(heldout_heatmaps(seeker, feats, held_keys), held_centres))
    if thr is None and not sum(len(c) for c in held_centres):
        LOGGER.warning(f"fit-seeker: no held-out {recall_of} to choose a threshold from; storing ESOD's {THRESHOLD}")
        thr = THRESHOLD
    thr, scan = choose_threshold(held_frames, recall, **slicer) if thr is None else (thr, [])
    rec, npatch = recall_at(held_frames, thr, **slicer)
    seeker.thr = float(thr)
    settings = dict(epochs=epochs, variants=variants, scale=scale, imgsz=imgsz, cache=str(cache), lr=lr)
    settings.update(weights=weights, frame_area=frame_area, min_size=min_size, patch=patch, prune=prune)
    settings.update(holdout=holdout, recall_of=recall_of, det_conf=det_conf, seed=seed)
    info = {
        "source": str(model),
        "data": str(data),
        "split": split,
        "seeker_layer": k,
        "reads_layer": src,
        "inserted": not had,
        "thr": float(thr),
        "recall_target": recall,
        "heldout_recall": rec,
        "heldout_objects": sum(len(c) for c in held_centres),
        "heldout_patches": npatch,
        "heldout_frames": len(held),
        "train_frames": len(train),
        "threshold_scan": scan,
        "history": history,
        "settings": settings,
        "seconds": {"features": t_cache, "training": t_train, "total": time.perf_counter() - t_start},
        "so_det_ultra": __version__,
    }
    write_checkpoint(ckpt, net, out, info, replace=force)
    say(
        f"fit-seeker: threshold {thr:g} keeps {100 * rec:.1f} % of {info['heldout_objects']} held-out "
        f"{'objects' if recall_of == 'objects' else 'detected objects'} in {npatch:.1f} patches per frame (target "
        f"{100 * recall:g} %); {info['seconds']['total']:.0f} s (features {t_cache:.0f} s, "
        f"{feats.nbytes() / 2**30:.2f} GiB in memory; training {t_train:.0f} s)"
    )
    return out


def _check(weights, cache, recall, recall_of, holdout, variants, epochs) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if not isinstance(cache, (str, Path)):
        raise ValueError(f"cache must be 'ram', 'none' or a folder, got {cache!r}")
    if recall_of not in RECALL_OF:
        raise ValueError(f"recall_of must be one of {RECALL_OF}, got {recall_of!r}")
    if not 0 < recall <= 1 or not 0 < holdout < 1 or variants < 1 or epochs < 0:
        raise ValueError("need 0 < recall <= 1, 0 < holdout < 1, variants >= 1 and epochs >= 0")


def train_seeker(seeker, feats, plan, targets, held, epochs, lr, rng, slicer, monitor, verbose=True) -> list:
    """Train ``seeker`` on the cached features: per epoch every training frame once, in a random order, as one of its
    variants at random; AdamW with a cosine decay to 5 % of ``lr``; after each epoch the held-out recall and patches
    per frame at threshold ``monitor`` (``held``: (keys, centres)). Returns one record per epoch."""
    from ultralytics.utils import TQDM

    device = next(seeker.parameters()).device
    opt = torch.optim.AdamW([p for p in seeker.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    steps = max(epochs * len(plan), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * n / steps)))
    history = []
    for epoch in range(epochs):
        order = list(range(len(plan)))
        rng.shuffle(order)
        bar = TQDM(total=len(order), desc=f"fit-seeker {epoch + 1}/{epochs}", disable=not verbose)
        total = 0.0
        for n, i in enumerate(order, 1):
            _, frame, vs = plan[i]
            s, fl = rng.choice(vs)
            logits = seeker_logits(seeker, feats.get(i, frame, s, fl))
            loss = heatmap_bce(logits, *(t.to(device) for t in targets[i, s, fl]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.set_description(f"fit-seeker {epoch + 1}/{epochs} heatmap loss {total / n:.4f}")
            bar.update()
        rec, npatch = recall_at(list(zip(heldout_heatmaps(seeker, feats, held[0]), held[1])), monitor, **slicer)
        history.append({"epoch": epoch + 1, "loss": total / max(len(order), 1), "recall": rec, "patches": npatch})
        bar.set_description(
            f"fit-seeker {epoch + 1}/{epochs} heatmap loss {history[-1]['loss']:.4f} held-out recall "
            f"{100 * rec:.1f} % ({npatch:.1f} patches/frame at thr {monitor:g})"
        )
        bar.close()
    return history


def _fill(feats: FeatureCache, keys, verbose: bool) -> None:
    """Compute (and keep) the features of every ``(index, frame, size, flip)`` key once, with a progress bar."""
    from ultralytics.utils import TQDM

    for i, f, s, fl in TQDM(keys, desc="fit-seeker: stride-8 features", disable=not verbose):
        feats.get(i, f, s, fl)


def _target(frame, size, flip, stride, weights, cls_ratio, frame_area):
    boxes, ignore, hw = frame_geometry(frame, size, stride, flip)
    shape = (hw[0] // SEEKER_STRIDE, hw[1] // SEEKER_STRIDE)
    return frame_target(boxes, ignore, frame, shape, SEEKER_STRIDE, weights, cls_ratio, frame_area)


@torch.no_grad()
def _detected_centres(net, frame, size: int, stride: int, min_size: float, conf: float) -> np.ndarray:
    """Centres (cells) of ``frame``'s objects (>= ``min_size`` px) that the dense ``net`` finds: a detection at
    confidence >= ``conf`` with IoU >= 0.5 (Ultralytics' NMS at IoU 0.7, at most 1000 per frame)."""
    import cv2
    from torchvision.ops import box_iou
    from ultralytics.utils.nms import non_max_suppression

    x = frame_input(cv2.imread(frame.path), size, stride).to(next(net.parameters()).device)
    det = non_max_suppression(net(x)[0], conf, 0.7, max_det=1000)[0]
    boxes = frame_geometry(frame, size, stride)[0]
    wh = frame.boxes[:, 2:] - frame.boxes[:, :2]
    found = np.zeros(len(boxes), bool)
    if len(det) and len(boxes):
        found = (box_iou(torch.as_tensor(boxes, dtype=torch.float32), det[:, :4].cpu()).max(1).values >= 0.5).numpy()
    return object_centres(boxes, SEEKER_STRIDE, (wh >= min_size).all(1) & found)


def _augmentations(train, variants: int, scale: float, imgsz, stride: int, rng) -> list:
    """Per training frame ``(index, frame, [(input long side, flipped), ...])``: the frame as sparse inference sees
    it, then ``variants - 1`` copies, flipped every other one, each resized by a random factor in ``1 +- scale``."""
    plan = []
    for i, f in enumerate(train):
        vs = [(input_size(f.hw, imgsz, stride), False)]
        for v in range(1, variants):
            vs.append((input_size(f.hw, imgsz, stride, rng.uniform(1 - scale, 1 + scale)), v % 2 == 1))
        plan.append((i, f, vs))
    return plan


def _centres(frame, size: int, stride: int, min_size: float) -> np.ndarray:
    """Heatmap-cell centres of ``frame``'s objects of at least ``min_size`` px (either side) at long side ``size``."""
    wh = frame.boxes[:, 2:] - frame.boxes[:, :2]
    return object_centres(frame_geometry(frame, size, stride)[0], SEEKER_STRIDE, (wh >= min_size).all(1))


@torch.no_grad()
def heldout_heatmaps(seeker: ObjectSeeker, feats: FeatureCache, keys) -> list:
    """The seeker's heatmaps (H, W) in [0, 1] on the CPU for the held-out ``keys`` ((index, frame, size, flip))."""
    return [seeker(feats.get(i, f, s, fl))[0, 0].sigmoid().float().cpu() for i, f, s, fl in keys]


def _cls_ratio(model, frames, names) -> list:
    """The model YAML's ``loss: cls_ratio`` when it gives one per class of the data, else ``max count / count`` over
    ``frames``' labels (ESODLoss's rule at train start, :func:`~so_det_ultra.losses.esod.class_ratio`)."""
    nc = max(len(names or {}), int(max((f.cls.max(initial=-1) for f in frames), default=-1)) + 1)
    given = ((getattr(model, "yaml", None) or {}).get("loss") or {}).get("cls_ratio")
    if given is not None and len(given) == nc:
        return list(given)
    counts = np.bincount(np.concatenate([f.cls for f in frames] or [np.zeros(0, int)]), minlength=nc)
    return class_ratio(counts.tolist())
