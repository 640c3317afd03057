"""One entry point for every high-resolution predictor and model format: :func:`open_predictor`.

A :class:`Predictor` loads its model once and predicts many frames. ``model`` may be a ``.pt`` checkpoint, a model
YAML, a ``YOLO``/``DetectionModel``, an exported model that Ultralytics' ``AutoBackend`` loads (``.onnx``, an
OpenVINO ``*_openvino_model/`` folder, a TensorRT ``.engine``) or a sparse export folder written by
:mod:`.export` (``<stem>_sparse_<format>/``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


def default_device():
    """CUDA when available, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


class Predictor:
    """Loads ``model`` once for ``mode`` (sparse, sliced or dense) and predicts lists of BGR frames.

    Attributes:
        names (dict[int, str]): Class names.
        mode (str): The predictor's mode.
    """

    def __init__(self, model, mode: str, device=None, unsafe_load: bool = False, **options):
        if mode not in PREDICTORS:
            raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(PREDICTORS)}")
        self.mode, self.options = mode, options
        self.device = device or default_device()
        self._model, self.names, self._fn = PREDICTORS[mode](model, self.device, unsafe_load)

    def __call__(self, frames: list[np.ndarray], paths: list[str]) -> list:
        """One Ultralytics ``Results`` per frame, ``path`` set from ``paths``."""
        if len(frames) != len(paths):
            raise ValueError(f"got {len(frames)} frames but {len(paths)} paths")
        out = []
        for img, path in zip(frames, paths):
            (res,) = self._fn(self._model, [img], device=self.device, **self.options)
            res.path = str(path)
            out.append(res)
        return out


def _open_sparse(model, device, unsafe_load):
    from so_det_ultra.highres.export import ExportedSparse, is_sparse_export
    from so_det_ultra.highres.sparse import SparseModel, sparse_predict

    if isinstance(model, (str, Path)) and is_sparse_export(model):
        sm = _exported(ExportedSparse, model, device)
        return sm, sm.names, functools.partial(sparse_predict, **_export_defaults(sm.meta))
    sm = SparseModel(_load(model, device, unsafe_load), device)
    return sm, sm.names, sparse_predict


def _exported(cls, folder, device):
    """``cls(folder, device)``; a graph the runtime cannot load (damaged, truncated) is one line naming the folder."""
    from so_det_ultra.highres.export import ExportError

    try:
        return cls(folder, device)
    except (ValueError, OSError, ImportError):
        raise
    except Exception as err:  # ONNX Runtime and OpenVINO raise their own types for a damaged graph
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"{folder}: a graph cannot be loaded ({type(err).__name__}: {why}); re-export it") from err


def _export_defaults(meta: dict) -> dict:
    """The patch geometry and thresholds recorded at export (options given to the predictor override them)."""
    return {k: v for k, v in meta.get("defaults", {}).items() if k in ("thr", "patch", "margin")}


def _open_sliced(model, device, unsafe_load):
    from so_det_ultra.highres.sliced import TileModel, sliced_predict

    m = TileModel(_load(model, device, unsafe_load), device)
    return m, m.names, sliced_predict


def _open_dense(model, device, unsafe_load):
    from so_det_ultra.highres.common import stock_model
    from so_det_ultra.highres.dense import dense_predict

    m = stock_model(model, unsafe_load)  # checkpoints by content through the safe loader, YAMLs held to its rules
    return m, m.names, dense_predict


def _load(model, device, unsafe_load: bool):
    """A checkpoint (recognised by its content, whatever its name) or YAML path loaded by ``common.load_model`` (full
    pickle loading only with ``unsafe_load``); other models (exports, objects) are returned as given."""
    from so_det_ultra.highres import common

    if common.model_kind(model) not in ("checkpoint", "yaml"):
        return model
    return common.load_model(model, device, **({"unsafe_load": True} if unsafe_load else {}))


PREDICTORS = {"sparse": _open_sparse, "sliced": _open_sliced, "dense": _open_dense}


def open_predictor(model, mode: str, device=None, unsafe_load: bool = False, **options) -> Predictor:
    """A :class:`Predictor` for ``model`` in ``mode``; ``options`` are the mode's settings (conf, iou, imgsz, tile...).

    Args:
        model: ``.pt`` / YAML path, ``YOLO``, exported file or folder (see the module docstring).
        mode (str): ``"sparse"``, ``"sliced"`` or ``"dense"``.
        device: Torch device; None picks CUDA when available.
        unsafe_load (bool): Allow full pickle loading of ``.pt`` checkpoints (only for files you trust).
    """
    return Predictor(model, mode, device, unsafe_load, **options)
