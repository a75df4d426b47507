"""Integer emulation of a folded static-W8A8 model: what an int8 backend computes, in numpy.

Independent of torch's fake-quant ops: each quantized Linear is run from the written tensors
and metadata alone, the way an int8 GEMM runs it:

    xq  = clamp(rint(x * (1 / s_x)) + z_x, qmin_x, qmax_x)       (float32, per tensor)
    wq  = clamp(rint(W * (1 / s_w[c])), qmin_w, qmax_w)          (per output channel, symmetric)
    acc = (xq - z_x) @ wq.T                                      (exact integer accumulation)
    y   = acc * (s_x * s_w[c]) + b                               (rescale and bias in float64)

Quantization multiplies by the float32 reciprocal of the scale and rounds half to even, as
fbgemm's `Quantize` and torch's fake quant do. This matters for weights: a symmetric per-channel
scale is ``max|W| / 127.5`` for -128..127, so the extreme negative weight sits on the tie -127.5,
which ``x * (1 / s)`` and ``x / s`` may round apart; with the reciprocal the integers equal the
QAT model's fake-quantized weight exactly. (ONNX QuantizeLinear divides: on activations the two
differ only when a value lands within an ulp of a tie.) The rest of the model (everything but the quantized Linears) runs as the folded
torch model: `emulated` forward-hooks each quantized Linear to replace its output.

Public API: `quantize`, `int_matmul`, `emulate_linear` (numpy arrays), `LinearQuant` (one
Linear's scheme, from the folded metadata), `linear_quants`, `emulated` and `emulate` (a model),
`compare` -> `IntegerCheck` (what `fold --check` reports).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qatconv.config import InputQParams
from qatconv.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qatconv.outputs import Outputs

__all__ = [
    "IntegerCheck",
    "LinearQuant",
    "compare",
    "emulate",
    "emulate_linear",
    "emulated",
    "int_matmul",
    "linear_quants",
    "quantize",
]

# float64 sums of integers are exact while every partial sum stays below 2**53.
_EXACT_F64 = 2.0**53


def quantize(
    x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, qmin: int, qmax: int
) -> np.ndarray:
    """``clamp(rint(x * (1 / scale)) + zero_point, qmin, qmax)`` as int64, in float32.

    ``scale`` / ``zero_point`` broadcast against ``x`` (a column ``(out, 1)`` for per-channel
    weights). Round half to even, as torch's fake quant and fbgemm (see the module docstring).
    """
    inv = np.reciprocal(np.asarray(scale, np.float32))
    q = np.rint(np.multiply(np.asarray(x, np.float32), inv))
    q = q.astype(np.float64) + np.asarray(zero_point, np.float64)
    return np.clip(q, qmin, qmax).astype(np.int64)


def int_matmul(xq: np.ndarray, x_zero_point: int, wq: np.ndarray) -> np.ndarray:
    """Exact ``(xq - x_zero_point) @ wq.T`` in int64 for ``xq`` (n, k) and ``wq`` (out, k).

    Runs on float64 BLAS when every partial sum provably stays below 2**53 (then each product
    and each addition is exact), else on numpy's int64 loop.
    """
    a = np.asarray(xq, np.int64) - int(x_zero_point)
    b = np.asarray(wq, np.int64)
    k = a.shape[-1]
    bound = k * (int(np.abs(a).max(initial=0)) * int(np.abs(b).max(initial=0)))
    if bound < _EXACT_F64:
        return (a.astype(np.float64) @ b.T.astype(np.float64)).astype(np.int64)
    return a @ b.T


@dataclass(frozen=True)
class LinearQuant:
    """How one folded Linear runs in int8: per-channel symmetric weights, and the input's
    per-tensor qparams (None: weight-only, the input stays float)."""

    weight_scale: np.ndarray  # (out,) float32
    weight_min: int
    weight_max: int
    input: InputQParams | None = None

    @classmethod
    def from_json(cls, linear: str, record: Mapping[str, Any]) -> LinearQuant:
        """From a folded checkpoint's ``qparams[linear]`` (``scale``, ``quant_min``,
        ``quant_max`` and, for W8A8, ``input``).

        Raises:
            CheckpointError: a field is missing or malformed.
        """
        scale, qmin, qmax = record.get("scale"), record.get("quant_min"), record.get("quant_max")
        ok = (
            isinstance(scale, list) and scale and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                and math.isfinite(v) for v in scale
            )
            and isinstance(qmin, int) and isinstance(qmax, int) and qmin < qmax
        )
        if not ok:
            raise CheckpointError(
                f"qparams[{linear!r}] has no valid weight scale / quant_min / quant_max",
                hint="fold the QAT checkpoint again with this qatconv",
            )
        raw_input = record.get("input")
        inp = None if raw_input is None else InputQParams.from_json(raw_input)
        return cls(np.asarray(scale, np.float32), qmin, qmax, inp)  # type: ignore[arg-type]


def linear_quants(qparams: Mapping[str, Any], *, w8a8_only: bool = True) -> dict[str, LinearQuant]:
    """Every Linear of a folded checkpoint's ``qparams`` metadata with its scheme.

    Args:
        qparams: ``metadata["qparams"]`` of a folded checkpoint.
        w8a8_only: keep only the Linears whose input is quantized too.
    """
    quants = {name: LinearQuant.from_json(name, rec) for name, rec in sorted(qparams.items())}
    return {n: q for n, q in quants.items() if q.input is not None or not w8a8_only}


def emulate_linear(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, quant: LinearQuant
) -> np.ndarray:
    """One quantized Linear on ``x`` (..., in) -> float64 (..., out).

    Token-wise inputs are one tensor for the input quantizer (per-tensor over all tokens).
    """
    w = np.asarray(weight, np.float32)
    out_f, in_f = w.shape
    if quant.weight_scale.shape != (out_f,):
        raise CheckpointError(
            f"weight scale has {quant.weight_scale.size} values for {out_f} output channels"
        )
    lead = x.shape[:-1]
    x2 = np.asarray(x).reshape(-1, in_f)
    wq = quantize(w, quant.weight_scale[:, None], 0, quant.weight_min, quant.weight_max)
    s_w = quant.weight_scale.astype(np.float64)
    if quant.input is None:
        y = x2.astype(np.float64) @ (wq * s_w[:, None]).T
    else:
        qp = quant.input
        xq = quantize(x2, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max)
        acc = int_matmul(xq, qp.zero_point, wq)
        y = acc.astype(np.float64) * (float(np.float32(qp.scale)) * s_w)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y.reshape(*lead, out_f)


@contextlib.contextmanager
def emulated(
    model: nn.Module,
    tensors: Mapping[str, Any],
    quants: Mapping[str, LinearQuant],
) -> Iterator[nn.Module]:
    """Within the block, each Linear named in ``quants`` computes its output with
    `emulate_linear` from ``tensors[<linear>.weight]`` / ``.bias`` (numpy or torch).

    ``model`` is the folded model (`qatconv.load_folded`); it runs everything else.
    """
    import torch

    weights = {n: (_numpy(tensors[f"{n}.weight"]), _numpy(tensors.get(f"{n}.bias")))
               for n in quants}

    def hook_for(name: str) -> Any:
        w, b = weights[name]

        def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            y = emulate_linear(args[0].detach().cpu().numpy(), w, b, quants[name])
            return torch.from_numpy(y).to(dtype=out.dtype, device=out.device)

        return hook

    handles = []
    try:
        for name in quants:
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
        yield model
    finally:
        for h in handles:
            h.remove()


def emulate(
    model: nn.Module,
    tensors: Mapping[str, Any],
    qparams: Mapping[str, Any],
    inputs: torch.Tensor,
    *,
    batch_size: int = 1024,
) -> Outputs:
    """Outputs of the folded model with every W8A8 Linear run as integer arithmetic.

    Args:
        model: the folded model (`qatconv.load_folded`), in eval mode.
        tensors: the folded checkpoint's tensors (the quantized Linears' weight and bias).
        qparams: the folded checkpoint's ``qparams`` metadata.
        inputs: model inputs, first dimension = samples.

    Returns:
        The flattened outputs (`qatconv.outputs.Outputs`; ``.tensors[0]`` for a tensor model).
    """
    import torch

    from qatconv.outputs import forward_outputs

    quants = linear_quants(qparams)
    with torch.no_grad(), emulated(model, tensors, quants):
        return forward_outputs(model, inputs, batch_size)


def _numpy(t: Any) -> np.ndarray | None:
    if t is None:
        return None
    if isinstance(t, np.ndarray):
        return t
    return t.detach().cpu().float().numpy()


# ------------------------------------------------------------------------------ the check

# `fold --check`'s integer tolerance: max abs error as a fraction of the reference output's
# range, by the folded weights' dtype. 16-bit folded weights are rounded before quantization,
# so some integers land one step away from the QAT model's.
INT_CHECK_TOLERANCE = {"F64": 1e-3, "F32": 1e-3, "F16": 1e-2, "BF16": 5e-2}


@dataclass(frozen=True)
class IntegerCheck:
    """The integer emulation of a folded W8A8 model against the QAT model (fake quant on).

    ``max_step_error``: the largest difference at the input of a quantized Linear (where the
    next layer quantizes), in that input's quantization steps; ``top1_agreement`` for
    classifier outputs (N, classes), else None. Passes when ``max_abs_error <= tolerance *
    output_range`` and every emulated output is finite.
    """

    max_abs_error: float
    output_range: float
    tolerance: float
    max_step_error: float
    top1_agreement: float | None
    samples: int
    linears: tuple[str, ...]
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_error": self.max_abs_error,
            "output_range": self.output_range,
            "relative_error": self.max_abs_error / self.output_range if self.output_range else 0.0,
            "tolerance": self.tolerance,
            "max_step_error": self.max_step_error,
            "top1_agreement": self.top1_agreement,
            "samples": self.samples,
            "linears": list(self.linears),
            "passed": self.passed,
        }


def compare(
    reference: np.ndarray,
    emulated_out: np.ndarray,
    *,
    tolerance: float,
    step_error: float,
    first: tuple[np.ndarray, np.ndarray] | None,
    samples: int,
    linears: tuple[str, ...],
) -> IntegerCheck:
    """Judge the emulation: ``reference`` / ``emulated_out`` hold every output value (flat);
    ``first`` is the first output leaf of each, for top-1 when it is (N, classes)."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(emulated_out, np.float64)
    finite = bool(np.isfinite(got).all())
    max_abs = float(np.abs(got - ref).max()) if ref.size else 0.0
    span = float(ref.max() - ref.min()) if ref.size else 0.0
    top1 = None
    if first is not None and first[0].ndim == 2 and first[0].shape[1] > 1:
        top1 = float((first[0].argmax(1) == first[1].argmax(1)).mean())
    passed = finite and max_abs <= tolerance * span
    return IntegerCheck(max_abs, span, tolerance, step_error, top1, samples, linears, passed)


@contextlib.contextmanager
def captured_inputs(model: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, list[Any]]]:
    """Within the block, the input of each module at ``paths`` is recorded per call."""
    seen: dict[str, list[Any]] = {p: [] for p in paths}
    handles = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda _m, args, p=p: seen[p].append(args[0].detach().float().cpu()))
        for p in paths
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def step_error(
    reference: Mapping[str, Sequence[Any]],
    emulated_in: Mapping[str, Sequence[Any]],
    quants: Mapping[str, LinearQuant],
) -> float:
    """Largest ``|x_emulated - x_reference| / input scale`` over the quantized Linears' inputs."""
    worst = 0.0
    for name, q in quants.items():
        if q.input is None:
            continue
        for a, b in zip(reference[name], emulated_in[name], strict=True):
            diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64))
            if diff.size:
                worst = max(worst, float(np.abs(diff).max()) / float(np.float32(q.input.scale)))
    return worst
