"""ESOD's patch training: the detector learns on uniform patches of the frame, as in the official recipe.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3;
official code github alibaba/esod. What the official training does (read from ``models/common.py``
``HeatMapParser``, ``models/yolo.py`` ``Model.forward_once`` / ``Detect``, ``utils/loss.py``
``build_patch_targets``, ``train.py``):

- ``HeatMapParser.uni_slicer``: in training the backbone's P3 features (after the layer the seeker reads) are cut into
  ``ratio x ratio`` equal patches (``ratio`` 8: 64 patches per image, ``torch.chunk`` along H then W; the input must
  be square and its P3 side a multiple of ``4 * ratio``). **Every** patch is kept, whatever the heatmap says; the rest
  of the network runs on the batch of ``bs * 64`` patches.
- ``build_patch_targets``: an object goes to the patch holding its centre, with its box in patch coordinates (not
  clipped); the detection loss is multiplied by the *image* batch size (``ComputeLoss.__call__``: ``bs =
  p_seg[0].shape[0]``). The heatmap loss stays on the seeker's full-frame output.
- Ground-truth masks: while ``ni <= nw`` (the hyp's ``warmup_epochs`` (3.0) x batches per epoch) and ``epoch < 0.6 *
  epochs``, ``train.py`` feeds ``model((imgs, [masks]))``: the ground-truth heatmap replaces the seeker's where a
  heatmap is consumed. In the training forward, the uniform slicer ignores the heatmap and the sparse head is off, so
  this changes nothing there; it decides the patches of the validation run during warm-up (``test.test(use_gt=...)``,
  where the adaptive slicer picks patches from it).

Ours, selected by the model YAML (``esod_train:``) and run by the stock ``yolo train``::

    esod_train:
      patch: 8            # patches per side (official ratio 8); the patch side must be a multiple of the max stride
      warmup_epochs: 3    # ground-truth-mask patches while epoch < min(warmup_epochs, 0.6 * epochs)
      warmup_keep: gt     # gt (ours, below) or all (the official training forward exactly)

The training forward (a recorded patch of ``DetectionModel.loss``, :mod:`so_det_ultra.integration.esod`) runs every
layer up to the :class:`~so_det_ultra.nn.esod.ObjectSeeker` on the whole image, cuts every stem output that later
layers read into the uniform grid (so-det-esod: backbone P2 and P3, and the seeker's logits), runs the remaining
layers on the patches, and hands :class:`~so_det_ultra.losses.esod.ESODLoss` the patch predictions with their origins
and the full-frame seeker logits. Validation (eval mode) stays dense.

Interpretations (the official code leaves these open or differs in structure):
    - the cut is at the seeker's input (backbone P3), as ``HeatMapParser`` cuts layer 4; so-det-esod's neck also reads
      backbone P2, which is cut at the same patch borders;
    - "ground-truth-mask patches during warm-up" (``warmup_keep: gt``): during the warm-up epochs only the patches in
      which the ground-truth heatmap (:func:`~so_det_ultra.losses.esod.heatmap_target` >= 0.5) marks a cell are
      trained on, i.e. the patches a perfect seeker would hand the detector; afterwards every patch, as the official
      uniform slicer. A batch without objects keeps every patch. ``warmup_keep: all`` is the official forward;
    - warm-up counts whole epochs (the official counts batches, ``ni <= nw``).
"""

from __future__ import annotations

import torch

from so_det_ultra.highres.sparse import _inputs, _sources
from so_det_ultra.nn.esod import SEEK_KEY, ObjectSeeker

KEY = "esod_train"  # model-YAML key
DEFAULTS = {"patch": 8, "warmup_epochs": 3, "warmup_keep": "gt"}
KEEP = ("gt", "all")


def train_config(model) -> dict | None:
    """The model YAML's ``esod_train:`` mapping with defaults filled in, None without one; ValueError if malformed."""
    cfg = (getattr(model, "yaml", None) or {}).get(KEY)
    if cfg is None or cfg is False:
        return None
    if cfg is True:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ValueError(f"model YAML `{KEY}:` must be a mapping like {DEFAULTS}, got {cfg!r}")
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"model YAML `{KEY}:` has unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **cfg}
    if not isinstance(cfg["patch"], int) or cfg["patch"] < 1:
        raise ValueError(
            f"model YAML `{KEY}: patch:` must be a positive integer (patches per side), got {cfg['patch']!r}"
        )
    if cfg["warmup_keep"] not in KEEP:
        raise ValueError(f"model YAML `{KEY}: warmup_keep:` must be one of {KEEP}, got {cfg['warmup_keep']!r}")
    return cfg


def uniform_origins(batch_size: int, hw: tuple[int, int], grid: int, max_stride: int) -> tuple[torch.Tensor, tuple]:
    """(B * grid^2, 3) ``image, y0, x0`` of the uniform ``grid x grid`` patches of each image, and the patch (h, w).

    Patches are ordered image-major, then row, then column. The patch side must be a multiple of ``max_stride`` so the
    deepest feature grid of a patch lines up with the frame's.
    """
    h, w = hw
    if h % grid or w % grid or (h // grid) % max_stride or (w // grid) % max_stride:
        raise ValueError(
            f"esod_train: patch={grid} cuts a {h}x{w} input into {h / grid:g}x{w / grid:g} px patches, which must be "
            f"whole multiples of the model's largest stride ({max_stride}); use imgsz a multiple of "
            f"{grid * max_stride} or another `patch:`"
        )
    ph, pw = h // grid, w // grid
    b, r, c = torch.meshgrid(torch.arange(batch_size), torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack((b.flatten(), r.flatten() * ph, c.flatten() * pw), 1), (ph, pw)


def cut(t: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * grid^2, C, H / grid, W / grid) in :func:`uniform_origins` order."""
    b, c, h, w = t.shape
    t = t.reshape(b, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(b * grid * grid, c, h // grid, w // grid)


def gt_patches(batch: dict, origin: torch.Tensor, size: tuple[int, int], cell: int) -> torch.Tensor:
    """(P,) bool: patches in which the ground-truth heatmap marks a cell (all True for a batch without objects)."""
    from ultralytics.utils.ops import xywh2xyxy

    from so_det_ultra.losses.esod import heatmap_target

    img = batch["img"]
    h, w = img.shape[2:]
    if not len(batch["bboxes"]):
        return torch.ones(len(origin), dtype=torch.bool)
    boxes = xywh2xyxy(batch["bboxes"].float().cpu()) * torch.tensor([w, h, w, h])
    idx = batch["batch_idx"].long().view(-1).cpu()
    ph, pw = size
    keep = torch.zeros(len(origin), dtype=torch.bool)
    for i in range(img.shape[0]):
        marked = heatmap_target(boxes[idx == i], (h // cell, w // cell), cell)[0] > 0
        on = origin[:, 0] == i
        for k in on.nonzero().flatten().tolist():
            y0, x0 = int(origin[k, 1]) // cell, int(origin[k, 2]) // cell
            keep[k] = bool(marked[y0 : y0 + ph // cell, x0 : x0 + pw // cell].any())
    return keep


def patch_preds(model, batch: dict, cfg: dict, criterion=None) -> dict:
    """Training predictions of ``model`` on the uniform patches of ``batch["img"]`` (see the module docstring).

    Returns the head's training dict for the patch batch plus ``"seek"`` (the full-frame logits), ``"patch_origin"``
    ((P, 3) image, y0, x0 in pixels) and ``"patch_size"`` ((h, w) pixels), which ESODLoss reads.
    """
    layers = list(model.model)
    k = _seeker_index(layers)
    img = batch["img"]
    y, x = [], img
    for m in layers[: k + 1]:  # the stem on the whole image
        x = m(_inputs(m, x, y))
        y.append(x)
    seek = y[k]
    max_stride = int(max(model.stride.tolist()))
    origin, size = uniform_origins(img.shape[0], tuple(img.shape[2:]), cfg["patch"], max_stride)
    keep = None
    epoch, epochs = getattr(criterion, "epoch", 0), getattr(criterion, "epochs", None) or float("inf")
    if cfg["warmup_keep"] == "gt" and epoch < min(cfg["warmup_epochs"], 0.6 * epochs):
        keep = gt_patches(batch, origin, size, img.shape[2] // seek.shape[2])
        origin = origin[keep]
    rest = layers[k + 1 :]
    needed = {j for m in rest for j in _sources(m) if j <= k}
    crops = [_select(cut(t, cfg["patch"]), keep) if j in needed else None for j, t in enumerate(y)]
    x = crops[-1]
    for m in rest:
        x = m(_inputs(m, x, crops))
        crops.append(x)
    return {**x, SEEK_KEY: seek, "patch_origin": origin.to(img.device), "patch_size": size}


def _select(t, keep):
    return t if keep is None else t[keep.to(t.device)]


def _seeker_index(layers) -> int:
    found = [m.i for m in layers if isinstance(m, ObjectSeeker)]
    if len(found) != 1:
        raise ValueError(
            f"esod_train (patch training) needs exactly one ObjectSeeker layer, found {len(found)}; "
            "use so-det-esod-*.yaml"
        )
    return found[0]


# --- trainer callbacks (registered by so_det_ultra.integration.esod) -------------------------------------------------


def _esod_criteria(trainer):
    """The ESODLoss criteria of the trained model and of its EMA (built if not yet), or []."""
    from ultralytics.utils.torch_utils import unwrap_model

    from so_det_ultra.integration.losses import loss_config
    from so_det_ultra.losses.esod import ESODLoss

    out = []
    for m in (unwrap_model(trainer.model), getattr(getattr(trainer, "ema", None), "ema", None)):
        cfg = loss_config(m) if m is not None else None
        if not cfg or cfg.get("type") != "ESODLoss":
            continue
        if getattr(m, "criterion", None) is None:
            m.criterion = m.init_criterion()
        if isinstance(m.criterion, ESODLoss):
            out.append(m.criterion)
    return out


def label_counts(dataset, nc: int) -> list[int]:
    """Objects per class in an Ultralytics dataset's ``labels`` (each a dict with a ``cls`` array)."""
    import numpy as np

    cls = [np.asarray(lb["cls"]).reshape(-1) for lb in getattr(dataset, "labels", [])]
    cls = np.concatenate(cls).astype(int) if cls else np.zeros(0, int)
    return np.bincount(cls[(cls >= 0) & (cls < nc)], minlength=nc).tolist()


def on_train_start(trainer):
    """ESODLoss without a YAML ``cls_ratio``: set it from the training labels (every rank reads the full label list)."""
    criteria = _esod_criteria(trainer)
    dataset = getattr(getattr(trainer, "train_loader", None), "dataset", None)
    if not criteria or dataset is None:
        return
    counts = label_counts(dataset, criteria[0].nc)
    for c in criteria:
        c.set_class_counts(counts)
        c.epochs = trainer.epochs


def on_train_epoch_start(trainer):
    """Tell the ESODLoss criteria the epoch (patch training's warm-up reads it); carry cls_ratio to a rebuilt EMA."""
    criteria = _esod_criteria(trainer)
    for c in criteria:
        c.epoch, c.epochs = trainer.epoch, trainer.epochs
        if criteria[0].cls_ratio is not None and not c.cls_ratio_given:
            c.cls_ratio = criteria[0].cls_ratio
