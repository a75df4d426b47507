"""ONNX graph surgery for the export: quantized-Linear markers -> QDQ / dynamic int8 subgraphs.

The exporter traces each quantized Linear as one ``qatconv::QLinear`` node (attributes ``path``
and ``rank``, one input, one output). `lower_markers` replaces each with the node pattern that
onnxruntime's CPU graph optimizer fuses into an int8 kernel; the patterns were measured on
onnxruntime 1.32 (see `INT8_KERNELS`):

- static, 2-D input: ``Q -> DQ`` on the input, ``DQ`` on the int8 weight ``[N, K]`` (axis 0),
  ``Gemm(transB=1)`` *without* C, then ``Add(bias)`` -> ``QGemm``. A float C keeps the Gemm
  in float (the QGemm fusion wants every input from a DQ), and a 2-D ``MatMul + Add`` is first
  fused into a float Gemm, so neither of those forms is used.
- static, 3-D or more: the same with ``MatMul`` on the transposed weight ``[K, N]`` (axis 1)
  -> ``MatMulIntegerToFloat``.
- weight-only (no input qparams): ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul ->
  Add`` (onnxruntime's dynamic form) -> ``DynamicQuantizeMatMul``.

When the recorded input range is narrower than its dtype (x86's 7-bit ``[0, 127]``), a ``Clip``
to that range precedes ``QuantizeLinear``: ONNX saturates only to the dtype's range, the QAT
simulation clamps to ``[qmin, qmax]``.

Imports onnx and numpy only (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qatconv.config import InputQParams
from qatconv.errors import CheckpointError

MARKER_DOMAIN = "qatconv"
MARKER_OP = "QLinear"

# onnxruntime CPU kernels that run a Linear's matmul on integers.
INT8_KERNELS = frozenset({
    "QGemm", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger",
})

# torch's quantized dtype names (the metadata's) -> numpy dtype and full range.
_DTYPES = {"quint8": (np.uint8, 0, 255), "qint8": (np.int8, -128, 127)}


def act_dtype(q: InputQParams) -> tuple[type, int, int]:
    """``(numpy dtype, lowest, highest)`` of an input's quantized dtype.

    Raises:
        CheckpointError: a dtype ONNX QuantizeLinear cannot produce here, or a range outside it.
    """
    entry = _DTYPES.get(q.dtype)
    if entry is None or not entry[1] <= q.quant_min < q.quant_max <= entry[2]:
        raise CheckpointError(
            f"input qparams {q.to_json()} are not an 8-bit range ({', '.join(_DTYPES)})",
            hint="re-fold the QAT checkpoint with this qatconv",
        )
    return entry


@dataclass(frozen=True)
class QuantLinear:
    """One quantized Linear: int8 weight codes with per-channel symmetric scales.

    ``input`` None means weight-only: the export uses onnxruntime's dynamic int8 form.
    """

    path: str
    weight: np.ndarray  # int8 (out, in)
    weight_scale: np.ndarray  # float32 (out,)
    bias: np.ndarray | None  # float32 (out,)
    input: InputQParams | None

    @property
    def form(self) -> str:
        return "dynamic" if self.input is None else "static"


@dataclass(frozen=True)
class Lowered:
    """Where one marker went: the Linear, its int8 form, the input rank, its weight's name."""

    path: str
    form: str  # "static" | "dynamic"
    rank: int
    weight_name: str
    quantize_output: str  # the QuantizeLinear (or DynamicQuantizeLinear) codes tensor


def lower_markers(model: onnx.ModelProto, linears: dict[str, QuantLinear]) -> list[Lowered]:
    """Replace every ``qatconv::QLinear`` marker node of ``model`` in place.

    Raises:
        KeyError: a marker names a Linear missing from ``linears``.
    """
    graph = model.graph
    added: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    lowered: list[Lowered] = []
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        path = attrs["path"].decode() if isinstance(attrs["path"], bytes) else attrs["path"]
        q, rank = linears[path], int(attrs["rank"])
        tag = f"{path}/{len(lowered)}"
        build = _static_nodes if q.input is not None else _dynamic_nodes
        nodes, inits, low = build(q, rank, node.input[0], node.output[0], tag)
        new_nodes += nodes
        for init in inits:
            if init.name not in added:
                added.add(init.name)
                graph.initializer.append(init)
        lowered.append(low)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in model.opset_import if o.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return lowered


def _weight_inits(q: QuantLinear, transposed: bool) -> tuple[str, list[TensorProto]]:
    name = f"{q.path}.weight_quantized" + ("_t" if transposed else "")
    w = np.ascontiguousarray(q.weight.T) if transposed else q.weight
    inits = [
        numpy_helper.from_array(w.astype(np.int8), name),
        numpy_helper.from_array(q.weight_scale.astype(np.float32), f"{q.path}.weight_scale"),
        numpy_helper.from_array(np.zeros(len(q.weight_scale), np.int8),
                                f"{q.path}.weight_zero_point"),
    ]
    if q.bias is not None:
        inits.append(numpy_helper.from_array(q.bias.astype(np.float32), f"{q.path}.bias"))
    return name, inits


def _static_nodes(
    q: QuantLinear, rank: int, x: str, y: str, tag: str
) -> tuple[list[onnx.NodeProto], list[TensorProto], Lowered]:
    assert q.input is not None
    a = q.input
    np_dtype, lowest, highest = act_dtype(a)
    s, z = f"{q.path}.input_scale", f"{q.path}.input_zero_point"
    inits = [numpy_helper.from_array(np.array(a.scale, np.float32), s),
             numpy_helper.from_array(np.array(a.zero_point, np_dtype), z)]
    nodes = []
    if (a.quant_min, a.quant_max) != (lowest, highest):
        lo, hi = f"{q.path}.input_clip_min", f"{q.path}.input_clip_max"
        scale32 = np.float32(a.scale)
        inits += [
            numpy_helper.from_array(np.array((a.quant_min - a.zero_point) * scale32), lo),
            numpy_helper.from_array(np.array((a.quant_max - a.zero_point) * scale32), hi),
        ]
        nodes.append(helper.make_node("Clip", [x, lo, hi], [f"{tag}/clipped"], name=f"{tag}/Clip"))
        x = f"{tag}/clipped"
    xq, xd, wd, mm = f"{tag}/input_q", f"{tag}/input_dq", f"{tag}/weight_dq", f"{tag}/matmul"
    transposed = rank != 2
    w, w_inits = _weight_inits(q, transposed)
    nodes += [
        helper.make_node("QuantizeLinear", [x, s, z], [xq], name=f"{tag}/QuantizeLinear"),
        helper.make_node("DequantizeLinear", [xq, s, z], [xd], name=f"{tag}/DequantizeLinear"),
        helper.make_node("DequantizeLinear", [w, f"{q.path}.weight_scale",
                                              f"{q.path}.weight_zero_point"], [wd],
                         name=f"{tag}/WeightDequantizeLinear", axis=1 if transposed else 0),
    ]
    out = y if q.bias is None else mm
    if transposed:
        nodes.append(helper.make_node("MatMul", [xd, wd], [out], name=f"{tag}/MatMul"))
    else:
        nodes.append(helper.make_node("Gemm", [xd, wd], [out], name=f"{tag}/Gemm", transB=1))
    if q.bias is not None:
        nodes.append(helper.make_node("Add", [mm, f"{q.path}.bias"], [y], name=f"{tag}/Add"))
    return nodes, inits + w_inits, Lowered(q.path, "static", rank, w, xq)


def _dynamic_nodes(
    q: QuantLinear, rank: int, x: str, y: str, tag: str
) -> tuple[list[onnx.NodeProto], list[TensorProto], Lowered]:
    w, inits = _weight_inits(q, transposed=True)
    xq, xs, xz = f"{tag}/input_q", f"{tag}/input_scale", f"{tag}/input_zero_point"
    acc, accf, sc, mm = f"{tag}/acc", f"{tag}/acc_float", f"{tag}/scale", f"{tag}/matmul"
    mmi_inputs = [xq, w, xz]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz],
                         name=f"{tag}/DynamicQuantizeLinear"),
        helper.make_node("MatMulInteger", mmi_inputs, [acc], name=f"{tag}/MatMulInteger"),
        helper.make_node("Cast", [acc], [accf], name=f"{tag}/Cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [xs, f"{q.path}.weight_scale"], [sc], name=f"{tag}/MulScale"),
        helper.make_node("Mul", [accf, sc], [y if q.bias is None else mm], name=f"{tag}/Mul"),
    ]
    if q.bias is not None:
        nodes.append(helper.make_node("Add", [mm, f"{q.path}.bias"], [y], name=f"{tag}/Add"))
    return nodes, inits, Lowered(q.path, "dynamic", rank, w, xq)


def kernels_by_linear(optimized: onnx.ModelProto, lowered: Sequence[Lowered]) -> dict[str, list[str]]:
    """The op types that consume each Linear's int8 weight in an onnxruntime-optimized graph.

    An int8 kernel (`INT8_KERNELS`) reads the weight codes directly; a ``DequantizeLinear`` there
    means the matmul runs in float.
    """
    users: dict[str, set[str]] = {}
    for node in optimized.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    out: dict[str, set[str]] = {}
    for low in lowered:
        out.setdefault(low.path, set()).update(users.get(low.weight_name, {"(weight folded away)"}))
    return {path: sorted(ops) for path, ops in out.items()}
