"""Sparse (ESOD) export: two graphs and a metadata file that ONNX Runtime, OpenVINO or TensorRT run outside PyTorch.

``so-det export --sparse --model best.pt --format onnx|openvino|engine`` writes ``<ckpt dir>/<stem>_sparse_<format>/``
(next to the checkpoint, as Ultralytics' own exports are):

- ``stem.onnx``: the layers up to the ObjectSeeker on the full letterboxed frame, taken as it is letterboxed
  (``images``: 1 x H x W x 3 uint8 BGR, H and W dynamic; the conversion to the float RGB input is in the graph);
  outputs ``layer<j>``, the stem outputs the later layers read, and ``heatmap``, the sigmoid of the seeker's logits;
- ``rest.onnx``: the remaining layers on a batch of patch crops (inputs ``layer<j>``: B x C x h x w, all dynamic; and
  per crop ``origin`` B x 2, its top-left x, y in frame pixels, and ``keep`` B x 1 x h x w, 1 on the heatmap cells
  whose predictions it answers for), output ``output0``: B x (4 + nc) x A decoded Detect predictions, xywh in frame
  pixels, the scores of boxes centred outside ``keep`` set to 0 (:func:`~so_det_ultra.highres.sparse.to_frame`);
- ``metadata.json``: class names, strides, the seeker's cell, crop factors, default thresholds, versions.

OpenVINO adds ``stem.xml/.bin`` and ``rest.xml/.bin`` converted from the ONNX graphs. ``engine`` keeps the ONNX graphs
(opset 17, dynamic shapes, no custom ops: what TensorRT's ONNX parser takes) and builds ``stem.engine`` and
``rest.engine`` with TensorRT's Python API when ``tensorrt`` is installed; it fails with a message otherwise.

The folder is owned, locked and replaced all or nothing, as every so-det-ultra output folder
(:mod:`so_det_ultra.data.ownership`): every file is written under a temporary name and the new export replaces an
earlier one (``--force``) only once all its files are complete, so an export that fails (a full disk) leaves the
earlier one intact; files of the user's in the folder are kept, and only the files the export writes are replaced.

:class:`ExportedSparse` runs such a folder with ONNX Runtime or OpenVINO behind the same interface as
:class:`~so_det_ultra.highres.sparse.SparseModel`, so :func:`~so_det_ultra.highres.sparse.sparse_predict` selects and
merges patches with the same code for both.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

from so_det_ultra.cliargs import unsafe_load_option

FORMATS = ("onnx", "openvino", "engine")
META = "metadata.json"
OPSET = 17
GRAPHS = 2  # the graphs' interface: 2 = uint8 frame in, heatmap out; crops with origin and keep in, frame pixels out


class ExportError(ValueError):
    """A sparse export folder that cannot be run as it is (damaged metadata or graphs); one line naming the file."""


def export_sparse(
    model, format: str = "onnx", out=None, force: bool = False, unsafe_load: bool = False, lock_timeout=None
) -> Path:
    """Write the sparse export of ``model`` (a checkpoint / YAML path or a DetectionModel) and return its folder.

    Args:
        model: An so-det-esod model (one ObjectSeeker layer).
        format (str): ``"onnx"``, ``"openvino"`` or ``"engine"`` (TensorRT).
        out (str | Path, optional): Folder to write; default ``<ckpt dir>/<stem>_sparse_<format>``.
        force (bool): Replace the files this export writes in an existing folder (never anything else).
        unsafe_load (bool): Load a checkpoint with full pickle (only for files you trust).
        lock_timeout (float, optional): Seconds to wait for another run writing the folder (None: until it ends).
    """
    from so_det_ultra.data.ownership import Ownership, check_lock_timeout, dst_lock, only_bookkeeping
    from so_det_ultra.highres.common import load_model
    from so_det_ultra.highres.sparse import SparseModel

    if format not in FORMATS:
        raise ValueError(f"unknown sparse export format {format!r}; choose one of {FORMATS}")
    if format == "engine":
        _require_tensorrt()
    folder = Path(out) if out else _default_folder(model, format)
    if (folder.exists() or folder.is_symlink()) and not only_bookkeeping(folder) and not force:  # not a failed run's
        raise FileExistsError(f"{folder} exists; pass --force to overwrite its export files, or choose --out")
    check_lock_timeout(lock_timeout)
    Ownership.check(folder, "export", force)  # refuse before the model loads and before the lock file is created
    sm = SparseModel(load_model(model, "cpu", unsafe_load=unsafe_load), "cpu")
    kept = f"the earlier export in {folder} is intact" if is_sparse_export(folder) else "nothing was exported"
    with dst_lock(folder, lock_timeout):
        owner = Ownership.start(folder, "export", {"format": format}, force)
        try:
            with owner.transaction(kept):
                _write(owner, folder, sm, format)
                owner.finish()
        finally:
            owner.close()
    return folder


def _write(owner, folder: Path, sm, format: str) -> None:
    """The export's files through ``owner``: all under temporary names until every one is complete, then moved in,
    ``metadata.json`` last."""
    import torch

    from so_det_ultra.data import _io

    graphs = {name: owner.temp_for(folder / f"{name}.onnx") for name in ("stem", "rest")}
    stem_ids = rest_ids = sorted(sm.needed)
    head = sm.rest[-1]
    flags = head.export, head.format, head.dynamic
    try:
        with torch.no_grad():
            crops = _rest_example(sm, rest_ids)
            stem_out = [f"layer{j}" for j in stem_ids] + ["heatmap"]
            with _io.naming(folder / "stem.onnx"):
                _export_onnx(_stem_module(sm, stem_ids), _stem_example(sm), graphs["stem"], ["images"], stem_out)
            rest_in = [f"layer{j}" for j in rest_ids] + ["origin", "keep"]
            with _io.naming(folder / "rest.onnx"):
                _export_onnx(_rest_module(sm, rest_ids), crops, graphs["rest"], rest_in, ["output0"])
    finally:
        head.export, head.format, head.dynamic = flags
    written = {f"{name}.onnx" for name in graphs}
    if format == "openvino":
        written |= _to_openvino(owner, folder, graphs)
    elif format == "engine":
        written |= _to_tensorrt(owner, folder, graphs, sm)
    for name, tmp in graphs.items():
        owner.install(tmp, folder / f"{name}.onnx")
    owner.remove_stale(folder, written | {META})  # an earlier export's files this one does not write
    owner.claim(folder / META)
    meta = owner.adopt(
        _io.write_temp(folder / META, json.dumps(_metadata(sm, format, stem_ids, rest_ids), indent=2).encode())
    )
    (folder / META).unlink(missing_ok=True)  # never old metadata beside new graphs, even while the files move in
    owner.commit()
    owner.install(meta, folder / META)  # last: the folder is an export again


def _default_folder(model, format: str) -> Path:
    if not isinstance(model, (str, Path)):
        raise ValueError("give `out` when exporting a model object (the default folder is named after the checkpoint)")
    p = Path(model)
    return p.parent / f"{p.stem}_sparse_{format}"


def _stem_module(sm, ids):
    """The stem as a module: the letterboxed uint8 BGR frame in, the stem outputs ``ids`` and the heatmap out."""
    import torch

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(sm.stem)
            self.image_layer = sm._image_layer  # the first layer on uint8 values (sparse.image_layer), or None

        def forward(self, image):
            y = sm.image_stem_outputs(image)
            return (*(y[j] for j in ids), y[-1].sigmoid())

    return Stem().eval()


def _rest_module(sm, ids):
    """The layers after the seeker as a module: one crop batch per stem output in ``ids``, the crops' origins and
    keep masks in; decoded Detect predictions in frame pixels out (:func:`~so_det_ultra.highres.sparse.to_frame`)."""
    import torch

    class Rest(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(sm.rest)

        def forward(self, *inputs):
            *crops, origin, keep = inputs
            return sm.run_rest(dict(zip(ids, crops)), origin, keep)

    head = sm.rest[-1]
    head.export, head.format, head.dynamic = True, "onnx", True  # decoded output alone; anchors follow the shape
    return Rest().eval()  # the caller restores the head's flags


def _stem_example(sm):
    import torch

    size = 4 * sm.stride
    return (torch.randint(0, 256, (1, size, 2 * size, 3), dtype=torch.uint8),)


def _rest_example(sm, ids):
    import torch

    cells = 4 * sm.align
    y = sm.stem_outputs(torch.rand(1, 3, cells * sm.cell, (cells + sm.align) * sm.cell))
    crops = tuple(torch.cat([y[j]] * 2) for j in ids)  # batch 2, so the batch axis is traced as a variable
    keep = torch.zeros(2, 1, cells, cells + sm.align)
    keep[:, :, 1:-1, 1:-1] = 1
    return (*crops, torch.tensor([[0.0, 0.0], [64.0, 32.0]]), keep)


# the dynamic axes of each input and output (every one but the channels: what TensorRT's parser takes)
_AXES = {"images": {1: "images_h", 2: "images_w"}, "origin": {0: "batch"}, "output0": {0: "batch", 2: "anchors"}}


def _export_onnx(module, args, path: Path, inputs: list[str], outputs: list[str]):
    """TorchScript-traced ONNX export with every axis but the channels dynamic, simplified by onnxslim when it is
    installed (as Ultralytics' own ONNX export: the shape arithmetic of the dynamic axes halves, about 0.5 ms less
    per run of the rest graph on ONNX Runtime)."""
    import torch

    axes = {n: _AXES.get(n, {0: "batch", 2: f"{n}_h", 3: f"{n}_w"}) for n in inputs + outputs}
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
    try:
        import onnx
        import onnxslim
    except ImportError:
        return
    onnx.save(onnxslim.slim(str(path)), str(path))


def _to_openvino(owner, folder: Path, graphs: dict) -> set:
    """``stem.xml/.bin`` and ``rest.xml/.bin`` converted from the (temporary) ONNX graphs, weights kept in FP32
    (``save_model`` stores FP16 weights by default, which moved the stem's outputs by up to 1e-2 from PyTorch's);
    the names written."""
    from so_det_ultra.data import _io

    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError("format 'openvino' needs the openvino package: pip install openvino") from e
    for name, onnx in graphs.items():
        xml = owner.temp_for(folder / f"{name}.xml")
        owner.claim(folder / f"{name}.bin")
        weights = owner.adopt(xml.with_suffix(".bin"))  # OpenVINO writes the weights beside the XML
        with _io.naming(folder / f"{name}.xml"):
            ov.save_model(ov.convert_model(str(onnx)), str(xml), compress_to_fp16=False)
        owner.install(xml, folder / f"{name}.xml")
        owner.install(weights, folder / f"{name}.bin")
    return {f"{name}.{ext}" for name in graphs for ext in ("xml", "bin")}


def _require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "format 'engine' needs TensorRT (pip install tensorrt, on a machine with an NVIDIA GPU); the 'onnx' "
            "export's graphs are TensorRT-friendly (opset 17, dynamic shapes) and can be built with trtexec"
        ) from e


def _to_tensorrt(owner, folder: Path, graphs: dict, sm, max_side: int = 4096, max_batch: int = 64) -> set:
    """Build ``stem.engine`` / ``rest.engine`` from the (temporary) ONNX graphs (FP32) with one dynamic-shape profile
    each; the names written."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    for name in ("stem", "rest"):
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(graphs[name].read_bytes()):
            raise RuntimeError(f"TensorRT cannot parse {name}.onnx: {parser.get_error(0)}")
        config, profile = builder.create_builder_config(), builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            profile.set_shape(t.name, *_trt_profile(t.name, t.shape[1], sm, max_side, max_batch))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"TensorRT could not build {name}.engine (see its log above)")
        owner.write_bytes(folder / f"{name}.engine", bytes(engine))
    return {"stem.engine", "rest.engine"}


def _trt_profile(name: str, c: int, sm, max_side: int, max_batch: int) -> tuple:
    """(min, opt, max) shapes of a graph input; opt: a 1080p frame, or 16 crops of 24 x 36 heatmap cells (a 1080p
    frame's ESOD patch, 20 x 32, with room for merged crops)."""
    if name == "images":  # 1 x H x W x 3
        return (1, 32, 32, 3), (1, 1088, 1920, 3), (1, max_side, max_side, 3)
    if name == "origin":
        return (1, 2), (16, 2), (max_batch, 2)
    f = 1 if name == "keep" else sm.factor[int(name.removeprefix("layer"))]
    lo, opt = (1, c, 4 * sm.align * f, 4 * sm.align * f), (16, c, 24 * f, 36 * f)
    return lo, opt, (max_batch, c, max_side // sm.cell * f, max_side // sm.cell * f)


def _metadata(sm, format, stem_ids, rest_ids) -> dict:
    from so_det_ultra._version import __version__
    from so_det_ultra.highres.sparse import sparse_predict

    defaults = {
        k: v.default
        for k, v in inspect.signature(sparse_predict).parameters.items()
        if k in ("thr", "patch", "margin", "conf", "iou", "max_det", "max_det_tile", "prune", "merge_crops", "bucket")
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
        "graphs": GRAPHS,
        "defaults": defaults,
        "opset": OPSET,
        "so_det_ultra": __version__,
    }


def is_sparse_export(path) -> bool:
    """True for a folder written by :func:`export_sparse`."""
    return Path(path).is_dir() and (Path(path) / META).is_file()


def read_metadata(folder) -> dict:
    """``metadata.json`` of a sparse export, checked: :class:`ExportError` (one line naming the file and the field)
    for a file that is not JSON, misses a field or holds a value of the wrong kind."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not readable JSON ({err}); re-export with so-det export --sparse") from None
    problem = _metadata_problem(meta)
    if problem:
        raise ExportError(f"{path}: {problem}; re-export with so-det export --sparse")
    return meta


def _metadata_problem(meta) -> str | None:
    """What is wrong with a loaded ``metadata.json``, or None."""

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def index(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    names = meta.get("names")
    if (
        not isinstance(names, dict)
        or not names
        or not all(str(k).isdigit() and isinstance(v, str) for k, v in names.items())
    ):
        return "'names' must map class indices to names"
    if not (number(meta.get("stride")) and meta["stride"] > 0):
        return "'stride' must be a positive number"
    for key in ("cell", "align"):
        if not count(meta.get(key)):
            return f"{key!r} must be a positive integer"
    factor = meta.get("factor")
    if not isinstance(factor, dict) or not all(str(k).isdigit() and count(v) for k, v in factor.items()):
        return "'factor' must map layer indices to positive integers"
    for key in ("stem_outputs", "rest_inputs"):
        if not isinstance(meta.get(key), list) or not all(index(j) for j in meta[key]):
            return f"{key!r} must be a list of layer indices"
    if not index(meta.get("seeker")):
        return "'seeker' must be a layer index"
    if not set(meta["rest_inputs"]) <= set(meta["stem_outputs"]) or not all(
        str(j) in factor for j in meta["rest_inputs"]
    ):
        return "every 'rest_inputs' layer must be in 'stem_outputs' and 'factor'"
    defaults = meta.get("defaults", {})
    if not isinstance(defaults, dict) or not all(
        defaults.get(k) is None or number(defaults[k]) for k in ("thr", "patch", "margin")
    ):
        return "'defaults' must hold numbers (thr, patch, margin)"
    return None


class ExportedSparse:
    """A sparse export folder run by ONNX Runtime (``.onnx``) or OpenVINO (``.xml``), shaped like ``SparseModel``.

    Attributes (as :class:`~so_det_ultra.highres.sparse.SparseModel`): ``names``, ``stride``, ``cell``, ``align``,
    ``factor`` (map cells per heatmap cell of each cropped stem output), ``threshold``, ``batch``, ``meta`` (the
    metadata file).

    Args:
        folder: A folder written by :func:`export_sparse`.
        device: ``"cpu"`` or a CUDA device (ONNX Runtime's CUDA provider when installed).
        runtime (str, optional): ``"onnxruntime"`` or ``"openvino"``; default: OpenVINO when the folder holds its
            graphs (an ``openvino`` export), else ONNX Runtime.
        threads (int, optional): CPU threads of each graph (None: the runtime's default).
        workers (int): Crops run at once, each on ``threads // workers`` threads (:mod:`.runtimes`); crops run one
            per call (``batch`` 1), so their shapes recur and each run is small enough for one thread.
    """

    batch = 1

    def __init__(self, folder, device="cpu", runtime: str | None = None, threads: int | None = None, workers=2):
        from so_det_ultra.highres.patches import THRESHOLD
        from so_det_ultra.highres.runtimes import open_graph

        folder = Path(folder)
        if not is_sparse_export(folder):
            raise FileNotFoundError(f"{folder} is not a sparse export folder (no {META}); see `so-det export --sparse`")
        self.meta = read_metadata(folder)
        self.names = {int(k): v for k, v in self.meta["names"].items()}
        self.stride, self.cell, self.align = self.meta["stride"], self.meta["cell"], self.meta["align"]
        self.factor = {int(j): f for j, f in self.meta["factor"].items()}
        self.seeker, self.rest_inputs = self.meta["seeker"], self.meta["rest_inputs"]
        thr = self.meta.get("defaults", {}).get("thr")
        self.threshold = THRESHOLD if thr is None else thr
        if self.meta.get("graphs") != GRAPHS:
            raise ValueError(
                f"{folder} holds graphs of an earlier so-det-ultra (float frame in, crop pixels out); export it again: "
                "so-det export --sparse --model <checkpoint> --force"
            )
        runtime = runtime or ("openvino" if (folder / "stem.xml").is_file() else "onnxruntime")
        self.runtime = runtime
        self._stem = open_graph(folder / "stem", runtime, device, threads)
        self._rest = open_graph(folder / "rest", runtime, device, threads, workers)

    def run_stem(self, image):
        """``({layer: (1, C, h, w)}, heatmap)`` from the letterboxed uint8 BGR frame ``image`` (H, W, 3)."""
        import torch

        y = dict(zip(self._stem.outputs, self._stem({"images": image[None]})))
        return {j: y[f"layer{j}"] for j in self.rest_inputs}, torch.from_numpy(y["heatmap"][0, 0])

    def run_rest(self, crops: dict, origin=None, keep=None):
        """As :meth:`SparseModel.run_rest <so_det_ultra.highres.sparse.SparseModel.run_rest>`, on NumPy crops."""
        import torch

        return torch.from_numpy(self._rest(self._feed(crops, origin, keep))[0])

    def run_rests(self, batches: list) -> list:
        """:meth:`run_rest` on each ``(crops, origin, keep)`` of ``batches``, ``workers`` at a time."""
        import torch

        return [torch.from_numpy(o[0]) for o in self._rest.map([self._feed(*b) for b in batches])]

    def _feed(self, crops: dict, origin, keep) -> dict:
        import numpy as np

        feed = {f"layer{j}": np.ascontiguousarray(crops[j]) for j in self.rest_inputs}
        if origin is None:  # crop pixels: no shift, every cell kept
            first = crops[self.rest_inputs[0]]
            f = self.factor[self.rest_inputs[0]]
            origin = np.zeros((len(first), 2), np.float32)
            keep = np.ones((len(first), 1, first.shape[2] // f, first.shape[3] // f), np.float32)
        return {**feed, "origin": np.asarray(origin, np.float32), "keep": np.asarray(keep, np.float32)}

    def run_rest_sparse_head(self, crops, masks):
        raise NotImplementedError("the sparse head runs in PyTorch only; use sparse_head=False with an exported model")


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
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in an existing folder (only the files the export writes)",
    )
    unsafe_load_option(p)
    p.add_argument(
        "--lock-timeout",
        type=float,
        metavar="S",
        help="give up after S seconds when another run is writing the folder (default: wait)",
    )
    p.set_defaults(func=_run_export)


add_parser = add_export_parser  # the name so_det_ultra.cli calls on every module in COMMANDS


def _run_export(a) -> int:
    try:
        folder = export_sparse(a.model, a.format, a.out, a.force, a.unsafe_load, a.lock_timeout)
    except (FileExistsError, ImportError, ValueError) as e:
        print(f"so-det export: {e}", file=sys.stderr)
        return 2
    print(f"sparse export written to {folder}")
    return 0
