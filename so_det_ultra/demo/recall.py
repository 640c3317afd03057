"""The demo's operating point: the F1-optimal score threshold from validation, and recall by object size there.

The threshold is the one Ultralytics itself reports its P/R/F1 at: the argmax of the class-mean F1 curve over 1000
confidence values (``ultralytics/utils/metrics.py``, ``ap_per_class``: ``i = smooth(f1_curve.mean(0), 0.1).argmax()``;
here without the smoothing, so the value is one point of the curve). Recall by size counts ground-truth boxes matched
by a prediction of the same class at IoU >= 0.5 (greedy, highest score first, one prediction per box), in SODA-D's
size bins (Cheng et al., "Towards Large-Scale Small Object Detection: Survey and Benchmarks", TPAMI 2023, Sec. 3.2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from so_det_ultra.data.contract import SODA_D_BINS, size_bin

FALLBACK_CONF = 0.25  # Ultralytics' predict default, used when validation found nothing (F1 = 0 everywhere)


def f1_threshold(box_metrics) -> tuple[float, float]:
    """``(threshold, F1 there)`` from an Ultralytics ``Metric`` (``metrics.box``) with ``px`` and ``f1_curve``."""
    curve = np.asarray(box_metrics.f1_curve, dtype=float)
    if curve.size == 0 or not np.isfinite(curve).any() or curve.max() <= 0:
        return FALLBACK_CONF, 0.0
    f1 = curve.reshape(-1, curve.shape[-1]).mean(0)
    i = int(f1.argmax())
    return float(np.asarray(box_metrics.px)[i]), float(f1[i])


def _truth(label_file: Path, w: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[float(v) for v in line.split()] for line in label_file.read_text().splitlines() if line.strip()]
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
    xy, wh = t[:, 1:3] * torch.tensor([w, h]), t[:, 3:5] * torch.tensor([w, h])
    return t[:, 0], torch.cat([xy - wh / 2, xy + wh / 2], 1)


def match(gt_cls, gt_xyxy, cls, xyxy, conf, iou: float = 0.5) -> tuple[torch.Tensor, int]:
    """Matched mask over ground truth, and the number of predictions left unmatched (false positives)."""
    from torchvision.ops import box_iou

    hit = torch.zeros(len(gt_cls), dtype=torch.bool)
    if not len(gt_cls) or not len(cls):
        return hit, len(cls)
    ious = box_iou(xyxy, gt_xyxy) * (cls[:, None] == gt_cls[None, :])
    unmatched = 0
    for p in conf.argsort(descending=True).tolist():
        cand = ious[p].clone()
        cand[hit] = 0
        g = int(cand.argmax())
        if cand[g] >= iou:
            hit[g] = True
        else:
            unmatched += 1
    return hit, unmatched


def recall_by_size(results, labels_dir: Path, bins=SODA_D_BINS) -> dict:
    """``{bin: (found, total)}`` plus ``"all"`` and ``"extra boxes"`` (predictions matching no object) over Ultralytics
    ``Results`` of validation images whose YOLO labels are in ``labels_dir``."""
    found = {b[0]: [0, 0] for b in bins}
    found["all"], extra = [0, 0], 0
    for r in results:
        h, w = r.orig_shape
        label = labels_dir / f"{Path(r.path).stem}.txt"
        gt_cls, gt = _truth(label, w, h) if label.is_file() else (torch.zeros(0), torch.zeros((0, 4)))
        b = r.boxes
        hit, fp = match(gt_cls, gt, b.cls.cpu(), b.xyxy.cpu(), b.conf.cpu())
        extra += fp
        areas = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).tolist()
        for k, area in enumerate(areas):
            for key in (size_bin(area, bins), "all"):
                if key in found:
                    found[key][0] += int(hit[k])
                    found[key][1] += 1
    out = {k: tuple(v) for k, v in found.items() if v[1]}
    out["extra boxes"] = extra
    return out


def describe(recall: dict) -> str:
    """One line: ``recall eS 12/15 (0.80)  rS ...  all ...; N boxes matched no object``."""
    parts = [f"{k} {f}/{n} ({f / n:.2f})" for k, (f, n) in ((k, v) for k, v in recall.items() if k != "extra boxes")]
    return "recall " + "  ".join(parts) + f"; {recall.get('extra boxes', 0)} boxes matched no object"
