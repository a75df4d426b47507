"""`export --check`: run the exported model in onnxruntime and hold it against two references.

- the integer emulation (`qatconv.emulate`): every quantized Linear computed on integers in
  numpy (inputs quantized with the recorded qparams as ONNX ``QuantizeLinear`` does, exact
  integer accumulation, then rescale and bias in float64); weight-only Linears quantize their
  input as ``DynamicQuantizeLinear`` does.
  What an int8 runtime must compute: onnxruntime should match it to float rounding.
- the QAT simulation: the same Linears with torch's fake quant on input and weight (the ops the
  QAT ran), float32.

Also reads onnxruntime's optimized graph and lists the kernels that consume each Linear's int8
weight: a ``DequantizeLinear`` there means the matmul runs in float.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from qatconv import emulate
from qatconv.onnx_qdq import INT8_KERNELS, Lowered, QuantLinear, kernels_by_linear

BATCH = 256
# onnxruntime vs the emulation: the accumulators are exact; the rescale is float32 there and
# float64 here. Where that moves a value across a rounding boundary of the next layer's input
# quantization, that code moves by one step (and the output by that step's effect).
MAX_STEP_ERROR = 1
REL_TOLERANCE = 1e-3  # of the reference output's range (max - min)
FLOAT_REL_TOLERANCE = 1e-5  # float export vs torch: float32 op order only
MIN_TOP1_AGREEMENT = 0.9975


@dataclass(frozen=True)
class Comparison:
    """onnxruntime's first output against one reference."""

    reference: str  # "emulation" | "simulation" | "float"
    max_abs_error: float
    output_range: float
    top1_agreement: float | None
    reference_accuracy: float | None = None  # the reference's, when the data has labels

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "max_abs_error": self.max_abs_error,
                "output_range": self.output_range, "top1_agreement": self.top1_agreement,
                "reference_accuracy": self.reference_accuracy}


@dataclass(frozen=True)
class ExportCheck:
    """What `--check` measured.

    ``step_errors``: per quantized Linear, the largest difference between the input codes
    onnxruntime computed and the emulation's, in quantization steps.
    """

    samples: int
    comparisons: tuple[Comparison, ...]
    step_errors: dict[str, int]
    kernels: dict[str, list[str]]
    float_kernels: tuple[str, ...]
    passed: bool
    failures: tuple[str, ...]
    accuracy: float | None = None  # onnxruntime's top-1 accuracy, when the data has labels

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "accuracy": self.accuracy,
            "comparisons": [c.to_json() for c in self.comparisons],
            "step_errors": self.step_errors,
            "kernels": self.kernels,
            "float_kernels": list(self.float_kernels),
            "passed": self.passed,
            "failures": list(self.failures),
        }


# ---------------------------------------------------------------------------- the emulation


def onnx_quantize(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """ONNX ``QuantizeLinear`` as onnxruntime runs it: ``x / scale`` in float32 (a division:
    torch's fake quant multiplies by the float32 reciprocal, which differs within an ulp of a
    rounding tie), round half to even, clamp."""
    q = np.rint(x.astype(np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, qmin, qmax).astype(np.int64)


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """ONNX ``DynamicQuantizeLinear``: uint8 over ``[min(0, x), max(0, x)]``, in float32."""
    x = x.astype(np.float32)
    lo, hi = np.float32(min(0.0, float(x.min()))), np.float32(max(0.0, float(x.max())))
    scale = np.float32((hi - lo) / np.float32(255)) if hi > lo else np.float32(1)
    zp = int(np.clip(np.rint(np.float32(0) - lo / scale), 0, 255))
    return onnx_quantize(x, float(scale), zp, 0, 255), scale, zp


class EmulatedLinear(nn.Module):
    """A quantized Linear computed on integers (`qatconv.emulate`, from the exported int8
    weight); records its input codes per call. A weight-only Linear quantizes its input as
    onnxruntime's dynamic form does."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__()
        self.q = q
        self.codes: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = x.detach().float().numpy()
        x2 = xn.reshape(-1, xn.shape[-1])
        a = self.q.input
        if a is None:
            codes, scale, zp = dynamic_quantize(x2)
        else:
            codes = onnx_quantize(x2, a.scale, a.zero_point, a.quant_min, a.quant_max)
            scale, zp = np.float32(a.scale), a.zero_point
        self.codes.append(codes.reshape(xn.shape))
        acc = emulate.int_matmul(codes, zp, self.q.weight.astype(np.int64))
        y = acc.astype(np.float64) * (float(scale) * self.q.weight_scale.astype(np.float64))
        if self.q.bias is not None:
            y += self.q.bias.astype(np.float64)
        return torch.from_numpy(y.astype(np.float32).reshape(*xn.shape[:-1], -1))


class SimulatedLinear(nn.Module):
    """A quantized Linear as the QAT simulated it: torch fake quant on input and weight."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__()
        self.q = q
        self.weight = torch.from_numpy(q.weight.astype(np.float32) * q.weight_scale[:, None])
        self.bias = None if q.bias is None else torch.from_numpy(q.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.q.input
        if a is not None:
            x = torch.fake_quantize_per_tensor_affine(x, a.scale, a.zero_point, a.quant_min,
                                                      a.quant_max)
        return nn.functional.linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------- the check


def check_onnx(
    proto: onnx.ModelProto,
    lowered: Sequence[Lowered],
    model: nn.Module,
    linears: dict[str, QuantLinear],
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    allow_float_kernels: bool = False,
) -> ExportCheck:
    """Run ``proto`` in onnxruntime on ``inputs`` and compare (see the module docstring);
    with class-label ``targets``, also report top-1 accuracies."""
    from qatconv.modelcopy import copy_model
    from qatconv.qat import _set_submodule

    x = inputs.float().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        got = _run_ort(session(proto, optimized), x)[0]
        kernels = kernels_by_linear(onnx.load(str(optimized)), lowered)
    float_kernels = tuple(p for p, ops in kernels.items() if not INT8_KERNELS & set(ops))
    labels = _labels(targets, got)
    acc = _accuracy(got, labels)
    if not linears:
        comps = (_compare("float", got, _run_torch(model, inputs), labels),)
        return _verdict(len(x), comps, {}, kernels, float_kernels, allow_float_kernels, acc)
    emulated = copy_model(model)
    for path, q in linears.items():
        _set_submodule(emulated, path, EmulatedLinear(q))
    simulated = copy_model(model)
    for path, q in linears.items():
        _set_submodule(simulated, path, SimulatedLinear(q))
    comps = (_compare("emulation", got, _run_torch(emulated, inputs), labels),
             _compare("simulation", got, _run_torch(simulated, inputs), labels))
    steps = _step_errors(proto, lowered, emulated, x)
    return _verdict(len(x), comps, steps, kernels, float_kernels, allow_float_kernels, acc,
                    dynamic=any(q.input is None for q in linears.values()))


def _labels(targets: torch.Tensor | None, got: np.ndarray) -> np.ndarray | None:
    """Class labels when ``targets`` are integers, one per sample of a (N, classes) output."""
    if targets is None or targets.is_floating_point() or targets.dim() != 1:
        return None
    if got.ndim != 2 or got.shape[1] < 2 or len(targets) != len(got):
        return None
    return targets.numpy()


def _accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((logits.argmax(1) == labels).mean())


def session(proto: onnx.ModelProto, optimized: Path | None = None,
            threads: int = 0) -> ort.InferenceSession:
    """A CPU session with every graph optimization on (``optimized``: where to save the graph)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # the "optimized model is hardware specific" warning
    so.intra_op_num_threads = threads or _managed_threads()
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _managed_threads() -> int:
    """The count qatconv.threads chose for this command (0: onnxruntime's own default)."""
    from qatconv import threads

    choice = threads.current()
    return choice.threads if choice is not None else 0


def _run_ort(sess: ort.InferenceSession, x: np.ndarray) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i : i + BATCH]}) for i in range(0, len(x), BATCH)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def _run_torch(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """The model's first output (what onnxruntime's first output is compared with)."""
    from qatconv.outputs import first_output

    with torch.no_grad():
        parts = [first_output(model(chunk), len(chunk))
                 for chunk in inputs.float().split(BATCH)]
    return torch.cat(parts).float().numpy()


def _compare(reference: str, got: np.ndarray, ref: np.ndarray,
             labels: np.ndarray | None) -> Comparison:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    top1 = None
    if ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float((got.argmax(1) == ref.argmax(1)).mean())
    return Comparison(reference, float(diff.max()) if diff.size else 0.0,
                      float(ref.max() - ref.min()) if ref.size else 0.0, top1,
                      _accuracy(ref, labels))


def _step_errors(proto: onnx.ModelProto, lowered: Sequence[Lowered], emulated: nn.Module,
                 x: np.ndarray) -> dict[str, int]:
    """Per Linear: max |onnxruntime's input codes - the emulation's| over all calls."""
    debug = onnx.ModelProto()
    debug.CopyFrom(proto)
    names = [low.quantize_output for low in lowered]
    debug.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    outs = _run_ort(session(debug), x)[-len(names):] if names else []
    calls: dict[str, int] = {}
    worst: dict[str, int] = {}
    for low, codes in zip(lowered, outs, strict=True):
        k = calls.get(low.path, 0)
        calls[low.path] = k + 1
        module = emulated.get_submodule(low.path)
        assert isinstance(module, EmulatedLinear)
        per_call = module.codes[k :: _calls_per_batch(lowered, low.path)]
        emu = np.concatenate(per_call)
        err = int(np.abs(codes.astype(np.int64).reshape(emu.shape) - emu).max()) if emu.size else 0
        worst[low.path] = max(worst.get(low.path, 0), err)
    return worst


def _calls_per_batch(lowered: Sequence[Lowered], path: str) -> int:
    return sum(1 for low in lowered if low.path == path)


def _verdict(samples: int, comps: tuple[Comparison, ...], steps: dict[str, int],
             kernels: dict[str, list[str]], float_kernels: tuple[str, ...],
             allow_float_kernels: bool, accuracy: float | None,
             dynamic: bool = False) -> ExportCheck:
    failures = [f for c in comps for f in _failures(c, dynamic, samples)]
    failures += [f"{p}: input codes differ from the emulation by {e} steps"
                 for p, e in steps.items() if e > MAX_STEP_ERROR]
    if float_kernels and not allow_float_kernels:
        failures.append(f"onnxruntime runs {', '.join(float_kernels)} with float kernels")
    return ExportCheck(samples, comps, steps, kernels, float_kernels, not failures,
                       tuple(failures), accuracy)


def _failures(c: Comparison, dynamic: bool, samples: int) -> list[str]:
    if c.reference == "simulation" and dynamic:
        return []  # weight-only QAT never simulated the dynamic activation quantization
    rel = FLOAT_REL_TOLERANCE if c.reference == "float" else REL_TOLERANCE
    out = []
    if not c.max_abs_error <= rel * max(c.output_range, 1e-12):
        out.append(f"max abs error vs the {c.reference} {c.max_abs_error:.3g} > {rel:g} x "
                   f"output range {c.output_range:.3g}")
    # One flipped sample is what a single rounding tie can do; on fewer than 400 samples it
    # alone would be below the bar.
    allowed = max(1, int((1 - MIN_TOP1_AGREEMENT) * samples + 1e-9))
    if c.top1_agreement is not None and round((1 - c.top1_agreement) * samples) > allowed:
        out.append(f"top-1 agreement with the {c.reference} {c.top1_agreement:.2%} < "
                   f"{MIN_TOP1_AGREEMENT:.2%} ({allowed} differing sample(s) allowed)")
    return out

