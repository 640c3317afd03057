"""The seeker a frozen detector is fitted with, and the checkpoints it travels in.

Source: Liu et al., "ESOD: Efficient Small Object Detection on High-Resolution Images", IEEE TIP 2024, sec. 3 (the
object seeker: a depthwise 13x13 Conv+BN+SiLU and a 1x1 conv on backbone P3); official code github alibaba/esod.
Inserting one into a model trained without it, and training it alone on frozen features, is ours (an interpretation;
docs/highres.md, "Sparse inference for a model you already trained"). :mod:`.seeker` runs the fit.
"""

from __future__ import annotations

import io
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from so_det_ultra._version import __version__
from so_det_ultra.data._io import atomic_write_bytes
from so_det_ultra.nn.checkpoints import read_checkpoint
from so_det_ultra.nn.esod import SEEKER_STRIDE, ObjectSeeker
from so_det_ultra.nn.graph import insert_layer, model_stride, output_shapes, seeker_index

STAMP_KEY = "so_det_ultra"  # model.yaml key of the version stamp: integration.checkpoint.KEY (a test checks)

# --- the model ----------------------------------------------------------------------------------------------------


def add_seeker(model, layer: int | None = None, k: int = 13) -> int:
    """Index of ``model``'s ObjectSeeker: its own, or a new one inserted to read layer ``layer``.

    ``layer`` None picks the last backbone layer (a row of the YAML's ``backbone:``) with a stride-8 output, the
    backbone P3 ESOD's seeker reads. The new seeker becomes layer ``layer + 1`` with the YAML row ``[layer, 1,
    ObjectSeeker, [k]]``; the later layers move up by one (:func:`~so_det_ultra.nn.graph.insert_layer`). Sparse
    inference then runs layers ``0..layer + 1`` on the full frame and crops the outputs of those that later layers
    read (their strides must divide 8: :class:`so_det_ultra.highres.sparse.SparseModel` checks).

    Raises:
        ValueError: ``layer`` given is not a stride-8 map before the head; no backbone layer has stride 8.
    """
    if any(isinstance(m, ObjectSeeker) for m in model.model):
        return seeker_index(model, "fit-seeker")
    size = 4 * model_stride(model)
    shapes = output_shapes(model.model, size, (model.yaml or {}).get("channels", 3))
    ok = [i for i, s in enumerate(shapes[:-1]) if s is not None and len(s) == 4 and size // s[-1] == SEEKER_STRIDE]
    if layer is None:
        backbone = [i for i in ok if i < len(model.yaml.get("backbone", []))]
        if not backbone:
            raise ValueError(f"no backbone layer has a stride-{SEEKER_STRIDE} output; name one with layer= ({ok})")
        layer = backbone[-1]
    if layer not in ok:
        raise ValueError(f"layer {layer} cannot feed the seeker, which needs a stride-{SEEKER_STRIDE} map: one of {ok}")
    seeker = ObjectSeeker(shapes[layer][1], k).to(next(model.parameters()).device)
    insert_layer(model, seeker, layer + 1, [layer, 1, "ObjectSeeker", [k]])
    return layer + 1


def freeze_all_but_seeker(model, k: int) -> ObjectSeeker:
    """Eval mode everywhere (BatchNorm statistics held), gradients for the seeker's parameters only; the seeker."""
    model.eval().requires_grad_(False)
    seeker = model.model[k]
    seeker.requires_grad_(True)
    return seeker


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise convolution whose weight gradient is computed as one grouped convolution of the input with the
    output gradient (each channel's input correlated with its gradient), and no input gradient (the features are
    frozen). The same gradient as autograd's (tested); 12x faster than PyTorch's depthwise backward for the seeker's
    13x13 kernel on a 1080p frame (41 ms against 516 ms, 128 channels, one thread of a loaded 2-core CPU)."""

    @staticmethod
    def forward(ctx, x, weight, pad: int):
        ctx.save_for_backward(x)
        ctx.pad = pad
        return F.conv2d(x, weight, padding=pad, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        b, c, h, w = x.shape
        p = ctx.pad
        xp = F.pad(x, (p, p, p, p)).transpose(0, 1).reshape(1, c * b, h + 2 * p, w + 2 * p)
        gw = F.conv2d(xp, grad.transpose(0, 1).contiguous(), groups=c)  # (1, c, k, k): sum over the batch
        return None, gw.reshape(c, 1, *gw.shape[2:]), None


def seeker_logits(seeker: ObjectSeeker, feats: torch.Tensor) -> torch.Tensor:
    """``seeker(feats)`` for training: the same function (its BatchNorm in eval mode), with the fast depthwise weight
    gradient of :class:`_DepthwiseConv` and no gradient for ``feats``."""
    conv = seeker.cv1.conv
    y = _DepthwiseConv.apply(feats, conv.weight, conv.padding[0])
    return seeker.cv2(seeker.cv1.act(seeker.cv1.bn(y)))


@torch.no_grad()
def calibrate_bn(seeker: ObjectSeeker, features) -> None:
    """Set the seeker's BatchNorm running statistics to the mean and variance of its depthwise conv's output over
    ``features`` (an iterable of (1, C, h, w) tensors, every cell counted), as a cumulative average (precise BN: Wu &
    Johnson, "Rethinking 'Batch' in BatchNorm", 2021)."""
    bn = seeker.cv1.bn
    n, s1, s2 = 0, 0.0, 0.0
    for f in features:
        y = seeker.cv1.conv(f).double()
        n += y.shape[0] * y.shape[2] * y.shape[3]
        s1 = s1 + y.sum((0, 2, 3))
        s2 = s2 + (y * y).sum((0, 2, 3))
    if n:
        mean = s1 / n
        bn.running_mean.copy_(mean)
        bn.running_var.copy_((s2 / n - mean * mean).clamp(min=0) * n / max(n - 1, 1))


# --- checkpoints ----------------------------------------------------------------------------------------------------


def round_like_checkpoint(seeker: ObjectSeeker, ckpt: dict) -> None:
    """Round the seeker's weights to the dtype the checkpoint stores (fp16 for Ultralytics' own) and back."""
    dtype = _stored_dtype(ckpt)
    with torch.no_grad():
        for t in list(seeker.parameters()) + list(seeker.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))


def _stored_dtype(ckpt: dict) -> torch.dtype:
    m = ckpt.get("ema") or ckpt.get("model")
    return next(m.parameters()).dtype if isinstance(m, torch.nn.Module) else torch.float16


def load_checkpoint(path, unsafe: bool = False) -> tuple[dict, torch.nn.Module]:
    """``(checkpoint dict, model in float32)`` of an Ultralytics detection checkpoint (``ema``, else ``model``).

    Read by content whatever the file is called, weights-only unless ``unsafe``
    (:func:`so_det_ultra.nn.checkpoints.read_checkpoint`): a pickle that would run code is refused.

    Raises:
        ValueError: the file is no loadable checkpoint, or holds no detection model (a classifier, RT-DETR ...).
    """
    from ultralytics.nn.modules import Detect

    ckpt, model = read_checkpoint(Path(path), unsafe=unsafe)
    head = model.model[-1]
    if not isinstance(head, Detect) or type(head).__name__ in ("Segment", "Pose", "OBB", "YOLOEDetect"):
        raise ValueError(
            f"{path}: fit-seeker needs a detection model with a Detect head, got {type(head).__name__}; sparse "
            "inference runs detection models only"
        )
    return ckpt, deepcopy(model).float().eval()


def write_checkpoint(ckpt: dict, model, out, info: dict, replace: bool = True) -> Path:
    """Write ``model`` into a copy of checkpoint dict ``ckpt`` at ``out`` (an exclusive temporary file in the same
    folder, then renamed), as Ultralytics writes a finished training's checkpoint: the model in the stored dtype in
    place of the input's ``model``/``ema``, no optimizer state, ``epoch`` -1, ``date`` and ``version``
    (Ultralytics') stamped, the package version in the model YAML, and ``fit_seeker`` holding ``info``. With
    ``replace=False`` a file that appeared at ``out`` meanwhile (another run's) is kept: FileExistsError."""
    import ultralytics

    out = Path(out)
    saved = deepcopy(model).to(_stored_dtype(ckpt)).requires_grad_(False)
    if isinstance(saved.yaml, dict):
        saved.yaml[STAMP_KEY] = __version__
    new = dict(ckpt)
    for key in ("model", "ema"):
        if isinstance(ckpt.get(key), torch.nn.Module):
            new[key] = saved
    new.update(
        epoch=-1,
        optimizer=None,
        date=datetime.now().isoformat(),
        version=ultralytics.__version__,
        fit_seeker=info,
    )
    buffer = io.BytesIO()
    torch.save(new, buffer)
    try:  # complete or not at all; a link at ``out`` is replaced, not followed
        atomic_write_bytes(out, buffer.getvalue(), replace)
    except FileExistsError:
        raise FileExistsError(
            f"{out} was created by something else while the seeker was fitted; it is kept and nothing was written "
            "(give another out, or force=True / --force to replace it)"
        ) from None
    return out
