"""ONNX Runtime and OpenVINO graphs behind one small interface, for the exported sparse and sliced predictors.

:func:`open_graph` loads an ``.onnx`` (ONNX Runtime) or an OpenVINO ``.xml`` and returns a :class:`Graph`:
``graph(feed) -> list of arrays`` runs it once, ``graph.map(feeds)`` runs several inputs, ``workers`` at a time.
Both runtimes get the same settings, so a dense and a sparse export compare like with like:

- ``threads`` CPU threads in all (None: the runtime's default, every core);
- ``workers`` > 1 runs that many inputs at once, each on ``threads // workers`` threads (ONNX Runtime: concurrent
  ``InferenceSession.run`` calls from a thread pool, which the runtime allows and runs without the GIL; OpenVINO: an
  ``AsyncInferQueue`` over a model compiled with as many streams). Small inputs such as patch crops keep a thread
  busier alone than split over several (interpretation: measured per-runtime in docs/highres.md);
- ONNX Runtime's worker threads do not spin between runs (they would take the cores from the Python code around
  the graphs); OpenVINO runs in FP32 (``EXECUTION_MODE_HINT: ACCURACY``: on CPUs with bf16 it would otherwise run
  bf16, and its scores would differ from PyTorch's by about 1e-2).

Shapes: :attr:`Graph.inputs` maps each input to its shape, None for a dynamic axis, read from the graph itself.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNTIMES = ("onnxruntime", "openvino")


class Graph:
    """One exported graph on one runtime (see the module docstring); made by :func:`open_graph`.

    Attributes:
        inputs (dict[str, tuple]): Input names and shapes (None for dynamic axes), in the graph's order.
        outputs (list[str]): Output names, in the order the calls return them.
        runtime (str): ``"onnxruntime"`` or ``"openvino"``.
        workers (int): Inputs :meth:`map` runs at once.
    """

    runtime = ""

    def __init__(self, inputs: dict, outputs: list, workers: int):
        self.inputs, self.outputs, self.workers = inputs, outputs, max(int(workers), 1)

    def __call__(self, feed: dict) -> list:
        raise NotImplementedError

    def map(self, feeds: list) -> list:
        """``[self(f) for f in feeds]``, ``workers`` at a time."""
        raise NotImplementedError

    def fixed_hw(self, name: str | None = None) -> tuple[int, int] | None:
        """The fixed (h, w) of input ``name`` (default the first; NCHW or NHWC read from the graph), or None when
        either is dynamic."""
        shape = self.inputs[name or next(iter(self.inputs))]
        hw = shape[1:3] if len(shape) == 4 and shape[3] in (1, 3) else shape[2:4]
        return tuple(hw) if all(isinstance(d, int) for d in hw) else None


class _OrtGraph(Graph):
    runtime = "onnxruntime"

    def __init__(self, path: Path, device="cpu", threads: int | None = None, workers: int = 1):
        import onnxruntime as ort

        cuda = "cuda" in str(device) and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads or workers > 1:  # concurrent runs share the cores instead of each taking all of them
            options.intra_op_num_threads = max(int(threads or os.cpu_count() or 1) // max(int(workers), 1), 1)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        inputs = self.session.get_inputs()
        shapes = {i.name: tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape) for i in inputs}
        super().__init__(shapes, [o.name for o in self.session.get_outputs()], workers)
        self._pool = None

    def __call__(self, feed: dict) -> list:
        return self.session.run(None, feed)

    def map(self, feeds: list) -> list:
        if self.workers == 1 or len(feeds) < 2:
            return [self(f) for f in feeds]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="so-det-ort")
        return list(self._pool.map(self, feeds))


class _OvGraph(Graph):
    runtime = "openvino"

    def __init__(self, path: Path, device="cpu", threads: int | None = None, workers: int = 1):
        import openvino as ov

        config = {"EXECUTION_MODE_HINT": "ACCURACY", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if workers > 1:
            config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=int(workers))
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        shapes = {
            _port_name(p, f"input{i}"): tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape())
            for i, p in enumerate(self.compiled.inputs)
        }
        super().__init__(shapes, [_port_name(o, f"output{i}") for i, o in enumerate(self.compiled.outputs)], workers)
        self._request = self.compiled.create_infer_request()
        self._queue = None

    def __call__(self, feed: dict) -> list:
        res = self._request.infer(self._by_index(feed))
        return [res[o].copy() for o in self.compiled.outputs]  # the request reuses its output memory

    def _by_index(self, feed: dict) -> dict:
        return {i: feed[name] for i, name in enumerate(self.inputs)}  # unnamed inputs too

    def map(self, feeds: list) -> list:
        if self.workers == 1 or len(feeds) < 2:
            return [self(f) for f in feeds]
        import openvino as ov

        if self._queue is None:
            self._queue = ov.AsyncInferQueue(self.compiled, self.workers)
        out = [None] * len(feeds)

        def done(request, k):
            out[k] = [request.get_output_tensor(i).data.copy() for i in range(len(self.outputs))]

        self._queue.set_callback(done)
        for k, feed in enumerate(feeds):
            self._queue.start_async(self._by_index(feed), k)
        self._queue.wait_all()
        return out


def _port_name(port, default: str) -> str:
    """An OpenVINO port's tensor name (the ONNX graph's input or output name, not that of a node merged into it), or
    ``default`` for an unnamed one."""
    names = port.get_names()
    return min(names, key=lambda n: (n.startswith("/"), n)) if names else default


def open_graph(path, runtime: str | None = None, device="cpu", threads: int | None = None, workers: int = 1) -> Graph:
    """A :class:`Graph` for ``path`` (``.onnx`` or OpenVINO ``.xml``; a suffix-less path picks ``runtime``'s file).

    Args:
        path: The graph file, or its path without suffix.
        runtime (str, optional): ``"onnxruntime"`` or ``"openvino"``; default from the suffix.
        device: ``"cpu"``, or a CUDA device for ONNX Runtime's CUDA provider when installed.
        threads (int, optional): CPU threads in all; None: the runtime's default.
        workers (int): Inputs :meth:`Graph.map` runs at once.
    """
    path = Path(path)
    runtime = runtime or ("openvino" if path.suffix == ".xml" else "onnxruntime")
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            raise ImportError("OpenVINO graphs need the openvino package: pip install openvino") from e
        return _OvGraph(path.with_suffix(".xml"), device, threads, workers)
    return _OrtGraph(path.with_suffix(".onnx"), device, threads, workers)
