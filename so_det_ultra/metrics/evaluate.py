"""Scoring: AP, AP50, AP75 and AP per object-size bin of COCO result rows against a split's ground truth.

Owns: :class:`Result` and the entry points :func:`evaluate` (ground truth and rows in memory), :func:`evaluate_split`
(tile rows merged first) and :func:`evaluate_dataset` (a loaded data YAML). Matching and accumulation are
faster-coco-eval's ``COCOeval_faster`` (a C++ re-implementation of pycocotools' ``COCOeval`` with the same results);
this module applies the ignored-region rule and the per-image cap of the :class:`~.protocol.Protocol` and reads AP
out of ``COCOeval.eval["precision"]``. Interpretations (box areas, bin edges, cap order): docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from so_det_ultra.data import contract
from so_det_ultra.metrics.ignore import in_ignored
from so_det_ultra.metrics.predictions import group_predictions
from so_det_ultra.metrics.protocol import Protocol, protocol_from_data
from so_det_ultra.metrics.tiles import to_originals
from so_det_ultra.metrics.truth import EvalTruth, ImageTruth, load_eval_truth, split_images

FLAGGED = "so_det_ignore"  # marks a COCO ground-truth row flagged ignore (:func:`_honour_ignore_flags`)


@dataclass
class Result:
    """Output of :func:`evaluate`. ``metrics``: AP, AP50, AP75, AP_<bin> in [0, 1], or None for a bin (or class)
    without ground truth (COCO's -1). ``counts``: what was evaluated and what the ignore rule removed."""

    protocol: Protocol
    metrics: dict
    per_class: dict
    counts: dict

    def as_dict(self) -> dict:
        p = self.protocol
        return {
            **self.metrics,
            "per_class": self.per_class,
            "counts": self.counts,
            "protocol": {
                "eval": p.name,
                "max_det": p.max_det,
                "max_dets": p.coco_max_dets,
                "max_det_scope": p.max_det_scope,
                "reported_at_max_det": p.report_max_det,
                "bins": {b[0]: [b[1], b[2]] for b in p.bins},
                "all_range": list(p.all_range),
                "drop_ignored": p.drop_ignored,
                "ignore_fraction": p.ignore_fraction,
                "tiles": p.tiles,
                "merge_iou": p.merge_iou,
                "tile": p.tile,
                "overlap": p.overlap,
                "imgsz": p.imgsz,
            },
        }

    def table(self, per_class: bool = False) -> str:
        """Printable summary, laid out like Ultralytics' validation table."""
        c, p = self.counts, self.protocol
        scope = "per image and class" if p.max_det_scope == "category" else "per image"
        tiles = f" (from {c['tiles']} tiles, merged at IoU {p.merge_iou:g})" if c.get("tiles") else ""
        head = f"so-det {p.name} AP (COCO-style, maxDets={p.report_max_det} {scope}): {c['images']} images{tiles}, "
        head += f"{c['gt']} objects" + (
            f"; ignored regions removed {c['gt_ignored']} objects and {c['det_ignored']} detections"
            if p.drop_ignored
            else "; ignored regions not applied"
        )
        keys = list(self.metrics)
        fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        lines = [
            head,
            ("%22s" + "%11s" * len(keys)) % ("", *keys),
            ("%22s" + "%11s" * len(keys)) % ("all", *(fmt(self.metrics[k]) for k in keys)),
        ]
        if per_class:
            lines += [f"{name:>22}{fmt(ap):>11}" for name, ap in self.per_class.items()]
        return "\n".join(lines)


def evaluate(truth: list[ImageTruth], predictions, protocol: Protocol, names=None) -> Result:
    """Evaluate COCO-format ``predictions`` against ``truth`` under ``protocol``.

    Args:
        truth: One :class:`~.truth.ImageTruth` per image of the split (images without predictions count too).
        predictions: Rows ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"[, "file_name"]}`` as written by
            ``yolo val save_json=True`` (image_id = file stem, category_id = class index + 1).
        protocol: A :class:`~.protocol.Protocol` (see :data:`~.protocol.PROTOCOLS`,
            :func:`~.protocol.protocol_from_data`).
        names: Class names, dict ``{index: name}`` or list; defaults to the class indices found.

    Returns:
        A :class:`Result`.

    Example:
        >>> from pathlib import Path
        >>> from so_det_ultra.metrics.protocol import PROTOCOLS
        >>> t = [ImageTruth(Path("a.jpg"), 100, 100, np.array([[10.0, 10, 20, 20]]), np.array([0]))]
        >>> evaluate(t, [{"image_id": "a", "category_id": 1, "bbox": [10, 10, 10, 10], "score": 0.9}],
        ...          PROTOCOLS["visdrone"]).metrics["AP"]
        1.0
    """
    names = _class_names(truth, names)
    nc = len(names)
    preds = group_predictions(predictions, [t.file for t in truth], nc)
    counts = {"images": len(truth), "gt": 0, "gt_ignored": 0, "gt_flagged": 0, "det": 0, "det_ignored": 0}
    counts["det_over_max_det"] = 0
    images, gts, dts = [], [], []
    for i, (t, pred) in enumerate(zip(truth, preds)):
        images.append({"id": i, "width": t.width, "height": t.height, "file_name": t.file.name})
        gts += _gt_rows(i, t, protocol, counts, first_id=len(gts) + 1)
        gts += _flagged_rows(i, t, counts, first_id=len(gts) + 1)
        dts += _dt_rows(i, t, pred, protocol, counts, nc)
    counts["gt"], counts["det"] = len(gts) - counts["gt_flagged"], len(dts)
    areas = np.asarray([g["area"] for g in gts if not g.get(FLAGGED)])
    counts["gt_per_bin"] = {lbl: int(((areas >= lo) & (areas <= hi)).sum()) for lbl, lo, hi in protocol.bins}
    categories = [{"id": k + 1, "name": names[k]} for k in range(nc)]
    metrics, per_class = _cocoeval({"images": images, "annotations": gts, "categories": categories}, dts, protocol)
    return Result(protocol, metrics, dict(zip(names, per_class)), counts)


def _class_names(truth: list[ImageTruth], names) -> list:
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    nc = len(names) if names else int(max([t.cls.max() + 1 for t in truth if len(t.cls)] or [1]))
    if any(len(t.cls) and t.cls.max() >= nc for t in truth):
        raise ValueError(f"labels hold class indices >= nc={nc}")
    return list(names) if names else [str(i) for i in range(nc)]


def _gt_rows(i: int, t: ImageTruth, protocol: Protocol, counts: dict, first_id: int) -> list[dict]:
    """COCO annotations of image ``i``: its boxes outside the ignored regions (when the protocol drops them)."""
    keep = np.ones(len(t.boxes), bool)
    if protocol.drop_ignored and len(t.ignore):
        keep = ~in_ignored(t.boxes, t.ignore, protocol.ignore_fraction)
    counts["gt_ignored"] += int((~keep).sum())
    rows = []
    for b, c in zip(t.boxes[keep], t.cls[keep]):
        w, h = b[2] - b[0], b[3] - b[1]
        row = {"id": first_id + len(rows), "image_id": i, "category_id": int(c) + 1, "bbox": [b[0], b[1], w, h]}
        rows.append({**row, "area": w * h, "iscrowd": 0})
    return rows


def _dt_rows(i: int, t: ImageTruth, pred: tuple, protocol: Protocol, counts: dict, nc: int) -> list[dict]:
    """COCO detections of image ``i``: outside the ignored regions, best first, capped as the protocol says."""
    boxes, scores, cls = pred
    if protocol.drop_ignored and len(t.ignore):
        drop = in_ignored(boxes, t.ignore, protocol.ignore_fraction)
        counts["det_ignored"] += int(drop.sum())
        boxes, scores, cls = boxes[~drop], scores[~drop], cls[~drop]
    if protocol.max_det_scope == "image":  # ours: the best max_det of the image over all classes
        order = np.argsort(-scores, kind="stable")[: protocol.max_det]
        counts["det_over_max_det"] += len(scores) - len(order)
    else:  # COCOeval keeps the best maxDets[-1] of each image and class itself
        order = np.argsort(-scores, kind="stable")
        per_cls = np.bincount(cls, minlength=nc) if len(cls) else np.zeros(nc, int)
        counts["det_over_max_det"] += int(np.clip(per_cls - protocol.coco_max_dets[-1], 0, None).sum())
    return [
        {"image_id": i, "category_id": int(c) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
        for b, s, c in zip(boxes[order], scores[order], cls[order])
    ]


def _flagged_rows(i: int, t: ImageTruth, counts: dict, first_id: int) -> list[dict]:
    """COCO annotations of image ``i``'s ground truth flagged ``ignore`` (``t.ignored_boxes``), marked ``FLAGGED``."""
    counts["gt_flagged"] += len(t.ignored_boxes)
    rows = []
    for b, c in zip(t.ignored_boxes, t.ignored_cls):
        w, h = b[2] - b[0], b[3] - b[1]
        row = {"id": first_id + len(rows), "image_id": i, "category_id": int(c) + 1, "bbox": [b[0], b[1], w, h]}
        rows.append({**row, "area": w * h, "iscrowd": 0, FLAGGED: 1})
    return rows


def _honour_ignore_flags(ev) -> None:
    """Score ground truth marked ``FLAGGED`` as COCO's ignored ground truth, with plain IoU and one match each.

    SODA-D's evaluator keeps a dataset's ``gt['ignore']`` (github shaunyuan22/SODA-mmdetection,
    ``mmdet/datasets/sodad_eval/sodadeval.py`` line 115; ``_ignore`` at line 267; every ground truth non-crowd at line
    277); pycocotools and faster_coco_eval overwrite it with ``iscrowd`` in ``_prepare``. The flag is set again after
    ``_prepare`` (faster_coco_eval reads the annotation dicts when it evaluates; a test checks the effect).
    """
    prepare = ev._prepare

    def _prepare():
        prepare()
        for g in ev.cocoGt.anns.values():
            g["ignore"] = int(g.get(FLAGGED, 0))

    ev._prepare = _prepare


def _cocoeval(gt: dict, dts: list, protocol: Protocol) -> tuple[dict, list]:
    """``COCOeval_faster`` on the COCO dicts: the protocol's metrics and AP per category (in category order)."""
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = lambda *a, **k: None  # noqa: E731
    gt_api = COCO(gt)
    gt_api.print_function = quiet
    ev = COCOeval_faster(gt_api, gt_api.loadRes(dts), iouType="bbox", print_function=quiet)
    if any(g.get(FLAGGED) for g in gt["annotations"]):
        _honour_ignore_flags(ev)
    p = ev.params
    p.imgIds, p.catIds = list(range(len(gt["images"]))), [c["id"] for c in gt["categories"]]
    p.areaRng = [list(protocol.all_range), *([lo, hi] for _, lo, hi in protocol.bins)]
    p.areaRngLbl = ["all", *(b[0] for b in protocol.bins)]
    p.maxDets = protocol.coco_max_dets  # per image and class inside COCOeval (pycocotools' evaluateImg)
    ev.evaluate()
    ev.accumulate()
    precision = np.asarray(ev.eval["precision"])  # (iou thresholds, recall points, classes, area ranges, maxDets)
    iou, m = np.asarray(p.iouThrs), list(p.maxDets).index(protocol.report_max_det)

    def ap(area: int, t=slice(None), k=slice(None)):
        x = precision[t, :, k, area, m]
        x = x[x > -1]
        return float(x.mean()) if x.size else None

    t50, t75 = int(np.argmin(abs(iou - 0.5))), int(np.argmin(abs(iou - 0.75)))
    metrics = {"AP": ap(0), "AP50": ap(0, t50), "AP75": ap(0, t75)}
    metrics.update({f"AP_{lbl}": ap(a + 1) for a, (lbl, _, _) in enumerate(protocol.bins)})
    return metrics, [ap(0, k=k) for k in range(len(gt["categories"]))]


def evaluate_split(truth: EvalTruth, predictions, protocol: Protocol, names=None) -> Result:
    """:func:`evaluate` on ``truth.images`` after tile rows are moved and merged (:func:`.tiles.to_originals`).

    The result's ``counts`` add ``tiles``, ``det_tiles`` and ``det_merged``.
    """
    rows, counts = to_originals(predictions, truth, protocol.merge_iou)
    result = evaluate(truth.images, rows, protocol, names)
    result.counts.update(counts)
    return result


def evaluate_dataset(
    data: dict, split: str, predictions, protocol: Protocol | None = None, image_files=None, single_cls: bool = False
) -> Result:
    """Evaluate ``predictions`` on ``data[split]`` of a loaded data dict (``check_det_dataset`` output).

    The ground truth is the split's YOLO labels, image sizes and sidecars (``<path>/<so_det.sidecars>/<split>/``).
    With ``protocol.tiles``, tile images are replaced by their original images and predictions on tiles are moved
    there and merged (:mod:`.tiles`).
    """
    protocol = protocol or protocol_from_data(data)
    if protocol is None:
        raise ValueError(
            f"the data YAML has no '{contract.SO_DET_KEY}:' key, so no evaluation protocol; add "
            f"{contract.so_det_hint()} (see docs/metrics.md)"
        )
    files = split_images(data, split) if image_files is None else image_files
    names = ["object"] if single_cls else data.get("names")
    truth = load_eval_truth(files, data.get("path", "."), contract.sidecar_folder(data), single_cls, protocol.tiles)
    return evaluate_split(truth, predictions, protocol, names)
