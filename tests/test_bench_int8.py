"""benchmarks/bench_int8.py helpers: ONNX Runtime static INT8 with the detection head's decode kept in FP32."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_int8

        yield bench_int8
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_head_decode_stays_fp32_and_whole_graph_quantizes_the_output(bench, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime.quantization")
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)
    YOLO("so-det-n.yaml").save(tmp_path / "m.pt")
    fp32 = tmp_path / "m.onnx"
    YOLO(str(tmp_path / "m.pt")).export(format="onnx", imgsz=64, device="cpu")
    excluded = bench.head_decode_nodes(fp32)
    assert any("/dfl/" in n for n in excluded) and not any("/cv2." in n or "/cv3." in n for n in excluded)
    calib = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    whole, head = bench.ort_int8(fp32, calib), bench.ort_int8(fp32, calib, excluded, suffix="_head")

    def producer(path):
        model = onnx.load(str(path))
        out = model.graph.output[0].name
        return next(n for n in model.graph.node if out in n.output), model

    (last_whole, _), (last_head, m_head) = producer(whole), producer(head)
    assert last_whole.op_type == "DequantizeLinear"  # the box-and-score tensor went through one uint8 scale
    assert last_head.op_type != "DequantizeLinear" and last_head.name in excluded
    assert sum(n.op_type == "QuantizeLinear" for n in m_head.graph.node) > 20  # the backbone is still INT8
    assert {p.key for p in m_head.metadata_props} >= {"stride", "names"}  # YOLO(path) can load it
    errors = dict(bench.layer_errors(fp32, head, calib[:2]))
    assert set(errors) >= {"model.0", "model.21", "model.22"} and all(0 <= e < 1 for e in errors.values())
