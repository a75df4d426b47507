"""The numpy integer emulation against slow pure-Python integer references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qatconv.config import InputQParams
from qatconv.emulate import (
    LinearQuant,
    emulate,
    emulate_linear,
    int_matmul,
    linear_quants,
    quantize,
)
from qatconv.errors import CheckpointError


def _py_quantize(x: float, scale: float, zp: int, qmin: int, qmax: int) -> int:
    """One value, by hand: x times the float32 reciprocal, rounded half to even (Python's
    round), as torch's fake quant computes it."""
    q = round(float(np.float32(x) * (np.float32(1) / np.float32(scale)))) + zp
    return min(max(q, qmin), qmax)


def _py_linear(x: list[list[float]], w: list[list[float]], b: list[float] | None,
               w_scale: list[float], qp: InputQParams | None, wmin: int, wmax: int
               ) -> list[list[float]]:
    """A quantized Linear with Python ints and floats only (no numpy arrays)."""
    wq = [[_py_quantize(v, w_scale[o], 0, wmin, wmax) for v in row] for o, row in enumerate(w)]
    out = []
    for row in x:
        if qp is not None:
            xq = [_py_quantize(v, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max) - qp.zero_point
                  for v in row]
        y = []
        for o in range(len(w)):
            if qp is None:
                acc_f = sum(float(row[i]) * (wq[o][i] * float(w_scale[o])) for i in range(len(row)))
                value = acc_f
            else:
                acc = 0
                for i in range(len(row)):
                    acc += xq[i] * wq[o][i]
                value = acc * (float(np.float32(qp.scale)) * float(w_scale[o]))
            y.append(value + (float(b[o]) if b is not None else 0.0))
        out.append(y)
    return out


def _case(seed: int, n: int = 5, k: int = 7, out: int = 4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 1.5, (n, k)).astype(np.float32)
    w = rng.normal(0, 0.5, (out, k)).astype(np.float32)
    b = rng.normal(0, 1, out).astype(np.float32)
    w_scale = (np.abs(w).max(1) / 127).astype(np.float32)
    return x, w, b, w_scale


SCHEMES = {
    "x86-u7": InputQParams(0.031, 55, 0, 127, "quint8"),
    "qnnpack-s8": InputQParams(0.027, -9, -128, 127, "qint8"),
    "zero-zp": InputQParams(0.05, 0, -128, 127, "qint8"),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulate_linear_equals_pure_python_integer_reference(scheme: str, seed: int) -> None:
    x, w, b, w_scale = _case(seed)
    qp = SCHEMES[scheme]
    quant = LinearQuant(w_scale, -128, 127, qp)
    got = emulate_linear(x, w, b, quant)
    want = _py_linear(x.tolist(), w.tolist(), b.tolist(), w_scale.tolist(), qp, -128, 127)
    # Integer accumulation is exact in both; only the float64 rescale's last bit may differ.
    np.testing.assert_allclose(got, np.array(want), rtol=1e-15, atol=1e-15)


def test_weight_only_linear_equals_pure_python_reference() -> None:
    x, w, b, w_scale = _case(3)
    got = emulate_linear(x, w, b, LinearQuant(w_scale, -127, 127, None))
    want = _py_linear(x.tolist(), w.tolist(), b.tolist(), w_scale.tolist(), None, -127, 127)
    np.testing.assert_allclose(got, np.array(want), rtol=1e-12, atol=1e-12)


def test_token_wise_input_is_one_tensor_for_the_quantizer() -> None:
    x, w, _b, w_scale = _case(4, n=12)
    qp = SCHEMES["x86-u7"]
    quant = LinearQuant(w_scale, -128, 127, qp)
    tokens = x.reshape(3, 4, -1)
    got = emulate_linear(tokens, w, None, quant)
    want = _py_linear(x.tolist(), w.tolist(), None, w_scale.tolist(), qp, -128, 127)
    assert got.shape == (3, 4, w.shape[0])
    np.testing.assert_allclose(got.reshape(12, -1), np.array(want), rtol=1e-15, atol=1e-15)


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    s = 0.5
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 100.0, -100.0], np.float32)  # x/s: .5 ties
    assert quantize(x, s, 0, -128, 127).tolist() == [0, 2, 2, 0, -2, 127, -128]
    assert quantize(x, s, 10, 0, 127).tolist() == [10, 12, 12, 10, 8, 127, 0]
    assert quantize(np.zeros(3, np.float32), 0.37, 64, 0, 127).tolist() == [64, 64, 64]


@pytest.mark.parametrize("big", [False, True])
def test_int_matmul_is_exact(big: bool) -> None:
    rng = np.random.default_rng(5)
    hi = 2**26 if big else 128  # big: sums beyond float64's exact 2**53 take the int64 path
    xq = rng.integers(-hi, hi, (3, 9))
    wq = rng.integers(-hi, hi, (4, 9))
    got = int_matmul(xq, 7, wq)
    want = [[sum((int(xq[n, i]) - 7) * int(wq[o, i]) for i in range(9)) for o in range(4)]
            for n in range(3)]
    assert got.dtype == np.int64
    assert got.tolist() == want


def test_linear_quant_from_json_rejects_damaged_records() -> None:
    good = {"scale": [0.1, 0.2], "quant_min": -128, "quant_max": 127,
            "input": {"scale": 0.5, "zero_point": 3, "qmin": 0, "qmax": 127, "dtype": "quint8"}}
    q = LinearQuant.from_json("fc", good)
    assert q.input == InputQParams(0.5, 3, 0, 127, "quint8")
    for bad in ({**good, "scale": []}, {**good, "scale": [0.1, -1.0]}, {**good, "quant_max": None},
                {**good, "input": {"scale": 0.5}},
                {**good, "input": {**good["input"], "zero_point": 300}},
                {**good, "input": {**good["input"], "scale": 0.0}}):
        with pytest.raises(CheckpointError):
            LinearQuant.from_json("fc", bad)
    assert linear_quants({"a": good, "b": {**good, "input": None}}).keys() == {"a"}
    assert linear_quants({"a": good, "b": {**good, "input": None}}, w8a8_only=False).keys() == {
        "a", "b"}


def test_weight_integers_equal_torch_fake_quant_at_the_negative_extreme_tie() -> None:
    """max|W| / 127.5 puts the most negative weight on -127.5: the rounding must be torch's."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (64, 33)).astype(np.float32)
    w[:, 0] = -np.abs(w).max(1) - 0.1  # the extreme of every row is negative
    scale = (np.abs(w).max(1) / np.float32(127.5)).astype(np.float32)
    fq = torch.fake_quantize_per_channel_affine(
        torch.from_numpy(w), torch.from_numpy(scale), torch.zeros(64, dtype=torch.int32), 0,
        -128, 127)
    wq = quantize(w, scale[:, None], 0, -128, 127)
    torch_ints = np.rint(fq.numpy().astype(np.float64) / scale[:, None])  # exact: |q| <= 128
    np.testing.assert_array_equal(wq, torch_ints)
    assert (wq[:, 0] == -128).sum() > 0  # the ties were there


def test_emulate_hooks_only_the_named_linears_and_removes_its_hooks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(10, 6)
    with torch.no_grad():
        float_out = model(x)
        w = model[2].weight.numpy()
        hidden = torch.relu(model[0](x)).numpy()
    w_scale = (np.abs(w).max(1) / 127).astype(np.float32)
    rec = {"scale": w_scale.tolist(), "quant_min": -128, "quant_max": 127,
           "input": SCHEMES["x86-u7"].to_json()}
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    got = emulate(model, tensors, {"2": rec}, x).tensors[0]
    want = emulate_linear(hidden, w, model[2].bias.detach().numpy(), LinearQuant.from_json("2", rec))
    np.testing.assert_allclose(got.numpy(), want.astype(np.float32), rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(model(x), float_out)  # hooks gone
