"""ESOD sparse inference: the stem on the full frame, the rest of the network only on patches the seeker picks.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3
(official code github alibaba/esod); summary and measurements in docs/highres.md. Pipeline for one frame:

1. letterbox the frame at full resolution (as dense ``YOLO.predict`` would at the same ``imgsz``), kept as the
   uint8 BGR image: the conversion to the network's float RGB input is the first step of the stem;
2. run the *stem*, every layer up to and including the :class:`~so_det_ultra.nn.esod.ObjectSeeker`, on the whole
   frame (for so-det-esod: layers 0-5, strides 2-8); the sigmoid of the seeker's logits is the heatmap, one value per
   *cell* of ``cell`` pixels, the seeker's stride (measured from the model when it is split; 8 for so-det-esod);
3. pick patches from the heatmap (:mod:`.patches`) and plan the network runs (:func:`.runs.plan_runs`): a crop per
   patch, or overlapping crops merged into one run whose size is rounded up to a few bucket shapes; crop every stem
   output the later layers read (stride 4 and 8 maps for so-det-esod) at each run, and run the remaining layers on
   batches of equal-shape crops;
4. the Detect layer decodes boxes in crop pixels; :func:`to_frame` adds each crop's offset and zeroes the scores of
   boxes whose centre lies outside the run's patch cores (inside the rest graph of an export); one NMS runs over all
   runs (:func:`frame_nms`, with an optional cap per run);
5. scale back to the original image and return Ultralytics ``Results``.

A heatmap can also be given (``heatmap=``), e.g. an oracle drawn from ground truth, to measure the slicing alone.

With ``sparse_head=True`` the Detect layer runs only at the heatmap centres dilated by ``head_dilate`` cells
(:mod:`.sparse_head`, exact at those cells); by default it runs on every cell of each patch.

Interpretations: a crop may include a ``margin`` of context around its core (the paper crops patches without one:
``margin=0``, the default); merged and bucketed runs (ours) change only the context a core's predictions see
beyond its margin; the sparse head's cells are the 3x3 local maxima >= ``thr`` (official 0.3) dilated by
``head_dilate`` cells (official 1: a 3x3 dilation, ``models/yolo.py`` ``Detect.get_indices``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from so_det_ultra.highres import common
from so_det_ultra.highres.patches import THRESHOLD, find_centres, make_patches, official_patch, select_patches
from so_det_ultra.highres.runs import BUCKET, batches, crop, placement, plan_runs
from so_det_ultra.highres.sparse_head import HEAD_DILATE, dilate, sparse_detect
from so_det_ultra.nn.esod import SeekerDetect
from so_det_ultra.nn.graph import layer_inputs as _inputs
from so_det_ultra.nn.graph import model_stride, run_layers, seeker_index, seeker_threshold
from so_det_ultra.nn.graph import sources as _sources


class SparseModel:
    """A DetectionModel split at its ObjectSeeker into a full-frame stem and a patch-wise remainder.

    The seeker's stride ``cell`` (pixels per heatmap cell) is measured once, with a forward pass of the stem on a
    blank image, and checked: square, an integer, nesting with the model's largest stride (one divides the other),
    and a multiple of the stride of every stem output that is cropped (those are cut at whole cells).

    Args:
        model: A DetectionModel (or path / YOLO) whose YAML has one ``ObjectSeeker`` layer.

    Attributes:
        cell (int): Seeker stride in input pixels (8 for so-det-esod). align (int): Largest model stride in cells.
        threshold (float): The heatmap threshold used when none is given: the seeker's stored one
            (``so-det fit-seeker``), else ESOD's default.
        batch (int): Crops per forward pass when none is given (batching keeps PyTorch's small ops fewer).
    """

    batch = 16

    def __init__(self, model, device="cpu"):
        self.model = _channels_last(common.load_model(model, device), device)
        layers = list(self.model.model)
        self.k = seeker_index(
            layers, "sparse inference", "use so-det-esod-*.yaml, or sliced inference for models without a seeker"
        )
        self.stem, self.rest = layers[: self.k + 1], layers[self.k + 1 :]
        self.needed = {j for m in self.rest for j in _sources(m) if j <= self.k}  # stem outputs read later
        seek, head = self.k, self.rest[-1]
        if isinstance(head, SeekerDetect) and [m for m in self.rest if seek in _sources(m)] == [head]:
            self.needed.discard(seek)  # SeekerDetect passes the logits to the loss only: no need to crop them
        self.names = self.model.names
        self.stride = model_stride(self.model)
        self.device = torch.device(device)
        self.cell, self.factor = self._measure(device)
        self.align = max(self.stride // self.cell, 1)  # cells per largest stride: corners snap to the deepest grid
        stored = seeker_threshold(layers)
        self.threshold = THRESHOLD if stored is None else stored
        self._image_layer = image_layer(self.stem[0])

    @torch.no_grad()
    def _measure(self, device) -> tuple[int, dict]:
        """Seeker stride in pixels and, per cropped stem output, its map cells per heatmap cell (one stem forward)."""
        size = 2 * self.stride
        ch = (getattr(self.model, "yaml", None) or {}).get("channels", 3)
        y = self.stem_outputs(torch.zeros(1, ch, size, size, device=device))
        h, w = y[-1].shape[2:]
        if h != w or size % h:
            raise ValueError(f"the ObjectSeeker's output ({h}x{w} on a {size}x{size} input) has no integer stride")
        cell = size // h
        if self.stride % cell and cell % self.stride:
            raise ValueError(f"the model's largest stride {self.stride} and the seeker's stride {cell} do not nest")
        factor = {}
        for j in sorted(self.needed):
            s = size // y[j].shape[2]
            if s > cell or cell % s:
                raise ValueError(
                    f"layer {j} (stride {s}) is read after the seeker but cannot be cut at the seeker's {cell}-px "
                    "cells: every stem output read later needs a stride that divides the seeker's"
                )
            factor[j] = cell // s
        return cell, factor

    @torch.no_grad()
    def stem_outputs(self, x: torch.Tensor, layers=None) -> list:
        """Outputs of every stem layer on the full frame ``x`` (1, C, H, W) float (the last: the seeker's logits);
        ``layers`` replaces the stem's layers (same ``from`` indices)."""
        y = []
        run_layers(layers or self.stem, x, y)
        return y

    @torch.no_grad()
    def image_stem_outputs(self, image: torch.Tensor) -> list:
        """:meth:`stem_outputs` on letterboxed uint8 BGR images (B, H, W, 3), converted as Ultralytics' predictor
        does (RGB, ``/ 255``): by the first layer itself when it is a convolution (:func:`image_layer`), else by
        :func:`image_input`. Also the first step of the exported stem graph."""
        if self._image_layer is None:
            return self.stem_outputs(image_input(image))
        return self.stem_outputs(image.permute(0, 3, 1, 2).float(), [self._image_layer, *self.stem[1:]])

    @torch.no_grad()
    def run_stem(self, x) -> tuple[dict, torch.Tensor]:
        """The stem outputs later layers read ``{layer: (1, C, h, w)}`` and the heatmap (H/cell, W/cell) in [0, 1].

        ``x``: the letterboxed uint8 BGR image (H, W, 3) (what :func:`sparse_predict` passes), or the network input
        (1, C, H, W) float in [0, 1].
        """
        if isinstance(x, np.ndarray):
            y = self.image_stem_outputs(torch.from_numpy(x).to(self.device)[None])
        else:
            y = self.stem_outputs(x)
        return {j: y[j] for j in self.needed}, y[-1][0, 0].sigmoid()

    @torch.no_grad()
    def run_rest(self, crops: dict, origin=None, keep=None) -> torch.Tensor:
        """Decoded Detect output (B, 4 + nc, A) for a batch of crops ``{layer: (B, C, h, w)}``: in crop pixels, or,
        given the crops' ``origin`` (B, 2) and ``keep`` (B, 1, h, w) masks, in frame pixels with the scores of boxes
        centred outside ``keep`` set to 0 (:func:`to_frame`)."""
        head, feats = self._rest_features(crops)
        pred = head(feats)
        pred = pred[0] if isinstance(pred, (tuple, list)) else pred
        if origin is None:
            return pred
        origin, keep = (
            t if isinstance(t, torch.Tensor) else torch.as_tensor(t, device=pred.device) for t in (origin, keep)
        )
        return to_frame(pred, origin, keep, self.cell)

    def run_rests(self, batches: list) -> list:
        """:meth:`run_rest` on each ``(crops, origin, keep)`` of ``batches``, one after the other."""
        return [self.run_rest(*b) for b in batches]

    @torch.no_grad()
    def run_rest_sparse_head(self, crops: dict, masks) -> list:
        """Per-crop (4 + nc, A_i) predictions in crop pixels with the Detect head evaluated only at ``masks``."""
        head, feats = self._rest_features(crops)
        feats = head.split(feats)[0] if isinstance(head, SeekerDetect) else feats
        return sparse_detect(head, feats, masks(feats))

    @torch.no_grad()
    def _rest_features(self, crops: dict):
        y = [crops.get(j) for j in range(self.k + 1)]
        x = run_layers(self.rest[:-1], y[-1], y)
        head = self.rest[-1]
        return head, _inputs(head, x, y)

    def run_patches(self, stem_out: dict, image_hw, patches, batch: int = 16, head_mask=None) -> torch.Tensor:
        """Raw Detect output (1, 4 + nc, N) in frame pixels for anchors whose box centre lies in a patch core.

        ``image_hw`` (the letterboxed input's size) is not needed; kept for callers of earlier versions.
        """
        return run_patches(self, stem_out, patches, batch, head_mask)


def image_input(img: torch.Tensor) -> torch.Tensor:
    """The network input (B, 3, H, W) float RGB in [0, 1] from letterboxed uint8 BGR images (B, H, W, 3).

    The conversion of Ultralytics' predictor (BGR to RGB, HWC to CHW, ``/ 255``), in torch so that the exported stem
    runs it in its graph; the result is channels-last, the layout the model runs in on CPUs.
    """
    return img.flip(-1).permute(0, 3, 1, 2).float().div(255)


def image_layer(layer):
    """A copy of the model's first layer that takes the image's uint8 BGR values as they are (0-255), or None.

    For a layer whose convolution reads the 3 image channels (Ultralytics ``Conv``, the first layer of every YOLO
    YAML): its weights divided by 255 with their input channels reversed. Exact up to float rounding: the convolution
    is linear and its zero padding stays zero under the scaling. It saves the full-frame passes that convert the
    image (about 10 ms at 1080p on one CPU thread), in PyTorch and in the exported stem graph.
    """
    import copy

    conv = getattr(layer, "conv", None)
    if not isinstance(conv, torch.nn.Conv2d) or conv.in_channels != 3 or conv.groups != 1 or layer.f != -1:
        return None
    out = copy.deepcopy(layer)
    out.conv.weight.data = conv.weight.data.flip(1) / 255
    return out


def _channels_last(model, device):
    """Channels-last weights on x86 CPUs with oneDNN, as Ultralytics' ``AutoBackend`` sets them for ``YOLO.predict``
    (``ultralytics/nn/autobackend.py``): the same layout as the dense baseline, and faster convolutions there."""
    import platform

    cpu = torch.device(device).type == "cpu"
    if cpu and platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        model.to(memory_format=torch.channels_last)
    return model


def to_frame(pred: torch.Tensor, origin: torch.Tensor, keep: torch.Tensor, cell: int) -> torch.Tensor:
    """Crop predictions (B, 4 + nc, A) (xywh in crop pixels, class scores) moved to the frame: ``origin`` (B, 2) is
    each crop's top-left (x, y) in frame pixels; the scores of a box whose centre lies outside ``keep`` (B, 1, h, w),
    1 on the heatmap cells of the crop whose predictions it answers for (the cores), or outside the crop, become 0.

    Written with tensor operations only, so that the exported rest graph runs it (no branch on values or shapes).
    """
    xy = pred[:, :2]
    h, w = keep.shape[2], keep.shape[3]
    ij = torch.floor(xy / cell)  # (B, 2, A): the cell (x, y) of each box centre
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
    idx = ij[:, 1].clamp(min=0, max=h - 1) * w + ij[:, 0].clamp(min=0, max=w - 1)
    k = keep.flatten(1).gather(1, idx.long()) * inside.to(keep.dtype)  # (B, A)
    return torch.cat((xy + origin[:, :, None].to(xy.dtype), pred[:, 2:4], pred[:, 4:] * k[:, None]), 1)


def run_frame(engine, stem_out: dict, runs, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Detect output (1, 4 + nc, N) in frame pixels over every run (scores 0 outside the cores) and, per column, the
    index of the run that made it (for :func:`frame_nms`'s per-run cap)."""
    chunks = batches(runs, batch)
    work = []
    for chunk in chunks:
        origin, keep = placement(chunk, engine.cell)
        work.append(({j: crop(t, engine.factor[j], chunk) for j, t in stem_out.items()}, origin, keep))
    outs = [torch.as_tensor(o) for o in engine.run_rests(work)]
    if not outs:
        return torch.zeros(1, 4 + len(engine.names), 0), torch.zeros(0, dtype=torch.long)
    run_id, first = [], 0
    for o in outs:
        run_id.append(torch.arange(first, first + len(o)).repeat_interleave(o.shape[2]))
        first += len(o)
    return torch.cat([o.permute(1, 0, 2).flatten(1) for o in outs], 1)[None], torch.cat(run_id)


def run_patches(engine, stem_out: dict, patches, batch: int = 16, head_mask=None, merge: bool = False) -> torch.Tensor:
    """Raw Detect output (1, 4 + nc, N) in frame pixels of ``engine`` (a :class:`SparseModel` or an exported one)
    for the anchors whose box centre lies in a patch core.

    Patches with equal crop sizes run together, ``batch`` at a time. With ``merge``, overlapping crops that fit a
    common box at no extra area run as that box (:func:`.runs.merge_crops`). ``head_mask`` (H/cell, W/cell) bool
    switches on the sparse head (PyTorch only): Detect is evaluated only at those cells.
    """
    runs = plan_runs(patches, None, merge)  # no frame shape: merged boxes are not rounded to buckets
    if head_mask is None:
        raw, _ = run_frame(engine, stem_out, runs, batch)
    else:
        raw, _ = _sparse_head_frame(engine, stem_out, runs, batch, head_mask)
    return raw[..., raw[0, 4:].amax(0) > 0]  # the boxes centred in a core (the others have all scores 0)


def _sparse_head_frame(engine, stem_out: dict, runs, batch: int, head_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`run_frame` with the Detect head evaluated only at ``head_mask`` (PyTorch only)."""
    outs, run_id = [], []
    for chunk in batches(runs, batch):
        crops = {j: crop(t, engine.factor[j], chunk) for j, t in stem_out.items()}
        preds = engine.run_rest_sparse_head(crops, lambda f, c=chunk: _level_masks(head_mask, c, f))
        origin, keep = map(torch.from_numpy, placement(chunk, engine.cell))
        for k, p in enumerate(preds):
            outs.append(to_frame(p[None], origin[k : k + 1], keep[k : k + 1], engine.cell)[0])
            run_id.append(torch.full((p.shape[1],), len(run_id)))
    if not outs:
        return torch.zeros(1, 4 + len(engine.names), 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs, 1)[None], torch.cat(run_id)


def _level_masks(mask, patches, feats):
    """The heatmap-grid ``mask`` cut at each crop and brought to each head level's grid: a list of (B, H_i, W_i)."""
    m = torch.stack([mask[p.crop[0] : p.crop[2], p.crop[1] : p.crop[3]] for p in patches])
    out = []
    for f in feats:
        r = f.shape[2] / m.shape[1]
        if r >= 1:
            out.append(m.repeat_interleave(int(r), 1).repeat_interleave(int(r), 2))
        else:
            out.append(F.max_pool2d(m[:, None].float(), round(1 / r))[:, 0] > 0)
    return out


def _centre_mask(prob, thr, r):
    mask = torch.zeros(prob.shape, dtype=torch.bool)
    c = find_centres(prob, thr)
    mask[c[:, 0], c[:, 1]] = True
    return dilate(mask[None], r)[0]


def frame_nms(raw, run_id, conf: float, iou: float, max_det: int, max_det_tile: int | None = None) -> torch.Tensor:
    """(M, 6) detections ``x1, y1, x2, y2, score, class`` in frame pixels from ``raw`` (1, 4 + nc, N): Ultralytics'
    NMS over all runs, keeping ``max_det``; with ``max_det_tile``, first at most that many per run (``run_id`` (N,):
    the run of each column), after an NMS within the run, as a sliced predictor caps each tile (SAHI)."""
    from ultralytics.utils.nms import non_max_suppression

    if max_det_tile is not None:
        raw = _cap_per_run(raw, run_id, conf, iou, max_det_tile)
    return non_max_suppression(raw, conf, iou, max_det=max_det, max_time_img=60.0)[0]


def _cap_per_run(raw, run_id, conf: float, iou: float, cap: int) -> torch.Tensor:
    """The columns of ``raw`` that an NMS within each run keeps, at most ``cap`` per run (highest scores); ``raw``
    itself, untouched, when no run keeps more than ``cap`` (the cap does not bind, so the result is that of one NMS)."""
    import torchvision
    from ultralytics.utils.ops import xywh2xyxy

    if not raw.shape[2]:
        return raw
    score, cls = raw[0, 4:].max(0)
    idx = (score > conf).nonzero()[:, 0]
    if not len(idx) or torch.bincount(run_id[idx]).max() <= cap:  # fewer candidates than the cap in every run
        return raw
    nc = raw.shape[1] - 4
    keep = idx[torchvision.ops.batched_nms(xywh2xyxy(raw[0, :4, idx].T), score[idx], run_id[idx] * nc + cls[idx], iou)]
    runs = run_id[keep]  # keep is best first, so a box's rank in its run is the count of its run's boxes before it
    rank = (torch.nn.functional.one_hot(runs).cumsum(0) - 1).gather(1, runs[:, None])[:, 0]
    return raw if rank.max() < cap else raw[..., keep[rank < cap]]


def sparse_predict(
    model,
    source,
    *,
    imgsz=None,
    thr: float | None = None,
    patch: int | None = None,
    margin: int = 0,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 10000,
    max_det_tile: int | None = 1000,
    batch: int | None = None,
    heatmap=None,
    sparse_head: bool = False,
    head_dilate: int = HEAD_DILATE,
    prune: bool = True,
    merge_crops: bool = False,
    bucket: int = BUCKET,
    device="cpu",
) -> list:
    """ESOD sparse inference on each image of ``source``; returns Ultralytics ``Results``.

    Args:
        model: Path (``.pt`` / YAML), ``YOLO``, DetectionModel or a ready :class:`SparseModel` (or exported engine).
        source: Image path, folder, array, or a list of those.
        imgsz (int, optional): Long side of the network input; None keeps the image's own resolution.
        thr (float, optional): Heatmap threshold for patch centres and activated cells; None = the model's
            ``threshold`` (the one ``so-det fit-seeker`` stored, else ESOD's 0.3).
        patch (int | tuple, optional): Patch core size in heatmap cells (``SparseModel.cell`` px, 8 for
            so-det-esod), square or (h, w); None = ESOD's w/8 x h/8 cells
            (:func:`~so_det_ultra.highres.patches.official_patch`).
        margin (int): Context cells added around each core in the crop the network sees; 0 is the paper's plain
            crop (recall measured the same with 2 cells, 13 % slower: docs/highres.md).
        conf, iou: NMS settings, as in ``YOLO.predict``.
        max_det (int): Detections kept per image (high: crowded drone frames hold 1000+ objects).
        max_det_tile (int, optional): Detections kept per network run (a patch, or merged patches), after an NMS
            within it, before the NMS over the frame; None: no cap.
        batch (int, optional): Crops of one shape per forward pass; None: the engine's (16 in PyTorch; exports run
            crops one by one, several at once: :mod:`.runtimes`).
        heatmap (callable, optional): ``heatmap(index, path, input_hw, cells_hw) -> cells_hw tensor`` replacing the
            seeker's (an oracle for benchmarks).
        sparse_head (bool): Evaluate the Detect head only at heatmap centres dilated by ``head_dilate`` cells
            (ESOD's sparse head; :mod:`.sparse_head`) instead of on every cell of each patch.
        prune (bool): Drop patches whose active cells the other patches' cores already hold
            (:func:`~so_det_ultra.highres.patches.select_patches`).
        merge_crops (bool): Run overlapping crops as their common box when it adds no work (:func:`.runs.plan_runs`);
            off by default, one crop per patch as ESOD: on the idle 2-core benchmark merged runs were slower on
            every runtime (docs/highres.md).
        bucket (int): Merged crops are rounded up to multiples of this many cells (1: exact boxes).

    Each result has ``speed`` (ms: preprocess, stem, select, patches, postprocess, inference) and ``patches`` (the
    list of :class:`~so_det_ultra.highres.patches.Patch` used, in cells of the letterboxed input).
    """
    sm = model if hasattr(model, "run_rest") else SparseModel(model, device)  # ours or an exported engine
    thr = sm.threshold if thr is None else thr
    batch = batch or sm.batch
    results = []
    for n, (path, img) in enumerate(common.read_images(source)):
        t0 = time.perf_counter()
        image = common.letterbox_image(img, imgsz, sm.stride)
        t1 = time.perf_counter()
        stem_out, prob = sm.run_stem(image)
        if heatmap is not None:
            prob = torch.as_tensor(heatmap(n, path, image.shape[:2], tuple(prob.shape)), dtype=prob.dtype)
        t2 = time.perf_counter()
        p = patch or official_patch(tuple(prob.shape), sm.align)
        corners = select_patches(prob, thr, p, sm.align, prune)
        patches = make_patches(corners, prob.shape, p, margin, sm.align)
        runs = plan_runs(patches, tuple(prob.shape), merge_crops, bucket, sm.align)
        head_mask = _centre_mask(prob, thr, head_dilate) if sparse_head else None
        t3 = time.perf_counter()
        if head_mask is None:
            raw, run_id = run_frame(sm, stem_out, runs, batch)
        else:
            raw, run_id = _sparse_head_frame(sm, stem_out, runs, batch, head_mask)
        t4 = time.perf_counter()
        det = frame_nms(raw, run_id, conf, iou, max_det, max_det_tile)
        speed = {
            "preprocess": t1 - t0,
            "stem": t2 - t1,
            "select": t3 - t2,
            "patches": t4 - t3,
            "postprocess": time.perf_counter() - t4,
        }
        speed = {k: v * 1000 for k, v in speed.items()}
        speed["inference"] = speed["stem"] + speed["select"] + speed["patches"]
        res = common.to_results(det, img, path, sm.names, image.shape[:2], speed)
        res.patches, res.runs = patches, runs
        results.append(res)
    return results
