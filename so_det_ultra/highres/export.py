"""Sparse (ESOD) export: two graphs and a metadata file that ONNX Runtime, OpenVINO or TensorRT run outside PyTorch.

``so-det export --sparse --model best.pt --format onnx|openvino|engine`` writes ``<ckpt dir>/<stem>_sparse_<format>/``
(next to the checkpoint, as Ultralytics' own exports are):

- ``stem.onnx``: the layers up to the ObjectSeeker on the full letterboxed frame (``images``: 1 x 3 x H x W, H and W
  dynamic); outputs ``layer<j>``, the stem outputs the later layers read, and the seeker's logits;
- ``rest.onnx``: the remaining layers on a batch of patch crops (inputs ``layer<j>``: B x C x h x w, all dynamic),
  output ``output0``: B x (4 + nc) x A decoded Detect predictions in crop pixels, as Ultralytics' ONNX export gives;
- ``metadata.json``: class names, strides, the seeker's cell, crop factors, default thresholds, versions.

OpenVINO adds ``stem.xml/.bin`` and ``rest.xml/.bin`` converted from the ONNX graphs. ``engine`` keeps the ONNX graphs
(opset 17, dynamic shapes, no custom ops: what TensorRT's ONNX parser takes) and builds ``stem.engine`` and
``rest.engine`` with TensorRT's Python API when ``tensorrt`` is installed; it fails with a message otherwise.

:class:`ExportedSparse` runs such a folder with ONNX Runtime or OpenVINO behind the same interface as
:class:`~so_det_ultra.highres.sparse.SparseModel`, so :func:`~so_det_ultra.highres.sparse.sparse_predict` selects and
merges patches with the same code for both.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

FORMATS = ("onnx", "openvino", "engine")
META = "metadata.json"
OPSET = 17


def export_sparse(model, format: str = "onnx", out=None, force: bool = False) -> Path:
    """Write the sparse export of ``model`` (a ``.pt`` / YAML path or a DetectionModel) and return its folder.

    Args:
        model: An so-det-esod model (one ObjectSeeker layer).
        format (str): ``"onnx"``, ``"openvino"`` or ``"engine"`` (TensorRT).
        out (str | Path, optional): Folder to write; default ``<ckpt dir>/<stem>_sparse_<format>``.
        force (bool): Replace the files this export writes in an existing folder (never anything else).
    """
    import torch

    from so_det_ultra.highres.sparse import SparseModel

    if format not in FORMATS:
        raise ValueError(f"unknown sparse export format {format!r}; choose one of {FORMATS}")
    if format == "engine":
        _require_tensorrt()
    folder = Path(out) if out else _default_folder(model, format)
    if folder.exists() and not force:
        raise FileExistsError(f"{folder} exists; pass --force to overwrite its export files, or choose --out")
    sm = SparseModel(model, "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    stem_ids = sorted(sm.needed | {sm.k})
    rest_ids = sorted(sm.needed)
    head = sm.rest[-1]
    flags = head.export, head.format, head.dynamic
    try:
        with torch.no_grad():
            crops = _rest_example(sm, rest_ids)
            stem_out = [f"layer{j}" for j in stem_ids]
            _export_onnx(_stem_module(sm, stem_ids), _stem_example(sm), folder / "stem.onnx", ["images"], stem_out)
            rest_in = [f"layer{j}" for j in rest_ids]
            _export_onnx(_rest_module(sm, rest_ids), crops, folder / "rest.onnx", rest_in, ["output0"])
    finally:
        head.export, head.format, head.dynamic = flags
    if format == "openvino":
        _to_openvino(folder)
    elif format == "engine":
        _to_tensorrt(folder, sm)
    (folder / META).write_text(json.dumps(_metadata(sm, format, stem_ids, rest_ids), indent=2))
    return folder


def _default_folder(model, format: str) -> Path:
    if not isinstance(model, (str, Path)):
        raise ValueError("give `out` when exporting a model object (the default folder is named after the checkpoint)")
    p = Path(model)
    return p.parent / f"{p.stem}_sparse_{format}"


def _stem_module(sm, ids):
    """The stem as a module: the full frame in, the stem outputs ``ids`` out (the last stem layer is the seeker)."""
    import torch

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(sm.stem)

        def forward(self, x):
            y = sm.stem_outputs(x)
            return tuple(y[j] for j in ids)

    return Stem().eval()


def _rest_module(sm, ids):
    """The layers after the seeker as a module: one crop batch per stem output in ``ids`` in, decoded Detect out."""
    import torch

    class Rest(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(sm.rest)

        def forward(self, *crops):
            return sm.run_rest(dict(zip(ids, crops)))

    head = sm.rest[-1]
    head.export, head.format, head.dynamic = True, "onnx", True  # decoded output alone; anchors follow the shape
    return Rest().eval()  # the caller restores the head's flags


def _stem_example(sm):
    import torch

    size = 4 * sm.stride
    return (torch.rand(1, 3, size, 2 * size),)


def _rest_example(sm, ids):
    import torch

    ch = 3
    cells = 4 * sm.align
    x = torch.rand(1, ch, cells * sm.cell, cells * sm.cell)
    y = sm.stem_outputs(x)
    return tuple(torch.cat([y[j]] * 2) for j in ids)  # batch 2, so the batch axis is traced as a variable


def _export_onnx(module, args, path: Path, inputs: list[str], outputs: list[str]):
    """TorchScript-traced ONNX export with every axis but the channels dynamic (what TensorRT's parser takes)."""
    import torch

    axes = {n: {0: "batch", 2: f"{n}_h", 3: f"{n}_w"} for n in inputs + outputs if n != "output0"}
    if "output0" in outputs:
        axes["output0"] = {0: "batch", 2: "anchors"}
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def _to_openvino(folder: Path):
    """``stem.xml/.bin`` and ``rest.xml/.bin`` from the ONNX graphs, weights kept in FP32 (``save_model`` stores
    FP16 weights by default, which moved the stem's outputs by up to 1e-2 from PyTorch's)."""
    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError("format 'openvino' needs the openvino package: pip install openvino") from e
    for name in ("stem", "rest"):
        model = ov.convert_model(str(folder / f"{name}.onnx"))
        ov.save_model(model, str(folder / f"{name}.xml"), compress_to_fp16=False)


def _require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "format 'engine' needs TensorRT (pip install tensorrt, on a machine with an NVIDIA GPU); the 'onnx' "
            "export's graphs are TensorRT-friendly (opset 17, dynamic shapes) and can be built with trtexec"
        ) from e


def _to_tensorrt(folder: Path, sm, max_side: int = 4096, max_batch: int = 64):
    """Build ``stem.engine`` / ``rest.engine`` from the ONNX graphs (FP32) with one dynamic-shape profile each."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    for name in ("stem", "rest"):
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse((folder / f"{name}.onnx").read_bytes()):
            raise RuntimeError(f"TensorRT cannot parse {name}.onnx: {parser.get_error(0)}")
        config, profile = builder.create_builder_config(), builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            c = t.shape[1]
            lo, opt, hi = (1, 3, 32, 32), (1, 3, 1088, 1920), (1, 3, max_side, max_side)  # opt: a 1080p frame
            if name == "rest":  # opt: a batch of 16 crops of 34 heatmap cells (a 240 px patch with its margins)
                f = sm.factor[int(t.name.removeprefix("layer"))]
                lo, opt = (1, c, 4 * sm.align * f, 4 * sm.align * f), (16, c, 34 * f, 34 * f)
                hi = (max_batch, c, max_side // sm.cell * f, max_side // sm.cell * f)
            profile.set_shape(t.name, lo, opt, hi)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"TensorRT could not build {name}.engine (see its log above)")
        (folder / f"{name}.engine").write_bytes(engine)


def _metadata(sm, format, stem_ids, rest_ids) -> dict:
    from so_det_ultra._version import __version__
    from so_det_ultra.highres.sparse import sparse_predict

    defaults = {
        k: v.default
        for k, v in inspect.signature(sparse_predict).parameters.items()
        if k in ("thr", "patch", "margin", "conf", "iou", "max_det", "prune")
    }
    defaults["thr"] = sm.threshold  # the seeker's stored threshold (so-det fit-seeker), else ESOD's default
    return {
        "format": format,
        "names": {int(k): v for k, v in sm.names.items()},
        "stride": sm.stride,
        "cell": sm.cell,
        "align": sm.align,
        "factor": {str(j): f for j, f in sm.factor.items()},
        "seeker": sm.k,
        "stem_outputs": stem_ids,
        "rest_inputs": rest_ids,
        "defaults": defaults,
        "opset": OPSET,
        "so_det_ultra": __version__,
    }


def is_sparse_export(path) -> bool:
    """True for a folder written by :func:`export_sparse`."""
    return Path(path).is_dir() and (Path(path) / META).is_file()


class ExportedSparse:
    """A sparse export folder run by ONNX Runtime (``.onnx``) or OpenVINO (``.xml``), shaped like ``SparseModel``.

    Attributes (as :class:`~so_det_ultra.highres.sparse.SparseModel`): ``names``, ``stride``, ``cell``, ``align``,
    ``factor`` (map cells per heatmap cell of each cropped stem output), ``meta`` (the metadata file).

    Args:
        folder: A folder written by :func:`export_sparse`.
        device: ``"cpu"`` or a CUDA device (ONNX Runtime's CUDA provider when installed).
        runtime (str, optional): ``"onnxruntime"`` or ``"openvino"``; default: OpenVINO when the folder holds its
            graphs (an ``openvino`` export), else ONNX Runtime.
    """

    def __init__(self, folder, device="cpu", runtime: str | None = None):
        from so_det_ultra.highres.patches import THRESHOLD

        folder = Path(folder)
        if not is_sparse_export(folder):
            raise FileNotFoundError(f"{folder} is not a sparse export folder (no {META}); see `so-det export --sparse`")
        self.meta = json.loads((folder / META).read_text())
        self.names = {int(k): v for k, v in self.meta["names"].items()}
        self.stride, self.cell, self.align = self.meta["stride"], self.meta["cell"], self.meta["align"]
        self.factor = {int(j): f for j, f in self.meta["factor"].items()}
        self.seeker, self.rest_inputs = self.meta["seeker"], self.meta["rest_inputs"]
        thr = self.meta.get("defaults", {}).get("thr")
        self.threshold = THRESHOLD if thr is None else thr
        runtime = runtime or ("openvino" if (folder / "stem.xml").is_file() else "onnxruntime")
        make = {"onnxruntime": _ort_session, "openvino": _ov_session}[runtime]
        self.runtime = runtime
        self._stem, self._rest = make(folder / "stem", device), make(folder / "rest", device)

    def run_stem(self, x):
        """``({layer: (1, C, h, w)}, heatmap)`` from the full letterboxed frame ``x`` (1, 3, H, W) in [0, 1]."""
        import torch

        outs = self._stem({"images": x.cpu().numpy()})
        y = {j: torch.from_numpy(o) for j, o in zip(self.meta["stem_outputs"], outs)}
        return {j: y[j] for j in self.rest_inputs}, y[self.seeker][0, 0].sigmoid()

    def run_rest(self, crops: dict):
        """Decoded Detect output (B, 4 + nc, A) in crop pixels for a batch of crops ``{layer: (B, C, h, w)}``."""
        import numpy as np
        import torch

        feed = {f"layer{j}": np.ascontiguousarray(crops[j].numpy()) for j in self.rest_inputs}
        return torch.from_numpy(self._rest(feed)[0])

    def run_rest_sparse_head(self, crops, masks):
        raise NotImplementedError("the sparse head runs in PyTorch only; use sparse_head=False with an exported model")


def _ort_session(stem: Path, device):
    """``run(feed) -> list of arrays`` of an ONNX Runtime session on ``stem.onnx``."""
    import onnxruntime as ort

    cuda = "cuda" in str(device) and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    # two sessions and PyTorch's own ops (cropping, NMS) take turns: threads that spin between runs would take
    # the cores from the others
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(stem.with_suffix(".onnx")), options, providers=providers)
    return lambda feed: session.run(None, feed)


def _ov_session(stem: Path, device):
    """``run(feed) -> list of arrays`` of an OpenVINO compiled model on ``stem.xml`` (CPU, FP32: OpenVINO would
    otherwise run bf16 on CPUs that have it, and the heatmap threshold would pick other patches than PyTorch)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(stem.with_suffix(".xml")), "CPU", {"EXECUTION_MODE_HINT": "ACCURACY"})
    request = compiled.create_infer_request()

    def run(feed):
        res = request.infer(feed)
        return [res[o].copy() for o in compiled.outputs]

    return run


def add_export_parser(sub) -> None:
    """Add ``export`` to the ``so-det`` sub-parsers ``sub`` (``--sparse``: the two-graph ESOD export)."""
    p = sub.add_parser(
        "export",
        help="export an so-det-esod model for sparse inference outside PyTorch (ONNX, OpenVINO, TensorRT)",
        description="Writes <ckpt dir>/<stem>_sparse_<format>/: stem.onnx (stem + seeker, full frame), rest.onnx "
        "(the rest of the network on a dynamic batch of patch crops) and metadata.json. "
        "`so-det predict --mode sparse --model <folder>` runs it. Dense exports: `yolo export`.",
    )
    p.add_argument("--sparse", action="store_true", required=True, help="the two-graph sparse export")
    p.add_argument("--model", required=True, help="so-det-esod checkpoint (.pt)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default), openvino or engine (TensorRT)")
    p.add_argument("--out", help="output folder (default: next to the checkpoint)")
    p.add_argument("--force", action="store_true", help="overwrite the export files in an existing folder")
    p.set_defaults(func=_run_export)


add_parser = add_export_parser  # the name so_det_ultra.cli calls on every module in COMMANDS


def _run_export(a) -> int:
    try:
        folder = export_sparse(a.model, a.format, a.out, a.force)
    except (FileExistsError, ImportError, ValueError) as e:
        print(f"so-det export: {e}", file=sys.stderr)
        return 2
    print(f"sparse export written to {folder}")
    return 0
