"""Evaluation protocols: size bins, detection caps, ignore rule and tiling of VisDrone and SODA-D, and the
``so_det:`` key of a data YAML that picks one (docs/metrics.md, "Protocols").

- ``visdrone``: VisDrone2019-DET (Zhu et al., TPAMI 2021) with COCO's size bins (Lin et al., ECCV 2014), 500
  detections per image over all classes (VisDrone2018-DET-toolkit ``utils/calcAccuracy.m``) and ignored regions
  (``utils/dropObjectsInIgr.m``, :mod:`.ignore`).
- ``soda-d``: SODA-D (Cheng et al., TPAMI 2023; github.com/shaunyuan22/SODA-mmdetection,
  ``mmdet/datasets/sodad_eval/sodadeval.py``): eS/rS/gS/N bins, AP over the Small range, COCOeval's caps per image
  and class, tiles merged on the original image (:mod:`.tiles`).
- ``soda-d-fullframe``: the SODA-D bins with the VisDrone-style cap and ignore rule, on full frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from so_det_ultra.data import contract
from so_det_ultra.data.contract import BIG, COCO_BINS, SODA_D_BINS, SODA_D_SMALL
from so_det_ultra.metrics.ignore import DROP_FRACTION

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
    return _with_overrides(PROTOCOLS[name], cfg)


def _positive_int(key, value, low=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"so_det.{key} must be an integer >= {low}, got {value!r}")
    return value


def _flag(key, value):
    if not isinstance(value, bool):
        raise ValueError(f"so_det.{key} must be true or false, got {value!r}")
    return value


def _with_overrides(p: Protocol, cfg: dict) -> Protocol:
    """``p`` with the checked overrides of the ``so_det:`` mapping ``cfg``."""
    max_dets = cfg.get("max_dets", p.max_dets)
    if not isinstance(max_dets, (list, tuple)):
        raise ValueError(f"so_det.max_dets must be a list of positive integers, got {max_dets!r}")
    scope = cfg.get("max_det_scope", p.max_det_scope)
    if scope not in SCOPES:
        raise ValueError(f"so_det.max_det_scope must be one of {list(SCOPES)}, got {scope!r}")
    merge_iou = cfg.get("merge_iou", p.merge_iou)
    if isinstance(merge_iou, bool) or not isinstance(merge_iou, (int, float)) or not 0 < merge_iou <= 1:
        raise ValueError(f"so_det.merge_iou must be a number in (0, 1], got {merge_iou!r}")
    opt = {k: _positive_int(k, cfg[k]) if cfg.get(k) is not None else None for k in ("tile", "imgsz")}
    if cfg.get("overlap") is not None:
        opt["overlap"] = _positive_int("overlap", cfg["overlap"], low=0)
    return replace(
        p,
        max_det=_positive_int("max_det", cfg.get("max_det", p.max_det)),
        max_dets=tuple(_positive_int("max_dets", v) for v in max_dets),
        max_det_scope=scope,
        drop_ignored=_flag("ignore", cfg.get("ignore", p.drop_ignored)),
        tiles=_flag("tiles", cfg.get("tiles", p.tiles)),
        merge_iou=float(merge_iou),
        **{k: v if k in cfg else getattr(p, k) for k, v in opt.items()},
    )
