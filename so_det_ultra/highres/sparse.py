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
``margin=0`` is that reading); the sparse head's cells are the 3x3 local maxima >= ``thr`` dilated by
``head_dilate`` cells (the paper's sparse head works at "dilated local maxima"; the dilation is not given, 2 cells =
16 px is ours).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from so_det_ultra.highres import common
from so_det_ultra.highres.patches import find_centres, make_patches, select_patches
from so_det_ultra.highres.sparse_head import dilate, sparse_detect
from so_det_ultra.nn.esod import ObjectSeeker, SeekerDetect


class SparseModel:
    """A DetectionModel split at its ObjectSeeker into a full-frame stem and a patch-wise remainder.

    The seeker's stride ``cell`` (pixels per heatmap cell) is measured once, with a forward pass of the stem on a
    blank image, and checked: square, an integer, nesting with the model's largest stride (one divides the other),
    and a multiple of the stride of every stem output that is cropped (those are cut at whole cells).

    Args:
        model: A DetectionModel (or path / YOLO) whose YAML has one ``ObjectSeeker`` layer.

    Attributes:
        cell (int): Seeker stride in input pixels (8 for so-det-esod). align (int): Largest model stride in cells.
    """

    def __init__(self, model, device="cpu"):
        self.model = common.load_model(model, device)
        layers = list(self.model.model)
        found = [m.i for m in layers if isinstance(m, ObjectSeeker)]
        if len(found) != 1:
            raise ValueError(
                f"sparse inference needs exactly one ObjectSeeker layer in the model, found {len(found)}; "
                "use so-det-esod-*.yaml, or sliced inference for models without a seeker"
            )
        self.k = found[0]
        self.stem, self.rest = layers[: self.k + 1], layers[self.k + 1 :]
        self.needed = {j for m in self.rest for j in _sources(m) if j <= self.k}  # stem outputs read later
        self.names = self.model.names
        self.stride = common.model_stride(self.model)
        self.cell, self.factor = self._measure(device)
        self.align = max(self.stride // self.cell, 1)  # cells per largest stride: corners snap to the deepest grid

    @torch.no_grad()
    def _measure(self, device) -> tuple[int, dict]:
        """Seeker stride in pixels and, per cropped stem output, its map cells per heatmap cell (one stem forward)."""
        size = 2 * self.stride
        ch = (getattr(self.model, "yaml", None) or {}).get("channels", 3)
        y, _ = self.run_stem(torch.zeros(1, ch, size, size, device=device))
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
    def run_stem(self, x: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Outputs of the stem layers on the full frame and the heatmap (H/cell, W/cell) in [0, 1]."""
        y = []
        for m in self.stem:
            x = _inputs(m, x, y)
            x = m(x)
            y.append(x)
        return y, x[0, 0].sigmoid()

    @torch.no_grad()
    def run_patches(
        self, stem_out: list, image_hw: tuple[int, int], patches, batch: int = 16, head_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw Detect output (1, 4 + nc, N) in frame pixels for anchors whose box centre lies in a patch core.

        ``head_mask`` (H/cell, W/cell) bool switches on the sparse head: Detect is evaluated only at those cells.
        """
        outs = []
        for i in range(0, len(patches), batch):
            chunk = patches[i : i + batch]
            outs.extend(self._to_frame(self._run_chunk(stem_out, image_hw, chunk, head_mask), chunk))
        if not outs:
            return torch.zeros(1, 4 + len(self.names), 0)
        return torch.cat(outs, 1)[None]

    def _run_chunk(self, stem_out, image_hw, chunk, head_mask):
        """Per-crop (4 + nc, A) predictions in crop pixels."""
        crops = [self._crop(t, self.factor[j], chunk) if j in self.needed else None for j, t in enumerate(stem_out)]
        y = crops[-1]
        for m in self.rest[:-1]:
            y = m(_inputs(m, y, crops))
            crops.append(y)
        head = self.rest[-1]
        feats = _inputs(head, y, crops)
        if head_mask is not None:
            feats = head.split(feats)[0] if isinstance(head, SeekerDetect) else feats
            return sparse_detect(head, feats, _level_masks(head_mask, chunk, feats))
        pred = head(feats)
        return list(pred[0] if isinstance(pred, (tuple, list)) else pred)

    @staticmethod
    def _crop(t, f, patches):
        """The crops of ``patches`` (in heatmap cells) from a stem output with ``f`` map cells per heatmap cell."""
        return torch.cat([t[..., p.crop[0] * f : p.crop[2] * f, p.crop[1] * f : p.crop[3] * f] for p in patches])

    def _to_frame(self, preds, patches):
        out = []
        for y, p in zip(preds, patches):
            y = y.clone()
            y[0] += p.crop[1] * self.cell
            y[1] += p.crop[0] * self.cell
            cy0, cx0, cy1, cx1 = (v * self.cell for v in p.core)
            inside = (y[0] >= cx0) & (y[0] < cx1) & (y[1] >= cy0) & (y[1] < cy1)
            out.append(y[:, inside])
        return out


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


def _sources(m):
    """Absolute indices of the layers ``m`` reads (a negative ``from`` counts back: -1 is the previous layer)."""
    return [m.i + j if j < 0 else j for j in ([m.f] if isinstance(m.f, int) else m.f)]


def _inputs(m, x, y):
    """The input of layer ``m`` given the previous output ``x`` and all outputs ``y`` (Ultralytics' ``from`` rule)."""
    if m.f == -1:
        return x
    return y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]


def _centre_mask(prob, thr, r):
    mask = torch.zeros(prob.shape, dtype=torch.bool)
    c = find_centres(prob, thr)
    mask[c[:, 0], c[:, 1]] = True
    return dilate(mask[None], r)[0]


def default_patch(cells_w: int, align: int) -> int:
    """ESOD's default patch: an eighth of the frame width in heatmap cells, rounded to ``align`` (at least 4 aligns)."""
    return max(round(cells_w / 8 / align) * align, 4 * align)


def sparse_predict(
    model,
    source,
    *,
    imgsz=None,
    thr: float = 0.5,
    patch: int | None = None,
    margin: int = 2,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 1000,
    batch: int = 16,
    heatmap=None,
    sparse_head: bool = False,
    head_dilate: int = 2,
    prune: bool = True,
    device="cpu",
) -> list:
    """ESOD sparse inference on each image of ``source``; returns Ultralytics ``Results``.

    Args:
        model: Path (``.pt`` / YAML), ``YOLO``, DetectionModel or a ready :class:`SparseModel`.
        source: Image path, folder, array, or a list of those.
        imgsz (int, optional): Long side of the network input; None keeps the image's own resolution.
        thr (float): Heatmap threshold for patch centres and activated cells.
        patch (int, optional): Patch core size in heatmap cells (``SparseModel.cell`` px, 8 for so-det-esod);
            None = width / 8 (ESOD's choice).
        margin (int): Context cells added around each core in the crop the network sees.
        conf, iou, max_det: NMS settings, as in ``YOLO.predict``.
        batch (int): Patches per forward pass.
        heatmap (callable, optional): ``heatmap(index, path, input_hw, cells_hw) -> cells_hw tensor`` replacing the
            seeker's (an oracle for benchmarks).
        sparse_head (bool): Evaluate the Detect head only at heatmap centres dilated by ``head_dilate`` cells
            (ESOD's sparse head; :mod:`.sparse_head`) instead of on every cell of each patch.
        prune (bool): Drop patches whose active cells the other patches' cores already hold
            (:func:`~so_det_ultra.highres.patches.select_patches`).

    Each result has ``speed`` (ms: preprocess, stem, select, patches, postprocess, inference) and ``patches`` (the
    list of :class:`~so_det_ultra.highres.patches.Patch` used, in cells of the letterboxed input).
    """
    from ultralytics.utils.nms import non_max_suppression

    sm = model if isinstance(model, SparseModel) else SparseModel(model, device)
    results = []
    for n, (path, img) in enumerate(common.read_images(source)):
        t0 = time.perf_counter()
        x = common.letterbox(img, imgsz, sm.stride, device)
        t1 = time.perf_counter()
        stem_out, prob = sm.run_stem(x)
        if heatmap is not None:
            prob = torch.as_tensor(heatmap(n, path, tuple(x.shape[2:]), tuple(prob.shape)), dtype=prob.dtype)
        t2 = time.perf_counter()
        p = patch or default_patch(prob.shape[1], sm.align)
        corners = select_patches(prob, thr, p, sm.align, prune)
        patches = make_patches(corners, prob.shape, p, margin, sm.align)
        head_mask = _centre_mask(prob, thr, head_dilate) if sparse_head else None
        t3 = time.perf_counter()
        raw = sm.run_patches(stem_out, tuple(x.shape[2:]), patches, batch, head_mask)
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
