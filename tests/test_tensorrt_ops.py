"""Static TensorRT check of the exported ONNX graphs (no GPU needed): every node's operator, opset and the attributes
TensorRT restricts, against TensorRT 10.0's ONNX parser support matrix.

Source of the lists below: onnx-tensorrt ``docs/operators.md`` at commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c
(https://github.com/onnx/onnx-tensorrt/blob/96e781103cfc4adf4a6bb557e94bac8e693f6f4c/docs/operators.md, 2024-06-17):
"TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"; ``SUPPORTED`` is every row marked
``Y`` there, ``AXES_INITIALIZER`` the rows whose restriction is "`axes` must be an initializer" (or a constant).
A build on a GPU remains the real test (docs/export.md).
"""

from __future__ import annotations

import pytest

OPSET_RANGE = (9, 20)
SUPPORTED = set(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min
Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)
# operator -> index of its `axes` input (opset >= 13/18 form), which TensorRT needs as an initializer/constant
AXES_INITIALIZER = {
    "Pad": 3,
    "Slice": 3,
    "Squeeze": 1,
    "Unsqueeze": 1,
    **{f"Reduce{k}": 1 for k in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")},
}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
MODELS = [
    "so-det",
    pytest.param("so-det26", marks=pytest.mark.slow),
    pytest.param("so-det-rtdetr", marks=pytest.mark.slow),
]
MODELS += [pytest.param("so-det-esod", marks=pytest.mark.slow)]


def tensorrt_problems(model) -> list[str]:
    """What TensorRT 10.0's ONNX parser would reject in ``model`` (an ``onnx.ModelProto``), per its support matrix."""
    import onnx

    graph = model.graph
    const = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    problems = [] if OPSET_RANGE[0] <= opset <= OPSET_RANGE[1] else [f"opset {opset} outside {OPSET_RANGE}"]
    for n in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED:
            problems.append(f"{n.name}: {n.domain or 'ai.onnx'}.{n.op_type} not supported")
        k = AXES_INITIALIZER.get(n.op_type)
        if k is not None and len(n.input) > k and n.input[k] and n.input[k] not in const:
            problems.append(f"{n.name}: {n.op_type} axes input {n.input[k]!r} is computed, not an initializer")
        if n.op_type == "Resize":
            if attrs.get("mode", "nearest") not in RESIZE_MODES or attrs.get("antialias", 0):
                problems.append(f"{n.name}: Resize mode {attrs.get('mode')} antialias {attrs.get('antialias', 0)}")
            if attrs.get("coordinate_transformation_mode", "half_pixel") not in RESIZE_COORDS:
                problems.append(f"{n.name}: Resize coordinate mode {attrs['coordinate_transformation_mode']}")
            if attrs.get("nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST:
                problems.append(f"{n.name}: Resize nearest mode {attrs['nearest_mode']}")
        if n.op_type == "TopK" and attrs.get("sorted", 1) != 1:
            problems.append(f"{n.name}: TopK sorted=0")
        if n.op_type == "MaxPool" and any(d != 1 for d in attrs.get("dilations", [])):
            problems.append(f"{n.name}: MaxPool dilations {attrs['dilations']}")
    return problems


@pytest.mark.parametrize("cfg", MODELS)
def test_exported_graph_is_within_tensorrt_10_support(cfg, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    from ultralytics import RTDETR, YOLO

    monkeypatch.chdir(tmp_path)
    cls = RTDETR if "rtdetr" in cfg else YOLO
    cls(f"{cfg}-n.yaml").save(tmp_path / "m.pt")
    f = cls(str(tmp_path / "m.pt")).export(format="onnx", imgsz=64, device="cpu")
    model = onnx.load(f)
    assert len(model.graph.node) > 50
    assert tensorrt_problems(model) == []


def test_checker_flags_what_tensorrt_rejects():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("ReduceMean", ["x", "s"], ["m"], name="mean_computed_axes"),  # axes not an initializer
        helper.make_node("Resize", ["x", "", "sc"], ["r"], name="cubic", mode="cubic"),
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="unsorted", sorted=0),
        helper.make_node("Col2Im", ["x", "k", "k"], ["c"], name="col2im"),  # not in TensorRT 10.0's matrix
    ]
    inits = [helper.make_tensor("sc", TensorProto.FLOAT, [4], [1, 1, 2, 2]), helper.make_tensor("k", 7, [1], [2])]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("m", TensorProto.FLOAT, None)], inits)
    problems = tensorrt_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    text = "\n".join(problems)
    for word in ("opset 21", "mean_computed_axes", "cubic", "unsorted", "Col2Im not supported"):
        assert word in text, text
    assert not any(p.startswith("shape") for p in problems)
