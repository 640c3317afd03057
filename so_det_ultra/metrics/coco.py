"""Small-object COCO-style evaluation: AP, AP50, AP75 and AP per object-size bin, with ignored regions.

Matching and accumulation are faster-coco-eval's ``COCOeval_faster`` (a C++ re-implementation of pycocotools'
``COCOeval`` with the same results; Ultralytics uses it for its own ``save_json`` evaluation). This module only
builds the COCO ground truth and detections from a YOLO dataset, its sidecars and a ``predictions.json``, applies the
ignored-region rule and the per-image detection cap, and reads AP values out of ``COCOeval.eval["precision"]``.

Protocols (docs/metrics.md; the bins are :data:`~so_det_ultra.data.contract.COCO_BINS` and
:data:`~so_det_ultra.data.contract.SODA_D_BINS` of the data contract):

- ``visdrone`` -- VisDrone2019-DET (Zhu et al., "Detection and Tracking Meet Drones Challenge", TPAMI 2021). Bins are
  COCO's (Lin et al., ECCV 2014 / cocodataset.org detection eval): small area <= 32^2, medium 32^2-96^2, large
  > 96^2. Up to 500 detections per image: the VisDrone2018-DET-toolkit (``utils/calcAccuracy.m``) keeps the first
  ``maxDets`` detections of each image over all classes. Ignored regions are applied as in the toolkit's
  ``utils/dropObjectsInIgr.m`` (see :mod:`.ignore`).
- ``soda-d`` -- SODA-D (Cheng et al., TPAMI 2023; github.com/shaunyuan22/SODA-mmdetection): the official protocol.
  Bins eS 0-12^2, rS 12^2-20^2, gS 20^2-32^2, N(ormal) 32^2-40*50, AP/AP50/AP75 over the ``Small`` range 0-32^2
  (``mmdet/datasets/sodad_eval/sodadeval.py``, ``SODADParams``); maxDets 100/300/1000 per image *and class*
  (COCOeval's own caps), values at 100 (``SODADeval.summarize``); ignore boxes removed from the ground truth and no
  filtering of detections (``val_wo_ignore.json``); detections on tiles moved to the original image and merged with
  class-wise NMS at IoU 0.5 (``mmdet/datasets/sodad.py``, ``merge_dets``; :mod:`.tiles`). Rule by rule, with the
  official lines: docs/metrics.md.
- ``soda-d-fullframe`` -- the SODA-D bins with the VisDrone-style cap and ignore rule, on full frames (this
  package's protocol before the official one became the default).

Interpretation (docs/metrics.md):

- Area of a ground-truth box = w * h of its pixel box (COCO uses the annotation's ``area`` field; for box-only
  datasets it is w * h). Bin edges are inclusive on both ends, as in COCOeval.
- ``max_det_scope="image"`` (VisDrone, ``soda-d-fullframe``): the highest-scoring ``max_det`` detections of each image
  over all classes are kept (Ultralytics' ``max_det``, the VisDrone toolkit), after dropping the ones in ignored
  regions (the toolkit's order); COCOeval then runs with ``maxDets=[max_det]``, so AP is reported at that cap.
- Ignored regions (``drop_ignored``): detections and ground-truth boxes with >= 50 % of their area inside ignored
  regions are removed before matching (the VisDrone toolkit's rule, :mod:`.ignore`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from so_det_ultra.data import contract
from so_det_ultra.data.contract import BIG, COCO_BINS, SODA_D_BINS, SODA_D_SMALL
from so_det_ultra.metrics.ignore import DROP_FRACTION, in_ignored

SCOPES = ("image", "category")  # max_det_scope: a cap per image over all classes, or COCOeval's per image and class


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: size bins, the area range of the headline AP, detection caps, ignore rule, tiles.

    Attributes:
        name: Protocol name as written in the data YAML's ``so_det.eval``.
        bins: ``(label, min_area, max_area)`` per size bin, pixel^2; reported as ``AP_<label>``.
        all_range: Area range of AP/AP50/AP75.
        max_det: Ultralytics' ``max_det`` (detections per network image: a frame, or a tile) set by the validation
            hook; with ``max_det_scope="image"`` also the cap per evaluated image over all classes and COCOeval's
            only maxDets.
        max_dets: COCOeval's maxDets with ``max_det_scope="category"`` (each a cap per image *and* class, as
            pycocotools applies them); the AP values are reported at the first. Empty: ``(max_det,)``.
        max_det_scope: ``"image"`` (keep the ``max_det`` best detections of each image over all classes, then
            COCOeval at that cap) or ``"category"`` (no cap of ours; COCOeval's per image and class caps).
        drop_ignored: Remove detections and ground truth lying mostly inside ignored regions.
        ignore_fraction: "Mostly": the covered fraction at which a box is removed.
        tiles: Detections on tile images are moved to their original image (tile sidecar ``tile``) and merged there
            with class-wise NMS at ``merge_iou``; the original images are evaluated.
        merge_iou: IoU of the class-wise NMS merging tile detections.
        tile: Tile side in pixels the converter cuts (recorded; the evaluation reads each tile's offset).
        overlap: Tile overlap in pixels the converter cuts (recorded).
        imgsz: Network input side per tile the protocol prescribes (``yolo val`` warns on another one); None: any.
        per_class: Draw the per-class AP panel in the plot.
    """

    name: str
    bins: tuple
    all_range: tuple = (0.0, BIG)
    max_det: int = 100
    max_dets: tuple = ()
    max_det_scope: str = "image"
    drop_ignored: bool = True
    ignore_fraction: float = DROP_FRACTION
    tiles: bool = False
    merge_iou: float = 0.5
    tile: int | None = None
    overlap: int | None = None
    imgsz: int | None = None
    per_class: bool = False

    @property
    def keys(self) -> list[str]:
        """Metric names in report order: AP, AP50, AP75, AP_<bin>..."""
        return ["AP", "AP50", "AP75", *(f"AP_{b[0]}" for b in self.bins)]

    @property
    def coco_max_dets(self) -> list[int]:
        """COCOeval's ``params.maxDets`` (sorted, as COCOeval sorts them)."""
        if self.max_det_scope == "category" and self.max_dets:
            return sorted(self.max_dets)
        return [self.max_det]

    @property
    def report_max_det(self) -> int:
        """The maxDets the AP values are read at: the first of COCOeval's (SODA-D: 100), or ``max_det``."""
        return self.coco_max_dets[0]


# SODA-D (github.com/shaunyuan22/SODA-mmdetection): maxDets [100, 300, 1000] (mmdet/datasets/sodad.py, evaluate(),
# proposal_nums; sodad_eval/sodadeval.py, SODADParams.setDetParams), AP at maxDets[0] (SODADeval.summarize), no
# ignore filtering (val_wo_ignore.json), tiles 800/150 (tools/img_split), resize 1200
# (configs/_base_/datasets/sodad.py), merge NMS IoU 0.5 (SODADDataset.evaluate -> merge_dets). max_det=1000 is the
# per-tile cap handed to Ultralytics.
SODA_D = Protocol(
    "soda-d",
    SODA_D_BINS,
    all_range=SODA_D_SMALL,
    max_det=1000,
    max_dets=(100, 300, 1000),
    max_det_scope="category",
    drop_ignored=False,
    tiles=True,
    merge_iou=0.5,
    tile=800,
    overlap=150,
    imgsz=1200,
)
PROTOCOLS = {
    "visdrone": Protocol("visdrone", COCO_BINS, max_det=500, per_class=True),
    "soda-d": SODA_D,
    # so-det-ultra's earlier SODA-D protocol: full frames, 1000 detections per image over all classes, AP at 1000,
    # the VisDrone ignore rule for detections and ground truth.
    "soda-d-fullframe": replace(
        SODA_D, name="soda-d-fullframe", max_dets=(), max_det_scope="image", drop_ignored=True, tiles=False, imgsz=None
    ),
}
OPTIONS = (
    "eval",
    "sidecars",
    "max_det",
    "max_dets",
    "max_det_scope",
    "ignore",
    "tiles",
    "merge_iou",
    "tile",
    "overlap",
    "imgsz",
)  # the keys of so_det: (docs/metrics.md)


def protocol_from_data(data: dict) -> Protocol | None:
    """The protocol a data dict (a loaded data YAML) asks for with its ``so_det:`` key, or None without the key.

    ``so_det: {eval: visdrone | soda-d | soda-d-fullframe, sidecars: <folder under path>}`` plus optional overrides of
    the protocol's defaults: ``max_det`` (int), ``max_dets`` (list of int), ``max_det_scope`` (``image`` |
    ``category``), ``ignore`` (bool: the ignored-region filter), ``tiles`` (bool), ``merge_iou`` (0..1), ``tile``,
    ``overlap``, ``imgsz`` (int). Unknown keys are an error.
    """
    cfg = data.get(contract.SO_DET_KEY) if isinstance(data, dict) else None
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(
            f"data YAML key '{contract.SO_DET_KEY}' must be a mapping like {contract.so_det_hint()}, got {cfg!r}"
        )
    name = str(cfg.get("eval", "")).lower()
    if name not in PROTOCOLS:
        raise ValueError(f"so_det.eval={cfg.get('eval')!r} is not a known protocol; use one of {sorted(PROTOCOLS)}")
    unknown = sorted(set(map(str, cfg)) - set(OPTIONS))
    if unknown:
        raise ValueError(f"so_det: unknown key(s) {unknown}; known: {list(OPTIONS)} (docs/metrics.md)")
    p = PROTOCOLS[name]

    def positive_int(key, value, low=1):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"so_det.{key} must be an integer >= {low}, got {value!r}")
        return value

    def flag(key, value):
        if not isinstance(value, bool):
            raise ValueError(f"so_det.{key} must be true or false, got {value!r}")
        return value

    max_dets = cfg.get("max_dets", p.max_dets)
    if not isinstance(max_dets, (list, tuple)):
        raise ValueError(f"so_det.max_dets must be a list of positive integers, got {max_dets!r}")
    scope = cfg.get("max_det_scope", p.max_det_scope)
    if scope not in SCOPES:
        raise ValueError(f"so_det.max_det_scope must be one of {list(SCOPES)}, got {scope!r}")
    merge_iou = cfg.get("merge_iou", p.merge_iou)
    if isinstance(merge_iou, bool) or not isinstance(merge_iou, (int, float)) or not 0 < merge_iou <= 1:
        raise ValueError(f"so_det.merge_iou must be a number in (0, 1], got {merge_iou!r}")
    opt = {k: positive_int(k, cfg[k]) if cfg.get(k) is not None else None for k in ("tile", "imgsz")}
    if cfg.get("overlap") is not None:
        opt["overlap"] = positive_int("overlap", cfg["overlap"], low=0)
    return replace(
        p,
        max_det=positive_int("max_det", cfg.get("max_det", p.max_det)),
        max_dets=tuple(positive_int("max_dets", v) for v in max_dets),
        max_det_scope=scope,
        drop_ignored=flag("ignore", cfg.get("ignore", p.drop_ignored)),
        tiles=flag("tiles", cfg.get("tiles", p.tiles)),
        merge_iou=float(merge_iou),
        **{k: v if k in cfg else getattr(p, k) for k, v in opt.items()},
    )


# ----------------------------------------------------------------------------------------------- ground truth


@dataclass
class ImageTruth:
    """Ground truth of one image in pixels: ``boxes`` (N, 4) xyxy, ``cls`` (N,) class indices, ``ignore`` (K, 4)."""

    file: Path
    width: int
    height: int
    boxes: np.ndarray
    cls: np.ndarray
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    from ultralytics.data.utils import exif_size

    with Image.open(path) as im:
        return exif_size(im)


def load_truth(image_files, root, sidecars: str = contract.SIDECARS, single_cls: bool = False) -> list[ImageTruth]:
    """Ground truth of ``image_files`` from their YOLO labels, sizes and sidecars (the data contract).

    Sizes come from the sidecar (``width``/``height``), else from the image header (EXIF-corrected, as Ultralytics
    reads it). An image without a sidecar has no ignored regions.
    """
    from ultralytics.data.utils import img2label_paths

    image_files = [Path(f) for f in image_files]
    out = []
    for img, lbl in zip(image_files, img2label_paths(image_files)):
        side = contract.read_sidecar(contract.sidecar_path(img, root, sidecars)) or contract.Sidecar()
        if side.width is not None and side.height is not None:
            w, h = side.width, side.height
        else:
            w, h = _image_size(img)
        boxes, cls = contract.read_labels(lbl, w, h)
        out.append(ImageTruth(img, w, h, boxes, cls * 0 if single_cls else cls, side.ignore))
    return out


def split_images(data: dict, split: str) -> list[Path]:
    """Image files of ``data[split]`` (a folder, a .txt list or a list of those), as Ultralytics lists them."""
    from ultralytics.data.utils import IMG_FORMATS

    if not data.get(split):
        raise ValueError(
            f"the data YAML has no '{split}' split (splits: "
            f"{[k for k in ('train', 'val', 'test', 'minival') if data.get(k)]})"
        )
    entries = data[split] if isinstance(data[split], (list, tuple)) else [data[split]]
    files = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS]
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    f = Path(line.strip())
                    files.append(f if f.is_absolute() else (p.parent / f))
        else:
            raise FileNotFoundError(f"split '{split}': {p} is neither a folder of images nor a .txt list")
    return sorted(files)


# ------------------------------------------------------------------------------------------------- evaluation


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


def _image_keys(truth: list[ImageTruth]) -> dict:
    """Ways a prediction names an image: file name, stem, and Ultralytics' int(stem) for numeric stems."""
    keys = {}
    for i, t in enumerate(truth):
        stem = t.file.stem
        for k in (t.file.name, stem, str(int(stem)) if stem.isnumeric() else None):
            if k is not None:
                keys.setdefault(k, i)
    return keys


def _group_predictions(predictions, truth: list[ImageTruth], nc: int) -> list[tuple]:
    """COCO result rows -> per image (boxes xyxy, scores, classes), with clear errors for rows that do not fit."""
    keys, n = _image_keys(truth), len(truth)
    per = [([], [], []) for _ in range(n)]
    unknown, bad_cat = [], []
    for d in predictions:
        i = keys.get(str(d.get("file_name", ""))) if "file_name" in d else None
        i = keys.get(str(d.get("image_id"))) if i is None else i
        if i is None:
            unknown.append(d.get("file_name", d.get("image_id")))
            continue
        c = d.get("category_id")
        if not isinstance(c, (int, np.integer)) or not 1 <= c <= nc:
            bad_cat.append(c)
            continue
        x, y, w, h = (float(v) for v in d["bbox"])
        per[i][0].append([x, y, x + w, y + h])
        per[i][1].append(float(d["score"]))
        per[i][2].append(int(c) - 1)
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions name images that are not in this split (first: "
            f"{sorted(set(map(str, unknown)))[:3]}); check --split and that image_id is the file stem"
        )
    if bad_cat:
        raise ValueError(
            f"{len(bad_cat)} predictions have category_id outside 1..{nc} (first: {bad_cat[:3]}); "
            "expected Ultralytics' non-COCO convention category_id = class index + 1"
        )
    return [
        (np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(s, dtype=np.float64), np.asarray(c, dtype=np.int64))
        for b, s, c in per
    ]


def evaluate(truth: list[ImageTruth], predictions, protocol: Protocol, names=None) -> Result:
    """Evaluate COCO-format ``predictions`` against ``truth`` under ``protocol``.

    Args:
        truth: One :class:`ImageTruth` per image of the split (images without predictions count too).
        predictions: Rows ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"[, "file_name"]}`` as written by
            ``yolo val save_json=True`` (image_id = file stem, category_id = class index + 1).
        protocol: A :class:`Protocol` (see :data:`PROTOCOLS`, :func:`protocol_from_data`).
        names: Class names, dict ``{index: name}`` or list; defaults to the class indices found.

    Returns:
        A :class:`Result`.

    Example:
        >>> t = [ImageTruth(Path("a.jpg"), 100, 100, np.array([[10.0, 10, 20, 20]]), np.array([0]))]
        >>> evaluate(t, [{"image_id": "a", "category_id": 1, "bbox": [10, 10, 10, 10], "score": 0.9}],
        ...          PROTOCOLS["visdrone"]).metrics["AP"]
        1.0
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    nc = len(names) if names else int(max([t.cls.max() + 1 for t in truth if len(t.cls)] or [1]))
    names = list(names) if names else [str(i) for i in range(nc)]
    if any(len(t.cls) and t.cls.max() >= nc for t in truth):
        raise ValueError(f"labels hold class indices >= nc={nc}")
    preds = _group_predictions(predictions, truth, nc)
    counts = {"images": len(truth), "gt": 0, "gt_ignored": 0, "det": 0, "det_ignored": 0, "det_over_max_det": 0}
    images, gts, dts = [], [], []
    for i, (t, (boxes, scores, cls)) in enumerate(zip(truth, preds)):
        images.append({"id": i, "width": t.width, "height": t.height, "file_name": t.file.name})
        keep_gt = np.ones(len(t.boxes), bool)
        if protocol.drop_ignored and len(t.ignore):
            keep_gt = ~in_ignored(t.boxes, t.ignore, protocol.ignore_fraction)
            drop = in_ignored(boxes, t.ignore, protocol.ignore_fraction)
            counts["det_ignored"] += int(drop.sum())
            boxes, scores, cls = boxes[~drop], scores[~drop], cls[~drop]
        counts["gt_ignored"] += int((~keep_gt).sum())
        if protocol.max_det_scope == "image":  # ours: the best max_det of the image over all classes
            order = np.argsort(-scores, kind="stable")[: protocol.max_det]
            counts["det_over_max_det"] += len(scores) - len(order)
        else:  # COCOeval keeps the best maxDets[-1] of each image and class itself
            order = np.argsort(-scores, kind="stable")
            per_cls = np.bincount(cls, minlength=nc) if len(cls) else np.zeros(nc, int)
            counts["det_over_max_det"] += int(np.clip(per_cls - protocol.coco_max_dets[-1], 0, None).sum())
        for b, c in zip(t.boxes[keep_gt], t.cls[keep_gt]):
            w, h = b[2] - b[0], b[3] - b[1]
            gts.append(
                {
                    "id": len(gts) + 1,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "bbox": [b[0], b[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b, s, c in zip(boxes[order], scores[order], cls[order]):
            dts.append(
                {"image_id": i, "category_id": int(c) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            )
    counts["gt"], counts["det"] = len(gts), len(dts)
    areas = np.asarray([g["area"] for g in gts])
    counts["gt_per_bin"] = {lbl: int(((areas >= lo) & (areas <= hi)).sum()) for lbl, lo, hi in protocol.bins}

    quiet = lambda *a, **k: None  # noqa: E731
    gt_api = COCO(
        {"images": images, "annotations": gts, "categories": [{"id": k + 1, "name": names[k]} for k in range(nc)]}
    )
    gt_api.print_function = quiet
    dt_api = gt_api.loadRes(dts)
    ev = COCOeval_faster(gt_api, dt_api, iouType="bbox", print_function=quiet)
    p = ev.params
    p.imgIds, p.catIds = list(range(len(images))), list(range(1, nc + 1))
    p.areaRng = [list(protocol.all_range), *([lo, hi] for _, lo, hi in protocol.bins)]
    p.areaRngLbl = ["all", *(b[0] for b in protocol.bins)]
    p.maxDets = protocol.coco_max_dets  # per image and class inside COCOeval (pycocotools' evaluateImg)
    ev.evaluate()
    ev.accumulate()
    precision = np.asarray(ev.eval["precision"])  # (iou thresholds, recall points, classes, area ranges, maxDets)
    iou = np.asarray(p.iouThrs)

    m = list(p.maxDets).index(protocol.report_max_det)

    def ap(area: int, t=slice(None), k=slice(None)):
        x = precision[t, :, k, area, m]
        x = x[x > -1]
        return float(x.mean()) if x.size else None

    t50, t75 = int(np.argmin(abs(iou - 0.5))), int(np.argmin(abs(iou - 0.75)))
    metrics = {"AP": ap(0), "AP50": ap(0, t50), "AP75": ap(0, t75)}
    metrics.update({f"AP_{lbl}": ap(a + 1) for a, (lbl, _, _) in enumerate(protocol.bins)})
    per_class = {names[k]: ap(0, k=k) for k in range(nc)}
    return Result(protocol, metrics, per_class, counts)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_predictions(path) -> list:
    """A ``predictions.json`` (list of COCO result rows) with a clear error for anything else.

    The rules (docs/metrics.md, "Predictions file rules"): the file is UTF-8 JSON holding a list (``[]``: no
    detections); each row has ``image_id``, ``category_id``, ``bbox`` and ``score``; ``bbox`` is 4 finite numbers
    ``[x, y, w, h]`` with ``w, h >= 0``; ``score`` is a finite number. Rows naming images or categories outside the
    split are errors raised when the rows are matched to the ground truth (:func:`evaluate`).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file breaks a rule; the message names the file, the rule and the first offending row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected a JSON list") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected a JSON list of rows ('[]' for no detections)")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(rows, list) or (
        rows and not all(isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys() for r in rows)
    ):
        raise ValueError(
            f"{path}: expected a JSON list of {{image_id, category_id, bbox, score}} rows, as written "
            "by 'yolo val save_json=True'"
        )
    bad = [
        k
        for k, r in enumerate(rows)
        if not (
            isinstance(r["bbox"], (list, tuple))
            and len(r["bbox"]) == 4
            and all(_finite(v) for v in r["bbox"])
            and r["bbox"][2] >= 0
            and r["bbox"][3] >= 0
            and _finite(r["score"])
        )
    ]
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} of {len(rows)} rows have a bbox that is not 4 finite numbers [x, y, w, h] with "
            f"w, h >= 0, or a score that is not a finite number (first: row {bad[0]}, {rows[bad[0]]})"
        )
    return rows


def evaluate_dataset(
    data: dict, split: str, predictions, protocol: Protocol | None = None, image_files=None, single_cls: bool = False
) -> Result:
    """Evaluate ``predictions`` on ``data[split]`` of a loaded data dict (``check_det_dataset`` output).

    The ground truth is the split's YOLO labels, image sizes and sidecars (``<path>/<so_det.sidecars>/<split>/``).
    With ``protocol.tiles``, tile images are replaced by their original images and predictions on tiles are moved
    there and merged (:mod:`so_det_ultra.metrics.tiles`).
    """
    protocol = protocol or protocol_from_data(data)
    if protocol is None:
        raise ValueError(
            f"the data YAML has no '{contract.SO_DET_KEY}:' key, so no evaluation protocol; add "
            f"{contract.so_det_hint()} (see docs/metrics.md)"
        )
    from so_det_ultra.metrics.tiles import evaluate_split, load_eval_truth

    files = split_images(data, split) if image_files is None else image_files
    names = data.get("names")
    if single_cls:
        names = ["object"]
    root, folder = data.get("path", "."), contract.sidecar_folder(data)
    truth = load_eval_truth(files, root, folder, single_cls, tiles=protocol.tiles)
    return evaluate_split(truth, predictions, protocol, names)
