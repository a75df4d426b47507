"""`qatconv export`: the ONNX model onnxruntime runs equals an exact integer reference.

The reference (`_reference`) is written here from the ONNX and torch definitions, not from
qatconv's code: weight codes as torch's fake quant makes them (``x * (1 / scale)``, round half to
even, clamp), input codes as ONNX ``QuantizeLinear`` makes them (``x / scale``, round half to even,
clamp to the recorded range), products summed as Python integers, then rescale and bias in
float64. Each model's forward is re-written in numpy (tests/models/export_models.py).

Input qparams are computed here from the data (min/max over each Linear's input, the DESIGN
format ``qparams[linear].input``) and written into the folded checkpoint's metadata, so these
tests do not depend on how `prepare` observes activations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import torch
from torch import nn

from qatconv import checkpoint
from tests.models import export_models

MODELS = Path(export_models.__file__)
# (activation dtype, qmin, qmax) per backend, as the W8A8 table: x86 7-bit uint8, qnnpack int8.
RANGES = {"x86": ("quint8", 0, 127), "qnnpack": ("qint8", -128, 127)}


# ---------------------------------------------------------------------------- building inputs


def _folded(tmp: Path, cli: Any, name: str, inputs: np.ndarray, backend: str = "x86",
            seed: int = 0) -> Path:
    """prepare (calibrate) -> fold a randomized `export_models.<name>`; returns the folded file."""
    model = export_models.randomized(getattr(export_models, name)(), seed)
    ckpt, data = tmp / "float.safetensors", tmp / "data.npz"
    checkpoint.write_safetensors(dict(model.state_dict()), ckpt, {}, force=True)
    np.savez(data, inputs=inputs.astype(np.float32))
    spec = f"{MODELS}:{name}"
    r = cli("prepare", "-m", spec, "-w", ckpt, "--data", data, "-o", tmp / "qat.safetensors",
            "--backend", backend, "-q")
    assert r.code == 0, r.err
    r = cli("fold", tmp / "qat.safetensors", "-o", tmp / "folded.safetensors", "-q")
    assert r.code == 0, r.err
    return tmp / "folded.safetensors"


def _set_input_qparams(folded: Path, name: str, inputs: np.ndarray, backend: str | None,
                       exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Write min/max input qparams for every quantized Linear (``backend`` None: weight-only,
    no input qparams); drop the qparams of ``exclude`` (they stay float). Returns the metadata."""
    meta = checkpoint.read_metadata(folded)
    tensors = checkpoint.load_checkpoint(folded).tensors
    model = _float_model(name, tensors)
    seen: dict[str, list[torch.Tensor]] = {}
    for path in meta["qparams"]:
        model.get_submodule(path).register_forward_pre_hook(
            lambda m, a, p=path: seen.setdefault(p, []).append(a[0].detach()))
    with torch.no_grad():
        model(torch.from_numpy(inputs))
    for path in list(meta["qparams"]):
        if path in exclude:
            del meta["qparams"][path]
        elif backend is None:
            meta["qparams"][path].pop("input", None)
        else:
            x = torch.cat([t.flatten() for t in seen[path]])
            meta["qparams"][path]["input"] = _minmax_qparams(float(x.min()), float(x.max()),
                                                             *RANGES[backend])
    checkpoint.write_safetensors(tensors, folded, {"qatconv": json.dumps(meta)}, force=True)
    return meta


def _minmax_qparams(lo: float, hi: float, dtype: str, qmin: int, qmax: int) -> dict[str, Any]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32((hi - lo) / (qmax - qmin)))
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return {"scale": scale, "zero_point": zp, "qmin": qmin, "qmax": qmax, "dtype": dtype}


def _float_model(name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    model = getattr(export_models, name)()
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm1d):
                setattr(m, child_name, nn.Identity())
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.bias is None and f"{mod_name}.bias" in tensors:
            m.bias = nn.Parameter(torch.zeros(m.out_features))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.endswith("_scale")})
    return model.eval()


# ---------------------------------------------------------------------------- the reference


def _reference(folded: Path, meta: dict[str, Any]) -> Callable[[str, np.ndarray], np.ndarray]:
    """The Linear arithmetic an exact int8 runtime performs (see the module docstring)."""
    tensors = {k: v.numpy() for k, v in checkpoint.load_checkpoint(folded).tensors.items()}

    def linear(path: str, x: np.ndarray) -> np.ndarray:
        w = tensors[f"{path}.weight"].astype(np.float32)
        bias = tensors.get(f"{path}.bias")
        b = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)
        q = meta["qparams"].get(path)
        if q is None:  # float Linear
            return x.astype(np.float64) @ w.astype(np.float64).T + b
        s_w = np.array(q["scale"], np.float32)
        w_codes = np.clip(np.rint(w * (np.float32(1) / s_w)[:, None]), q["quant_min"],
                          q["quant_max"]).astype(np.int64)
        x32 = x.astype(np.float32)
        a = q.get("input")
        if a is None:  # DynamicQuantizeLinear over the whole tensor
            lo, hi = np.float32(min(0.0, x32.min())), np.float32(max(0.0, x32.max()))
            s_x = np.float32((hi - lo) / np.float32(255))
            zp = int(np.clip(np.rint(-lo / s_x), 0, 255))
            x_codes = np.clip(np.rint(x32 / s_x) + zp, 0, 255).astype(np.int64)
        else:
            s_x, zp = np.float32(a["scale"]), a["zero_point"]
            x_codes = np.clip(np.rint(x32 / s_x) + zp, a["qmin"], a["qmax"]).astype(np.int64)
        acc = (x_codes - zp).astype(object) @ w_codes.T.astype(object)  # Python integers
        return acc.astype(np.float64) * (float(s_x) * s_w.astype(np.float64)) + b

    return linear


def _ort(path: Path, x: np.ndarray, tmp: Path) -> tuple[np.ndarray, list[str]]:
    """Run the exported model (CPU, all optimizations); also the optimized graph's op types."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp / "optimized.onnx")
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
    return y, [n.op_type for n in onnx.load(str(tmp / "optimized.onnx")).graph.node]


def _export(cli: Any, folded: Path, data: Path, out: Path) -> dict[str, Any]:
    r = cli("export", folded, "-o", out, "--check", data, "--json")
    assert r.code == 0, r.err + r.out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return r.json()


def _assert_matches(got: np.ndarray, ref: np.ndarray) -> None:
    # Exact integer accumulators; the rescale is float32 in onnxruntime, float64 here.
    span = float(ref.max() - ref.min())
    assert np.abs(got - ref).max() <= 1e-5 * span, np.abs(got - ref).max()


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_static_mlp_equals_integer_reference(tmp_path: Path, cli: Any, backend: str) -> None:
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32) * 1.5
    folded = _folded(tmp_path, cli, "Mlp", x, backend)
    meta = _set_input_qparams(folded, "Mlp", x, backend)
    report = _export(cli, folded, tmp_path / "data.npz", tmp_path / "m.onnx")
    assert report["mode"] == "static"
    assert report["check"]["kernels"] == {p: ["QGemm"] for p in ("fc1", "fc2", "fc3")}
    linear = _reference(folded, meta)
    # x4 reaches far beyond the calibrated ranges: the recorded [qmin, qmax] must clamp.
    for scale in (1.0, 4.0):
        got, ops = _ort(tmp_path / "m.onnx", x * scale, tmp_path)
        _assert_matches(got, export_models.Mlp.reference(x * scale, linear))
    assert ops.count("QGemm") == 3 and "DequantizeLinear" not in ops
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}


def test_token_wise_pairs_run_matmul_integer(tmp_path: Path, cli: Any) -> None:
    x = np.random.default_rng(1).standard_normal((120, 6, 12)).astype(np.float32)
    folded = _folded(tmp_path, cli, "Tokens", x)
    meta = _set_input_qparams(folded, "Tokens", x, "x86")
    np.save(tmp_path / "data.npy", x)  # read lazily, row by row
    report = _export(cli, folded, tmp_path / "data.npy", tmp_path / "m.onnx")
    assert {r["linear"]: r["rank"] for r in report["linears"]} == {"fc1": 3, "fc2": 3}
    got, ops = _ort(tmp_path / "m.onnx", x * 3, tmp_path)
    _assert_matches(got, export_models.Tokens.reference(x * 3, _reference(folded, meta)))
    assert ops.count("MatMulIntegerToFloat") == 2 and "DequantizeLinear" not in ops


def test_excluded_pair_stays_float(tmp_path: Path, cli: Any) -> None:
    x = np.random.default_rng(2).standard_normal((200, 16)).astype(np.float32)
    folded = _folded(tmp_path, cli, "Mlp", x)
    meta = _set_input_qparams(folded, "Mlp", x, "x86", exclude=frozenset({"fc2"}))
    report = _export(cli, folded, tmp_path / "data.npz", tmp_path / "m.onnx")
    assert sorted(report["check"]["kernels"]) == ["fc1", "fc3"]
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not any(n.name.startswith("fc2/") for n in graph.node)
    got, ops = _ort(tmp_path / "m.onnx", x, tmp_path)
    _assert_matches(got, export_models.Mlp.reference(x, _reference(folded, meta)))
    assert ops.count("QGemm") == 2


def test_weight_only_exports_dynamic_int8(tmp_path: Path, cli: Any) -> None:
    x = np.random.default_rng(3).standard_normal((150, 6, 12)).astype(np.float32)
    folded = _folded(tmp_path, cli, "Tokens", x)
    meta = _set_input_qparams(folded, "Tokens", x, backend=None)
    report = _export(cli, folded, tmp_path / "data.npz", tmp_path / "m.onnx")
    assert report["mode"] == "dynamic"
    got, ops = _ort(tmp_path / "m.onnx", x, tmp_path)
    _assert_matches(got, export_models.Tokens.reference(x, _reference(folded, meta)))
    assert ops.count("DynamicQuantizeMatMul") == 2


def test_float_checkpoint_exports_float(tmp_path: Path, cli: Any) -> None:
    model = export_models.randomized(export_models.Mlp(), 4)
    ckpt = tmp_path / "float.safetensors"
    checkpoint.write_safetensors(dict(model.state_dict()), ckpt, {})
    x = np.random.default_rng(4).standard_normal((50, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", inputs=x)
    r = cli("fold", "-m", f"{MODELS}:Mlp", "-w", ckpt, "-o", tmp_path / "folded.safetensors")
    assert r.code == 0, r.err
    report = _export(cli, tmp_path / "folded.safetensors", tmp_path / "data.npz",
                     tmp_path / "m.onnx")
    assert report["mode"] == "float" and report["linears"] == []
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert not ops & {"BatchNormalization", "QuantizeLinear", "DequantizeLinear"}
    got, _ = _ort(tmp_path / "m.onnx", x, tmp_path)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()  # the unfused float model, eval BN
    assert np.abs(got - want).max() <= 1e-4 * float(want.max() - want.min())


# ---------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize(("act", "x_range", "w_range"), [
    ("quint8", (0, 127), (-128, 127)),  # x86 / fbgemm: 7-bit activations
    ("qint8", (-128, 127), (-127, 127)),  # qnnpack: int8 activations, narrow weights
])
@pytest.mark.parametrize("rank", [2, 3])
def test_fused_kernels_are_bit_exact_for_the_chosen_ranges(
    tmp_path: Path, act: str, x_range: tuple[int, int], w_range: tuple[int, int], rank: int
) -> None:
    """The W8A8 ranges make onnxruntime's fused int8 kernels exact on this CPU: operands at
    the extremes (adjacent pairs that maximise a u8 x s8 pair sum) and power-of-two scales, so
    the only rounding left is int32 -> float32; every output equals the integer accumulator."""
    from qatconv.config import InputQParams
    from qatconv.onnx_qdq import QuantLinear, lower_markers

    rng = np.random.default_rng(5)
    m, k, n = 64, 2048, 32
    (xlo, xhi), (wlo, whi) = x_range, w_range
    x_codes = rng.integers(xlo, xhi + 1, (m, k))
    x_codes[0], x_codes[1], x_codes[2] = xhi, xlo, np.tile([xhi, xhi, xlo, xlo], k // 4)
    w = rng.integers(wlo, whi + 1, (n, k))
    w[0], w[1], w[2] = wlo, whi, np.tile([wlo, wlo, whi, whi], k // 4)
    s_x, s_w = 2.0**-4, 2.0 ** -rng.integers(5, 9, n)
    q = QuantLinear("lin", w.astype(np.int8), s_w.astype(np.float32), None,
                    InputQParams(s_x, 0, xlo, xhi, act))
    shape = ["B", k] if rank == 2 else ["B", 1, k]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QLinear", ["x"], ["y"], domain="qatconv", path="lin", rank=rank)],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("qatconv", 1)])
    lower_markers(model, {"lin": q})
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "lin.onnx"))
    x = (x_codes * s_x).astype(np.float32).reshape(m, *shape[1:])
    got, ops = _ort(tmp_path / "lin.onnx", x, tmp_path)
    acc = x_codes.astype(np.int64) @ w.T.astype(np.int64)
    want = acc.astype(np.float32) * (s_x * s_w).astype(np.float32)
    assert np.array_equal(got.reshape(m, n), want)
    assert ("QGemm" if rank == 2 else "MatMulIntegerToFloat") in ops


def test_float_kernels_fail_the_check(tmp_path: Path, cli: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-D MatMul + Add QDQ form is fused by onnxruntime into a *float* Gemm (and its bias
    rounded to an int32 grid): the check sees the DequantizeLinear feeding the Gemm, exits 4 and
    writes nothing. `--allow-float-kernels` drops that reason; the accuracy still counts."""
    from qatconv import onnx_qdq

    x = np.random.default_rng(6).standard_normal((100, 16)).astype(np.float32)
    folded = _folded(tmp_path, cli, "Mlp", x)
    _set_input_qparams(folded, "Mlp", x, "x86")
    static = onnx_qdq._static_nodes
    monkeypatch.setattr(onnx_qdq, "_static_nodes",
                        lambda q, rank, *a: static(q, 3, *a))  # the MatMul form on 2-D inputs
    out = tmp_path / "m.onnx"
    r = cli("export", folded, "-o", out, "--check", tmp_path / "data.npz")
    assert r.code == 4 and not out.exists()
    assert "fc1, fc2, fc3 with float kernels" in r.err
    r = cli("export", folded, "-o", out, "--check", tmp_path / "data.npz",
            "--allow-float-kernels")
    assert "float kernels" not in r.err.splitlines()[0]
    assert (r.code == 0) == out.exists()


def test_without_onnx_exit_3_names_the_extra(tmp_path: Path, cli: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnx(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    r = cli("export", tmp_path / "missing.safetensors", "-o", tmp_path / "m.onnx")
    assert r.code == 3
    assert 'pip install "qatconv[onnx]"' in r.err


def test_refuses_a_checkpoint_that_is_not_folded(tmp_path: Path, cli: Any, samples: Path) -> None:
    r = cli("export", samples / "digits_mlp.safetensors", "-o", tmp_path / "m.onnx")
    assert r.code == 3 and "not a folded checkpoint" in r.err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--allow-float-kernels"], 2, "only apply to --check"),
    (["--opset", "12"], 2, "--opset 12"),
    (["--input-shape", "a,b"], 2, "--input-shape"),
    (["--input-shape", "0"], 2, "must be positive"),
])
def test_usage_errors(tmp_path: Path, cli: Any, args: list[str], code: int, words: str) -> None:
    x = np.random.default_rng(7).standard_normal((40, 16)).astype(np.float32)
    folded = _folded(tmp_path, cli, "Mlp", x)
    r = cli("export", folded, "-o", tmp_path / "m.onnx", *args)
    assert r.code == code and words in r.err, r.err
    assert not (tmp_path / "m.onnx").exists()


def test_existing_output_needs_force_and_input_shape_is_inferred(tmp_path: Path, cli: Any) -> None:
    x = np.random.default_rng(8).standard_normal((40, 16)).astype(np.float32)
    folded = _folded(tmp_path, cli, "Mlp", x)
    out = tmp_path / "m.onnx"
    assert cli("export", folded, "-o", out).code == 0  # shape from fc1.in_features
    graph_input = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in graph_input] == ["batch", 16]
    r = cli("export", folded, "-o", out)
    assert r.code == 3 and "--force" in r.err
    assert cli("export", folded, "-o", out, "--force", "--input-shape", "16").code == 0


def test_levit_like_attention_model_runs_every_pair_in_int8(tmp_path: Path, cli: Any) -> None:
    """A model with attention and token-wise LinearNorm pairs (tests/models/levit_like.py):
    every quantized Linear runs an int8 kernel and onnxruntime matches the emulation."""
    from tests.test_levit_like import SPEC, _files

    _, weights, _, data = _files(tmp_path)
    qat, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    assert cli("prepare", "-m", SPEC, "-w", weights, "--data", data, "-o", qat, "-q").code == 0
    assert cli("fold", qat, "-o", folded, "-q").code == 0
    check = _export(cli, folded, data, tmp_path / "m.onnx")["check"]
    assert len(check["kernels"]) == 8 and not check["float_kernels"]
    assert set(map(tuple, check["kernels"].values())) <= {
        ("MatMulIntegerToFloat",), ("DynamicQuantizeMatMul",)}
    emu = next(c for c in check["comparisons"] if c["reference"] == "emulation")
    assert emu["max_abs_error"] <= 1e-5 * emu["output_range"]
# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_prepare_fold_export_check_on_the_digits(tmp_path: Path, cli: Any, samples: Path,
                                                 backend: str) -> None:
    """The user's path: prepare (W8A8) -> fold -> export --check; the int8 model onnxruntime
    runs classifies held-out digits as the float model does, within 0.3 points."""
    qat, folded, out = (tmp_path / n for n in ("qat.safetensors", "folded.safetensors", "m.onnx"))
    r = cli("prepare", "-m", samples / "digits_mlp.py:DigitsMLP", "-w",
            samples / "digits_mlp.safetensors", "--data", samples / "digits_calib.npz",
            "--backend", backend, "-o", qat, "-q")
    assert r.code == 0, r.err
    assert cli("fold", qat, "-o", folded, "-q").code == 0
    report = _export(cli, folded, samples / "digits_heldout.npz", out)
    check = report["check"]
    assert report["mode"] == "static" and check["passed"]
    assert check["kernels"] == {"fc1": ["QGemm"], "fc2": ["QGemm"]}
    assert all(e <= 1 for e in check["step_errors"].values())
    sim = next(c for c in check["comparisons"] if c["reference"] == "simulation")
    assert sim["top1_agreement"] >= 0.9975
    meta = checkpoint.read_metadata(folded)
    assert {q["input"]["dtype"] for q in meta["qparams"].values()} == {
        "x86": {"quint8"}, "qnnpack": {"qint8"}}[backend]
    # An independent look: onnxruntime's own accuracy against the float model's.
    x, y = (np.load(samples / "digits_heldout.npz")[k] for k in ("inputs", "targets"))
    got, _ = _ort(out, x, tmp_path)
    float_model = _float_model_from(samples)
    with torch.no_grad():
        float_acc = float((float_model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert abs(float((got.argmax(1) == y).mean()) - float_acc) <= 0.003


def _float_model_from(samples: Path) -> nn.Module:
    from safetensors.torch import load_file

    from sample_models.digits_mlp import DigitsMLP

    model = DigitsMLP()
    model.load_state_dict(load_file(samples / "digits_mlp.safetensors"))
    return model.eval()


def test_prepare_exclude_fold_export_token_wise(tmp_path: Path, cli: Any) -> None:
    """Token-wise pairs through the whole pipeline, one pair excluded: the excluded Linear is
    float in the graph, the other runs MatMulIntegerToFloat, and onnxruntime equals the
    integer reference built from the written metadata."""
    x = np.random.default_rng(9).standard_normal((150, 6, 12)).astype(np.float32)
    model = export_models.randomized(export_models.Tokens(), 9)
    ckpt, data = tmp_path / "float.safetensors", tmp_path / "data.npz"
    checkpoint.write_safetensors(dict(model.state_dict()), ckpt, {})
    np.savez(data, inputs=x)
    qat, folded, out = (tmp_path / n for n in ("qat.safetensors", "folded.safetensors", "m.onnx"))
    r = cli("prepare", "-m", f"{MODELS}:Tokens", "-w", ckpt, "--data", data, "-o", qat,
            "--exclude", "fc2", "-q")
    assert r.code == 0, r.err
    assert cli("fold", qat, "-o", folded, "-q").code == 0
    report = _export(cli, folded, data, out)
    assert report["check"]["kernels"] == {"fc1": ["MatMulIntegerToFloat"]}
    meta = checkpoint.read_metadata(folded)
    assert "fc2" not in meta["qparams"]
    got, _ = _ort(out, x, tmp_path)
    _assert_matches(got, export_models.Tokens.reference(x, _reference(folded, meta)))


def test_structured_outputs_become_named_onnx_outputs(tmp_path: Path, cli: Any) -> None:
    """A model returning a dict holding a dataclass of a named tuple (tests/models/structured.py)
    exports its per-sample float tensors as named outputs, each equal to the integer reference
    of the folded model computed in torch with the emulated Linears."""
    from qatconv import api
    from qatconv.config import ModelConfig

    spec = f"{Path(export_models.__file__).parent / 'structured.py'}:MultiTask"
    model = api.load_model(ModelConfig(spec=spec)).model
    ckpt, data = tmp_path / "float.safetensors", tmp_path / "data.npz"
    checkpoint.write_safetensors(dict(model.state_dict()), ckpt, {})
    x = np.random.default_rng(10).standard_normal((64, 12)).astype(np.float32)
    np.savez(data, inputs=x)
    qat, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    assert cli("prepare", "-m", spec, "-w", ckpt, "--data", data, "-o", qat, "-q").code == 0
    assert cli("fold", qat, "-o", folded, "-q").code == 0
    _export(cli, folded, data, tmp_path / "m.onnx")
    names = [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output]
    assert names == ["['logits']", "['heads'].latent.mean", "['heads'].latent.logvar"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logits, mean, _ = sess.run(None, {"input": x})
    meta = checkpoint.read_metadata(folded)
    linear = _reference(folded, meta)

    def trunk(v: np.ndarray) -> np.ndarray:  # trunk: two quantized Linear+BN (+ReLU) blocks
        return np.maximum(linear("trunk.1.0", np.maximum(linear("trunk.0.0", v), 0)), 0)

    h = trunk(x)
    _assert_matches(logits, linear("cls", h))
    _assert_matches(mean, linear("mean", h))


def test_top1_bar_allows_one_tie_flip_on_small_data() -> None:
    from qatconv.onnx_check import Comparison, _failures

    def comp(agree: float) -> Comparison:
        return Comparison("simulation", 0.0, 1.0, agree)

    assert _failures(comp(99 / 100), False, 100) == []  # one of 100 samples: a tie can do that
    assert _failures(comp(98 / 100), False, 100)  # two: not a tie
    assert _failures(comp(1 - 2 / 800), False, 800) == []  # 99.75% of 800
    assert _failures(comp(1 - 3 / 800), False, 800)
