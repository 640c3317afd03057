"""ESOD sparse inference: the stem on the full frame, the rest of the network only on patches the seeker picks.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3
(official code github alibaba/esod); summary and measurements in docs/highres.md. Pipeline for one frame:

1. letterbox the frame at full resolution (as dense ``YOLO.predict`` would at the same ``imgsz``);
2. run the *stem*, every layer up to and including the :class:`~so_det_ultra.nn.esod.ObjectSeeker`, on the whole
   frame (for so-det-esod: layers 0-5, strides 2-8); the sigmoid of the seeker's logits is the heatmap, one value per
   *cell* of ``cell`` pixels, the seeker's stride (measured from the model when it is split; 8 for so-det-esod);
3. pick patches from the heatmap (:mod:`.patches`); crop every stem output the later layers read (stride 4 and 8
   maps for so-det-esod) at each patch, and run the remaining layers on the batch of crops;
4. the Detect layer decodes boxes in crop pixels; add each crop's offset, keep the boxes whose centre lies in the
   patch's core, and run NMS over all patches together;
5. scale back to the original image and return Ultralytics ``Results``.

A heatmap can also be given (``heatmap=``), e.g. an oracle drawn from ground truth, to measure the slicing alone.

With ``sparse_head=True`` the Detect layer runs only at the heatmap centres dilated by ``head_dilate`` cells
(:mod:`.sparse_head`, exact at those cells); by default it runs on every cell of each patch.

Interpretations: a crop may include a ``margin`` of context around its core (the paper crops patches without one;
``margin=0`` is that reading); the sparse head's cells are the 3x3 local maxima >= ``thr`` (official 0.3) dilated by
``head_dilate`` cells (official 1: a 3x3 dilation, ``models/yolo.py`` ``Detect.get_indices``).
"""

from __future__ import annotations

import itertools
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from so_det_ultra.highres import common
from so_det_ultra.highres.patches import THRESHOLD, find_centres, make_patches, official_patch, select_patches
from so_det_ultra.highres.sparse_head import HEAD_DILATE, dilate, sparse_detect
from so_det_ultra.nn.esod import SeekerDetect
from so_det_ultra.nn.graph import layer_inputs as _inputs
from so_det_ultra.nn.graph import seeker_index, seeker_threshold
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
    """

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
        self.stride = common.model_stride(self.model)
        self.cell, self.factor = self._measure(device)
        self.align = max(self.stride // self.cell, 1)  # cells per largest stride: corners snap to the deepest grid
        stored = seeker_threshold(layers)
        self.threshold = THRESHOLD if stored is None else stored

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
    def stem_outputs(self, x: torch.Tensor) -> list:
        """Outputs of every stem layer on the full frame (the last one is the seeker's logits)."""
        y = []
        for m in self.stem:
            x = _inputs(m, x, y)
            x = m(x)
            y.append(x)
        return y

    @torch.no_grad()
    def run_stem(self, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The stem outputs later layers read ``{layer: (1, C, h, w)}`` and the heatmap (H/cell, W/cell) in [0, 1]."""
        y = self.stem_outputs(x)
        return {j: y[j] for j in self.needed}, y[-1][0, 0].sigmoid()

    @torch.no_grad()
    def run_rest(self, crops: dict) -> torch.Tensor:
        """Raw Detect output (B, 4 + nc, A) in crop pixels for a batch of crops ``{layer: (B, C, h, w)}``."""
        head, feats = self._rest_features(crops)
        pred = head(feats)
        return pred[0] if isinstance(pred, (tuple, list)) else pred

    @torch.no_grad()
    def run_rest_sparse_head(self, crops: dict, masks: list) -> list:
        """Per-crop (4 + nc, A_i) predictions in crop pixels with the Detect head evaluated only at ``masks``."""
        head, feats = self._rest_features(crops)
        feats = head.split(feats)[0] if isinstance(head, SeekerDetect) else feats
        return sparse_detect(head, feats, masks(feats))

    @torch.no_grad()
    def _rest_features(self, crops: dict):
        y = [crops.get(j) for j in range(self.k + 1)]
        x = y[-1]
        for m in self.rest[:-1]:
            x = m(_inputs(m, x, y))
            y.append(x)
        head = self.rest[-1]
        return head, _inputs(head, x, y)

    def run_patches(self, stem_out: dict, image_hw, patches, batch: int = 16, head_mask=None) -> torch.Tensor:
        """Raw Detect output (1, 4 + nc, N) in frame pixels for anchors whose box centre lies in a patch core.

        ``image_hw`` (the letterboxed input's size) is not needed; kept for callers of earlier versions.
        """
        return run_patches(self, stem_out, patches, batch, head_mask)


def _channels_last(model, device):
    """Channels-last weights on x86 CPUs with oneDNN, as Ultralytics' ``AutoBackend`` sets them for ``YOLO.predict``
    (``ultralytics/nn/autobackend.py``): the same layout as the dense baseline, and faster convolutions there."""
    import platform

    cpu = torch.device(device).type == "cpu"
    if cpu and platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        model.to(memory_format=torch.channels_last)
    return model


def run_patches(engine, stem_out: dict, patches, batch: int = 16, head_mask=None, merge: bool = False) -> torch.Tensor:
    """Raw Detect output (1, 4 + nc, N) in frame pixels of ``engine`` (a :class:`SparseModel` or an exported one)
    for the anchors whose box centre lies in a patch core.

    Patches with equal crop sizes run together, ``batch`` at a time; each stem output is cut once per batch into one
    contiguous tensor. With ``merge``, overlapping crops that fit a common box at no extra area run as that box
    (:func:`merge_crops`). ``head_mask`` (H/cell, W/cell) bool switches on the sparse head (PyTorch only): Detect is
    evaluated only at those cells.
    """
    groups = {}
    for p in merge_crops(patches) if merge else [_Run(p.crop, (p.core,)) for p in patches]:
        groups.setdefault((p.crop[2] - p.crop[0], p.crop[3] - p.crop[1]), []).append(p)
    outs = []
    for same in groups.values():
        for i in range(0, len(same), batch):
            chunk = same[i : i + batch]
            crops = {j: _crop(t, engine.factor[j], chunk) for j, t in stem_out.items()}
            if head_mask is None:
                preds = engine.run_rest(crops)
            else:
                preds = engine.run_rest_sparse_head(crops, lambda f, c=chunk: _level_masks(head_mask, c, f))
            outs.append(_to_frame(preds, chunk, engine.cell))
    if not outs:
        return torch.zeros(1, 4 + len(engine.names), 0)
    return torch.cat(outs, 1)[None]


class _Run(NamedTuple):
    """One network input: a crop (y0, x0, y1, x1 cells) and the patch cores whose predictions it gives."""

    crop: tuple
    cores: tuple


def _area(b) -> int:
    return (b[2] - b[0]) * (b[3] - b[1])


def merge_crops(patches, max_grow: int = 4) -> list:
    """Patches as network runs, overlapping crops merged: two crops become their bounding box when the box is no
    larger than the two crops' areas together (so no work is added, and the overlap is computed once) and at most
    ``max_grow`` times the largest patch crop (bounding global layers such as C2PSA's attention, which cost more per
    cell on larger inputs). Boxes of aligned crops stay aligned, so predictions stay those of the dense model."""
    runs = [_Run(p.crop, (p.core,)) for p in patches]
    limit = max_grow * max((_area(p.crop) for p in patches), default=0)
    merged = True
    while merged:
        merged = False
        for i, j in itertools.combinations(range(len(runs)), 2):
            a, b = runs[i].crop, runs[j].crop
            box = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
            if _area(box) <= min(_area(a) + _area(b), limit):
                runs[i], merged = _Run(box, runs[i].cores + runs[j].cores), True
                del runs[j]
                break
    return runs


def _crop(t: torch.Tensor, f: int, patches) -> torch.Tensor:
    """The crops of ``patches`` (in heatmap cells) from a stem output with ``f`` map cells per heatmap cell."""
    if len(patches) == 1:
        p = patches[0]
        return t[..., p.crop[0] * f : p.crop[2] * f, p.crop[1] * f : p.crop[3] * f]  # a view: no copy
    return torch.cat([t[..., p.crop[0] * f : p.crop[2] * f, p.crop[1] * f : p.crop[3] * f] for p in patches])


def _to_frame(preds, patches, cell: int) -> torch.Tensor:
    """(4 + nc, N) predictions in frame pixels whose box centre lies in a core of the run that made them."""
    out = []
    for y, p in zip(preds, patches):
        dx, dy = p.crop[1] * cell, p.crop[0] * cell
        inside = torch.zeros(y.shape[1], dtype=torch.bool)
        for core in p.cores:
            cy0, cx0, cy1, cx1 = (v * cell for v in core)
            inside |= (y[0] >= cx0 - dx) & (y[0] < cx1 - dx) & (y[1] >= cy0 - dy) & (y[1] < cy1 - dy)
        y = y[:, inside]  # boolean indexing copies, so the shift below leaves the network's output untouched
        y[0] += dx
        y[1] += dy
        out.append(y)
    return torch.cat(out, 1)


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


def sparse_predict(
    model,
    source,
    *,
    imgsz=None,
    thr: float | None = None,
    patch: int | None = None,
    margin: int = 2,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 1000,
    batch: int = 16,
    heatmap=None,
    sparse_head: bool = False,
    head_dilate: int = HEAD_DILATE,
    prune: bool = True,
    merge_crops: bool = False,
    device="cpu",
) -> list:
    """ESOD sparse inference on each image of ``source``; returns Ultralytics ``Results``.

    Args:
        model: Path (``.pt`` / YAML), ``YOLO``, DetectionModel or a ready :class:`SparseModel`.
        source: Image path, folder, array, or a list of those.
        imgsz (int, optional): Long side of the network input; None keeps the image's own resolution.
        thr (float, optional): Heatmap threshold for patch centres and activated cells; None = the model's
            ``threshold`` (the one ``so-det fit-seeker`` stored, else ESOD's 0.3).
        patch (int | tuple, optional): Patch core size in heatmap cells (``SparseModel.cell`` px, 8 for
            so-det-esod), square or (h, w); None = ESOD's w/8 x h/8 cells
            (:func:`~so_det_ultra.highres.patches.official_patch`).
        margin (int): Context cells added around each core in the crop the network sees.
        conf, iou, max_det: NMS settings, as in ``YOLO.predict``.
        batch (int): Patches per forward pass.
        heatmap (callable, optional): ``heatmap(index, path, input_hw, cells_hw) -> cells_hw tensor`` replacing the
            seeker's (an oracle for benchmarks).
        sparse_head (bool): Evaluate the Detect head only at heatmap centres dilated by ``head_dilate`` cells
            (ESOD's sparse head; :mod:`.sparse_head`) instead of on every cell of each patch.
        prune (bool): Drop patches whose active cells the other patches' cores already hold
            (:func:`~so_det_ultra.highres.patches.select_patches`).
        merge_crops (bool): Run overlapping crops as their common box when it adds no area (:func:`merge_crops`);
            the predictions are the same, the overlap is computed once, but the merged crops have varied shapes and
            are not batched (off by default: slower on the benchmark frames, docs/highres.md).

    Each result has ``speed`` (ms: preprocess, stem, select, patches, postprocess, inference) and ``patches`` (the
    list of :class:`~so_det_ultra.highres.patches.Patch` used, in cells of the letterboxed input).
    """
    from ultralytics.utils.nms import non_max_suppression

    sm = model if hasattr(model, "run_rest") else SparseModel(model, device)  # ours or an exported engine
    thr = sm.threshold if thr is None else thr
    results = []
    for n, (path, img) in enumerate(common.read_images(source)):
        t0 = time.perf_counter()
        x = common.letterbox(img, imgsz, sm.stride, device)
        t1 = time.perf_counter()
        stem_out, prob = sm.run_stem(x)
        if heatmap is not None:
            prob = torch.as_tensor(heatmap(n, path, tuple(x.shape[2:]), tuple(prob.shape)), dtype=prob.dtype)
        t2 = time.perf_counter()
        p = patch or official_patch(tuple(prob.shape), sm.align)
        corners = select_patches(prob, thr, p, sm.align, prune)
        patches = make_patches(corners, prob.shape, p, margin, sm.align)
        head_mask = _centre_mask(prob, thr, head_dilate) if sparse_head else None
        t3 = time.perf_counter()
        raw = run_patches(sm, stem_out, patches, batch, head_mask, merge_crops)
        t4 = time.perf_counter()
        det = non_max_suppression(raw, conf, iou, max_det=max_det, max_time_img=60.0)[0]
        speed = {
            "preprocess": t1 - t0,
            "stem": t2 - t1,
            "select": t3 - t2,
            "patches": t4 - t3,
            "postprocess": time.perf_counter() - t4,
        }
        speed = {k: v * 1000 for k, v in speed.items()}
        speed["inference"] = speed["stem"] + speed["select"] + speed["patches"]
        res = common.to_results(det, img, path, sm.names, tuple(x.shape[2:]), speed)
        res.patches = patches
        results.append(res)
    return results
