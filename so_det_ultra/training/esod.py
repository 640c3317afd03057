"""ESOD's patch training: the detector learns on uniform patches of the frame, as the official recipe does.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3;
official code github alibaba/esod (commit bde3571): ``models/common.py`` ``HeatMapParser.uni_slicer`` (lines
526-567), ``models/yolo.py`` ``Model.forward_once`` (line 422), ``utils/loss.py`` ``build_patch_targets`` (line 248)
and ``ComputeLoss.__call__`` (``loss * bs``, lines 177-191), ``train.py`` (warm-up, lines 262, 275, 307, 340).
Recipe and options: docs/highres.md, "Training the official way".

Ours, selected by the model YAML and run by the stock ``yolo train``::

    esod_train:
      patch: 8            # patches per side (official ratio 8); the patch side must be a multiple of the max stride
      warmup_epochs: 3    # warm-up epochs, counted while epoch < min(warmup_epochs, 0.6 * epochs)
      warmup_keep: all    # all (official: every uniform patch, always) or gt (ground-truth patches during warm-up)

The training forward runs every layer up to the :class:`~so_det_ultra.nn.esod.ObjectSeeker` on the whole image, cuts
every stem output that later layers read into the uniform grid (so-det-esod: backbone P2 and P3), runs the remaining
layers on the patches, and hands :class:`~so_det_ultra.losses.esod.ESODLoss` the patch predictions with their origins
and the full-frame seeker logits. Validation (eval mode) stays dense.
"""

from __future__ import annotations

import numpy as np
import torch

from so_det_ultra.losses.config import loss_config
from so_det_ultra.losses.esod import ESODLoss, heatmap_target
from so_det_ultra.nn.esod import SEEK_KEY
from so_det_ultra.nn.graph import layer_inputs, model_stride, run_layers, seeker_index, stem_reads

KEY = "esod_train"  # model-YAML key
DEFAULTS = {"patch": 8, "warmup_epochs": 3, "warmup_keep": "all"}
KEEP = ("all", "gt")


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


def describe(cfg: dict) -> str:
    """One line saying what the training forward does with ``cfg`` (logged when training starts)."""
    warm = (
        f"ground-truth patches only in the first {cfg['warmup_epochs']} epochs, then all"
        if cfg["warmup_keep"] == "gt"
        else "all kept in every epoch"
    )
    return f"{cfg['patch']}x{cfg['patch']} uniform patches per image ({warm}); validation dense"


def uniform_origins(batch_size: int, hw: tuple[int, int], grid: int, max_stride: int) -> tuple[torch.Tensor, tuple]:
    """(B * grid^2, 3) ``image, y0, x0`` of the uniform ``grid x grid`` patches of each image, and the patch (h, w).

    Patches are ordered image-major, then row, then column (``uni_slicer`` chunks rows, then columns). The patch side
    must be a multiple of ``max_stride`` so the deepest feature grid of a patch lines up with the frame's.
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
    img = batch["img"]
    h, w = img.shape[2:]
    if not len(batch["bboxes"]):
        return torch.ones(len(origin), dtype=torch.bool)
    xywh = batch["bboxes"].float().cpu() * torch.tensor([w, h, w, h])
    boxes = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
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


def in_warmup(cfg: dict, epoch: int, epochs: int | None) -> bool:
    """Whether ``epoch`` (0-based) is a warm-up epoch: ``epoch < min(warmup_epochs, 0.6 * epochs)`` (train.py 275)."""
    return epoch < min(cfg["warmup_epochs"], 0.6 * (epochs or float("inf")))


def patch_preds(model, batch: dict, cfg: dict, epoch: int = 0, epochs: int | None = None) -> dict:
    """Training predictions of ``model`` on the uniform patches of ``batch["img"]`` (see the module docstring).

    ``epoch``/``epochs`` (the trainer's) matter only for ``warmup_keep: gt``. Returns the head's training dict for the
    patch batch plus ``"seek"`` (the full-frame logits), ``"patch_origin"`` ((P, 3) image, y0, x0 in pixels) and
    ``"patch_size"`` ((h, w) pixels), which ESODLoss reads.
    """
    layers = list(model.model)
    k = seeker_index(layers, "esod_train (patch training)")
    img = batch["img"]
    y = []
    seek = run_layers(layers[: k + 1], img, y)  # the stem on the whole image
    max_stride = model_stride(model)
    origin, size = uniform_origins(img.shape[0], tuple(img.shape[2:]), cfg["patch"], max_stride)
    keep = None
    if cfg["warmup_keep"] == "gt" and in_warmup(cfg, epoch, epochs):
        keep = gt_patches(batch, origin, size, img.shape[2] // seek.shape[2])
        origin = origin[keep]
    needed = stem_reads(layers, k)
    crops = [_select(cut(t, cfg["patch"]), keep) if j in needed else None for j, t in enumerate(y)]
    x = crops[-1]
    for m in layers[k + 1 :]:
        x = m(layer_inputs(m, x, crops))
        crops.append(x)
    return {**x, SEEK_KEY: seek, "patch_origin": origin.to(img.device), "patch_size": size}


def _select(t, keep):
    return t if keep is None else t[keep.to(t.device)]


# --- trainer callbacks (registered by so_det_ultra.integration.esod) -------------------------------------------------


def esod_criteria(models) -> list[ESODLoss]:
    """The ESODLoss criteria of ``models`` (the trained model and its EMA; None skipped), built if not yet."""
    out = []
    for m in models:
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
    cls = [np.asarray(lb["cls"]).reshape(-1) for lb in getattr(dataset, "labels", [])]
    cls = np.concatenate(cls).astype(int) if cls else np.zeros(0, int)
    return np.bincount(cls[(cls >= 0) & (cls < nc)], minlength=nc).tolist()


def set_class_ratio(criteria: list[ESODLoss], dataset) -> None:
    """ESODLoss without a YAML ``cls_ratio``: set it from the training labels (every rank reads the full label list)."""
    if not criteria or dataset is None:
        return
    counts = label_counts(dataset, criteria[0].nc)
    for c in criteria:
        c.set_class_counts(counts)


def share_class_ratio(criteria: list[ESODLoss]) -> None:
    """Carry the first criterion's computed ``cls_ratio`` to the others (an EMA rebuilt after train start)."""
    for c in criteria[1:]:
        if criteria[0].cls_ratio is not None and not c.cls_ratio_given:
            c.cls_ratio = criteria[0].cls_ratio
