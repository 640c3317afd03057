"""Sliced (tiled) inference: run the detector on overlapping native-resolution tiles of a large frame, then merge.

Sources:
    - SAHI: F. C. Akyon, S. O. Altinuc, A. Temizel, "Slicing Aided Hyper Inference and Fine-tuning for Small Object
      Detection", ICIP 2022. Overlapping slices, an optional full-frame ("standard") prediction, and merging of the
      per-slice detections by NMS or greedy non-maximum merging (NMM).
    - SODA-D protocol: G. Cheng et al., "Towards Large-Scale Small Object Detection: Survey and Benchmarks", TPAMI 2023.
      High-resolution images are cut into 800x800 patches with 150 px overlap and patch detections are merged with NMS
      at IoU 0.5; ``tile=800, overlap=150 / 800, full_frame=False, merge="nms", merge_iou=0.5`` follows it (the grid:
      :mod:`so_det_ultra.data.tiling`, shared with the SODA-D converter).

Interpretations (ours, not prescribed by either source):
    - Windows: a regular grid with step ``tile - round(overlap * tile)``; the last row/column is shifted back to end on
      the border (as SAHI's ``get_slice_bboxes`` in ``sahi/slicing.py``), so no tile is padded with content that is not
      in the frame.
    - Each tile is fed at native resolution, only padded (letterboxed) to a multiple of the model stride.
    - Per-tile NMS uses the same ``conf``/``iou``/``agnostic`` as the final merge; ``merge_iou`` is separate.
    - The full-frame pass is skipped when a single window already covers the whole frame (as SAHI does).

Example:
    >>> from so_det_ultra.highres.sliced import sliced_predict, tile_windows
    >>> tile_windows(1000, 1500, tile=640, overlap=0.2)[:2]
    [(0, 0, 640, 640), (512, 0, 1152, 640)]
    >>> results = sliced_predict("so-det-n.pt", "frame_4k.jpg", tile=640)  # doctest: +SKIP
    >>> results[0].boxes.xyxy.shape, results[0].n_tiles  # doctest: +SKIP
    (torch.Size([N, 4]), 28)
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import numpy as np
import torch

from so_det_ultra.data import tiling
from so_det_ultra.highres import common
from so_det_ultra.nn.graph import model_stride

Window = tuple[int, int, int, int]


def tile_windows(height: int, width: int, tile: int = 640, overlap: float = 0.2) -> list[Window]:
    """Overlapping ``(x0, y0, x1, y1)`` pixel windows covering a ``height`` x ``width`` frame, row by row.

    The grid of :func:`so_det_ultra.data.tiling.tile_windows` (shared with the SODA-D converter), with the overlap
    given as a fraction of ``tile`` (SAHI's ``overlap_*_ratio``) and rounded to pixels.

    Args:
        height (int): Frame height in pixels.
        width (int): Frame width in pixels.
        tile (int): Window side in pixels; a frame side shorter than ``tile`` gives one window spanning that side.
        overlap (float): Fraction of ``tile`` shared by neighbouring windows, in [0, 1).

    Returns:
        (list[tuple[int, int, int, int]]): Windows inside the frame, no duplicates; the last row/column ends on the
            border, so it may overlap its neighbour by more than ``overlap``.
    """
    if tile < 1 or not 0 <= overlap < 1 or height < 1 or width < 1:
        raise ValueError(
            f"need tile >= 1, 0 <= overlap < 1 and a non-empty frame; got {tile=}, {overlap=}, frame {height}x{width}"
        )
    return tiling.tile_windows(height, width, tile, tiling.overlap_pixels(tile, overlap))


def sliced_predict(
    model,
    source,
    *,
    tile: int = 640,
    overlap: float = 0.2,
    full_frame: bool = True,
    imgsz: int = 640,
    conf: float = 0.25,
    iou: float = 0.5,
    merge: str = "nms",
    merge_iou: float = 0.5,
    agnostic: bool = False,
    max_det: int = 10000,
    max_det_tile: int | None = 1000,
    batch: int = 4,
    device="cpu",
) -> list:
    """Detect on overlapping tiles of each image (plus, optionally, the whole frame) and merge the detections.

    Args:
        model: A ``.pt`` checkpoint or model YAML path, a ``YOLO``, a ``DetectionModel``, an Ultralytics export
            (``.onnx``, OpenVINO folder, ``.engine``, ...), or a :class:`TileModel`.
        source: An image path, folder, BGR array, or a list of those (see ``common.read_images``).
        tile (int): Tile side in pixels; tiles are fed at native resolution.
        overlap (float): Fraction of ``tile`` shared by neighbouring tiles.
        full_frame (bool): Also detect on the whole frame letterboxed to ``imgsz`` (SAHI's "standard prediction"),
            which recovers objects larger than a tile.
        imgsz (int): Long side of the full-frame pass.
        conf (float): Confidence threshold of every pass.
        iou (float): IoU threshold of the per-pass NMS.
        merge (str): ``"nms"`` or ``"nmm"`` (greedy non-maximum merging), applied across tiles and the full frame.
        merge_iou (float): Overlap threshold of ``merge`` (IoU for NMS, intersection over smaller box for NMM).
        agnostic (bool): Class-agnostic NMS and merging.
        max_det (int): Maximum detections per image, after merging (high: crowded drone frames hold 1000+ objects).
        max_det_tile (int, optional): Maximum detections per pass (each tile and the full frame), after its NMS, as
            SAHI caps each slice; None: no cap.
        batch (int): Tiles per forward pass (a fixed-batch export runs its own batch size, padded). On a CPU,
            ``batch=1`` can be faster: a batch of 4 640-px tiles ran 1.2-1.9x slower than 4 single passes on a 2-core
            CPU (large activations leave the caches).
        device: Torch device.

    Returns:
        (list[Results]): One per image, boxes in original-image pixels; ``speed`` holds ms per stage ("preprocess",
            "inference", "postprocess") summed over the passes, ``n_tiles`` the number of tiles (full frame excluded)
            and ``full_frame`` whether the full-frame pass ran (like ``speed``, neither is carried over by
            ``Results.cpu()``/``.numpy()``).
    """
    if merge not in common.MERGERS:
        raise ValueError(f"unknown merge {merge!r}; choose one of {sorted(common.MERGERS)}")
    model = model if isinstance(model, TileModel) else TileModel(model, device)
    per_pass = sys.maxsize if max_det_tile is None else max_det_tile
    opts = dict(conf=conf, iou=iou, agnostic=agnostic, max_det=per_pass, device=device)
    out = []
    for path, img in common.read_images(source):
        speed = dict(preprocess=0.0, inference=0.0, postprocess=0.0)
        windows = tile_windows(*img.shape[:2], tile=tile, overlap=overlap)
        det = [d for chunk in _chunks(windows, batch) for d in _detect_tiles(model, img, chunk, speed, **opts)]
        frame_pass = full_frame and len(windows) > 1
        if frame_pass:
            det.append(_detect_frame(model, img, imgsz, speed, **opts))
        t = time.perf_counter()
        det = common.merge(torch.cat(det), merge, iou=merge_iou, agnostic=agnostic, max_det=max_det)
        speed["postprocess"] += _ms(t)
        res = common.to_results(det, img, path, model.names, speed=speed)
        res.n_tiles, res.full_frame = len(windows), frame_pass
        out.append(res)
    return out


class TileModel:
    """A detector fed whole tiles: a PyTorch model (``common.load_model``), an ONNX or OpenVINO export, or any other
    export Ultralytics' ``AutoBackend`` loads.

    - PyTorch models run through ``AutoBackend`` (the memory layout of ``YOLO.predict``); tiles are letterboxed to a
      multiple of the model's own largest stride (``AutoBackend`` would round it up to 32), the stride its exports
      record, so the ``.pt`` and its exports see the same inputs.
    - ``.onnx`` files and OpenVINO folders run through :mod:`.runtimes` with the settings of the exported sparse
      engine (FP32, ``threads``); whether the input is dynamic, and its fixed shape if not, are read from the graph;
      names and stride from the export's Ultralytics metadata. A fixed-batch graph is fed its batch (split, the
      last batch padded).
    - Other exports (TensorRT ``.engine``, ...) run through ``AutoBackend``; their shape comes from the metadata
      Ultralytics writes (``args.dynamic``, ``imgsz``).

    A fixed-shape export (Ultralytics' default, ``dynamic=False``) gets every tile letterboxed to that shape (square
    padding instead of the minimal rectangle), so its boxes can differ slightly from the ``.pt``'s near padded borders;
    export with ``dynamic=True`` to feed the same inputs as PyTorch.

    Attributes:
        names (dict[int, str]): Class names. stride (int): Largest stride. shape (tuple | None): Fixed input (h, w).
    """

    def __init__(self, model, device="cpu", threads: int | None = None):
        from ultralytics.nn.autobackend import AutoBackend

        self.device = torch.device(device)
        graph = _graph_file(model)
        if graph is not None:
            self.net = _GraphDetector(graph, device, threads)
            self.shape, self.stride, self.names = self.net.shape, self.net.stride, self.net.names
            return
        if _is_export(model):
            self.net = AutoBackend(str(model), device=self.device, verbose=False)
            meta = self.net.metadata or {}
            dynamic = (meta.get("args") or {}).get("dynamic", meta.get("dynamic"))  # Ultralytics writes it in args
            self.shape = None if dynamic else tuple(meta.get("imgsz", (640, 640)))
            self.stride = int(max(torch.as_tensor(self.net.stride).reshape(-1).tolist()))
        else:  # loaded here (safe loading), then AutoBackend's channels-last layout on x86 CPUs, as YOLO.predict
            loaded = common.load_model(model, device)
            self.net = AutoBackend(loaded, device=self.device, verbose=False)
            self.shape, self.stride = None, model_stride(loaded)
        self.names = self.net.names

    def letterbox(self, img: np.ndarray, imgsz: int | None) -> torch.Tensor:
        """(1, 3, H, W) input for ``img``: the minimal letterbox, or the export's fixed shape."""
        if self.shape is None:
            return common.letterbox(img, imgsz, self.stride, self.device)
        from ultralytics.data.augment import LetterBox

        lb = LetterBox(new_shape=self.shape, auto=False)(image=img)
        x = torch.from_numpy(np.ascontiguousarray(lb[..., ::-1].transpose(2, 0, 1))).to(self.device)
        return x.float().div_(255).unsqueeze(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded predictions (B, 4 + nc, A) in ``x``'s pixels."""
        y = self.net(x)
        return y[0] if isinstance(y, (tuple, list)) else y


class _GraphDetector:
    """An Ultralytics ONNX or OpenVINO detection export run by :func:`~so_det_ultra.highres.runtimes.open_graph`."""

    def __init__(self, graph: Path, device, threads: int | None):
        from so_det_ultra.highres.runtimes import open_graph

        self.graph = open_graph(graph, device=device, threads=threads)
        meta = _export_metadata(self.graph, graph)
        self.names = {int(k): v for k, v in meta.get("names", {}).items()} or {0: "object"}
        self.stride = int(meta.get("stride", 32))
        self.shape = self.graph.fixed_hw()
        self.batch = self.graph.inputs[next(iter(self.graph.inputs))][0]  # None: any batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().cpu().numpy()
        name = next(iter(self.graph.inputs))
        if self.batch is None or len(x) == self.batch:
            return torch.from_numpy(self.graph({name: x})[0])
        outs = []
        for i in range(0, len(x), self.batch):  # a fixed-batch graph: its own batch, the last one padded
            part = x[i : i + self.batch]
            pad = np.zeros((self.batch - len(part), *x.shape[1:]), x.dtype)
            outs.append(self.graph({name: np.concatenate([part, pad])})[0][: len(part)])
        return torch.from_numpy(np.concatenate(outs))


def _graph_file(model) -> Path | None:
    """The ``.onnx`` file or OpenVINO ``.xml`` of an export path (a file, or an ``*_openvino_model`` folder)."""
    if not isinstance(model, (str, Path)):
        return None
    p = Path(model)
    if p.suffix in (".onnx", ".xml") and p.is_file():
        return p
    xml = sorted(p.glob("*.xml")) if p.is_dir() else []
    return xml[0] if len(xml) == 1 and xml[0].with_suffix(".bin").is_file() else None


def _export_metadata(graph, path: Path) -> dict:
    """The metadata Ultralytics writes with an export: the ONNX model's properties (Python literals as strings), or
    ``metadata.yaml`` beside an OpenVINO graph."""
    if graph.runtime == "onnxruntime":
        out = {}
        for k, v in graph.session.get_modelmeta().custom_metadata_map.items():
            try:
                out[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                out[k] = v
        return out
    sidecar = path.parent / "metadata.yaml"
    if not sidecar.is_file():
        return {}
    import yaml

    return yaml.safe_load(sidecar.read_text()) or {}


def _is_export(model) -> bool:
    """A path that is not a PyTorch checkpoint or a model YAML: an export for ``AutoBackend``."""
    return isinstance(model, (str, Path)) and Path(model).suffix not in (".pt", ".yaml", ".yml")


def _chunks(windows: list[Window], size: int) -> list[list[Window]]:
    """Consecutive runs of at most ``size`` windows of equal shape (one letterboxed shape per forward pass)."""
    chunks = []
    for w in windows:
        last = chunks[-1] if chunks else None
        if last and len(last) < size and _shape(last[0]) == _shape(w):
            last.append(w)
        else:
            chunks.append([w])
    return chunks


def _shape(w: Window) -> tuple[int, int]:
    return w[3] - w[1], w[2] - w[0]


def _detect_tiles(model, img: np.ndarray, windows: list[Window], speed: dict, device, **nms) -> list[torch.Tensor]:
    """``(N, 6)`` detections of each tile in ``windows``, in frame pixels."""
    t = time.perf_counter()
    x = torch.cat([model.letterbox(img[y0:y1, x0:x1], None) for x0, y0, x1, y1 in windows])
    speed["preprocess"] += _ms(t)
    dets = _infer(model, x, speed, **nms)
    t = time.perf_counter()
    for (x0, y0, x1, y1), d in zip(windows, dets):
        d[:, :4] = tiling.to_frame(_scale(x, d[:, :4], (y1 - y0, x1 - x0)), (x0, y0, x1, y1))
    speed["postprocess"] += _ms(t)
    return dets


def _detect_frame(model, img: np.ndarray, imgsz: int, speed: dict, device, **nms) -> torch.Tensor:
    """``(N, 6)`` detections of the whole frame letterboxed to ``imgsz``, in frame pixels."""
    t = time.perf_counter()
    x = model.letterbox(img, imgsz)
    speed["preprocess"] += _ms(t)
    (d,) = _infer(model, x, speed, **nms)
    t = time.perf_counter()
    d[:, :4] = _scale(x, d[:, :4], img.shape[:2])
    speed["postprocess"] += _ms(t)
    return d


def _infer(model, x: torch.Tensor, speed: dict, conf: float, iou: float, agnostic: bool, max_det: int):
    """Forward pass and per-image Ultralytics NMS: a list of ``(N, 6)`` tensors in ``x``'s pixels."""
    from ultralytics.utils.nms import non_max_suppression

    t = time.perf_counter()
    with torch.no_grad():
        y = model(x)
    speed["inference"] += _ms(t)
    t = time.perf_counter()
    dets = non_max_suppression(y, conf, iou, agnostic=agnostic, max_det=max_det, max_time_img=1e6)
    speed["postprocess"] += _ms(t)
    return [d.float().cpu() for d in dets]


def _scale(x: torch.Tensor, boxes: torch.Tensor, shape) -> torch.Tensor:
    from ultralytics.utils import ops

    return ops.scale_boxes(tuple(x.shape[2:]), boxes, tuple(shape))


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
