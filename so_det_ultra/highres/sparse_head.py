"""ESOD's sparse detection head: an Ultralytics ``Detect`` evaluated only at chosen grid cells.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3 (sparse
detection head; official code github alibaba/esod; docs/highres.md): the head's convs are evaluated only at dilated
local maxima of the seeker's heatmap (official: the 3x3 maxima >= 0.3 dilated 3x3, :data:`HEAD_DILATE`). The results
at the chosen cells are exactly those of the dense head (same weights, same zero padding at the map border): each conv
of a branch is computed only where a later layer needs it (the chosen cells dilated by the receptive radius still to
come), as one matrix product over the gathered k x k windows.

Works with Ultralytics' ``Detect`` (one-to-many branch, ``cv2`` box and ``cv3`` class branches made of stride-1
``Conv``/``DWConv``/``nn.Conv2d``, fused or not); end-to-end (one-to-one) heads are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Official: the centres (3x3 maxima >= 0.3) grown by a 3x3 max-pool, i.e. 1 cell each way (models/yolo.py,
# Detect.get_indices, lines 69-100; deeper levels max-pool the mask to their stride, then grow it 3x3 again).
HEAD_DILATE = 1


def leaves(module: nn.Module) -> list[nn.Module]:
    """The conv layers of a branch in execution order (nested ``nn.Sequential`` flattened)."""
    if isinstance(module, nn.Sequential):
        return [leaf for m in module for leaf in leaves(m)]
    conv = getattr(module, "conv", module)
    if (
        not isinstance(conv, nn.Conv2d)
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.padding != (conv.kernel_size[0] // 2,) * 2
        or conv.kernel_size[0] != conv.kernel_size[1]
    ):
        raise ValueError(f"sparse head supports stride-1 'same' square convs only, got {module}")
    return [module]


def _apply(leaf: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The conv (+ BN + activation) of ``leaf`` on gathered windows ``rows`` (N, k*k, C): (N, C_out)."""
    conv = getattr(leaf, "conv", leaf)
    n, kk, c = rows.shape
    g, w = conv.groups, conv.weight  # (C_out, C / g, k, k)
    if g == 1:  # dense conv: one matrix product, weight reordered to the rows' (k*k, C) layout
        out = rows.reshape(n, -1) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T
    elif g == c == w.shape[0]:  # depthwise
        out = (rows * w.view(c, kk).T).sum(1)
    else:
        out = torch.einsum("nkgi,goik->ngo", rows.view(n, kk, g, c // g), w.view(g, -1, c // g, kk)).reshape(n, -1)
    out = out if conv.bias is None else out + conv.bias
    if conv is not leaf:  # Ultralytics Conv: BN unless fused, then the activation
        out = out[:, :, None, None]
        out = leaf.act(leaf.bn(out) if hasattr(leaf, "bn") else out)[:, :, 0, 0]
    return out


def dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, W) bool mask grown by ``r`` cells in every direction (a (2r+1)^2 square)."""
    return mask if r == 0 else F.max_pool2d(mask[:, None].float(), 2 * r + 1, 1, r)[:, 0] > 0


def _windows(p: torch.Tensor, idx: torch.Tensor, r: int) -> torch.Tensor:
    """(N, (2r+1)^2, C) windows around cells ``idx`` (N, 3: b, y, x) of a channels-last map ``p`` padded by ``r``."""
    if r == 0:
        return p[idx[:, 0], idx[:, 1], idx[:, 2]][:, None]
    k = 2 * r + 1
    _, hp, wp, c = p.shape
    corner = (idx[:, 0] * hp + idx[:, 1]) * wp + idx[:, 2]  # window top-left in the padded map
    offsets = (torch.arange(k, device=p.device)[:, None] * wp + torch.arange(k, device=p.device)).flatten()
    return p.reshape(-1, c)[(corner[:, None] + offsets).flatten()].view(len(idx), k * k, c)


def _padded(values: torch.Tensor, idx: torch.Tensor, shape: tuple, r: int) -> torch.Tensor:
    """A channels-last (B, H + 2r, W + 2r, C) map holding ``values`` at cells ``idx``, zero on its r-wide border.

    Other inner cells are left uninitialised: the next layer only reads the cells computed for it.
    """
    b, h, w = shape
    p = values.new_empty(b, h + 2 * r, w + 2 * r, values.shape[1])
    if r:
        p[:, :r], p[:, -r:], p[:, :, :r], p[:, :, -r:] = 0, 0, 0, 0
    p[idx[:, 0], idx[:, 1] + r, idx[:, 2] + r] = values
    return p


def branch_at(branch: nn.Module, x: torch.Tensor, mask: torch.Tensor, cells: dict | None = None) -> torch.Tensor:
    """``branch(x)`` at the cells of ``mask`` (B, H, W): (N, C_out) in ``mask.nonzero()`` order.

    Maps are kept channels-last between layers, so a window is k*k contiguous rows (a cheap gather). ``cells`` caches
    the dilated masks' cell indices by radius (share it between branches reading the same map).
    """
    cells = {} if cells is None else cells
    layers = leaves(branch)
    radii = [getattr(m, "conv", m).kernel_size[0] // 2 for m in layers]
    r = radii[0]
    p = F.pad(x.permute(0, 2, 3, 1), (0, 0, r, r, r, r))
    for j, leaf in enumerate(layers):
        grow = sum(radii[j + 1 :])
        if grow not in cells:
            cells[grow] = dilate(mask, grow).nonzero()
        out = _apply(leaf, _windows(p, cells[grow], radii[j]))
        if j < len(layers) - 1:
            p = _padded(out, cells[grow], mask.shape, radii[j + 1])
    return out


def sparse_detect(det: nn.Module, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Decoded predictions of ``Detect`` ``det`` at the masked cells, per image: a list of (4 + nc, N_b) tensors.

    Rows are xywh in input pixels and class probabilities, as in the dense ``Detect`` output.
    """
    from ultralytics.utils.tal import dist2bbox

    if getattr(det, "end2end", False):
        raise ValueError("sparse head: end-to-end (one-to-one) Detect heads are not supported; use sparse_head=False")
    b = feats[0].shape[0]
    per_image = [[] for _ in range(b)]
    for i, (x, mask) in enumerate(zip(feats, masks)):
        idx = mask.nonzero()
        if not len(idx):
            continue
        cells = {0: idx}
        box = branch_at(det.cv2[i], x, mask, cells)  # (N, 4 * reg_max)
        cls = branch_at(det.cv3[i], x, mask, cells)  # (N, nc)
        anchors = idx[:, [2, 1]].T.to(box.dtype) + 0.5  # (2, N) x, y in cells
        dist = det.dfl(box.T[None])[0]  # (4, N)
        xywh = not getattr(det, "xyxy", False)
        pred = torch.cat((dist2bbox(dist, anchors, xywh=xywh, dim=0) * det.stride[i], cls.T.sigmoid()), 0)
        for n in range(b):
            per_image[n].append(pred[:, idx[:, 0] == n])
    return [torch.cat(p, 1) if p else feats[0].new_zeros(4 + det.nc, 0) for p in per_image]
