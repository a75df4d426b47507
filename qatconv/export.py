"""`qatconv export`: a folded checkpoint -> an ONNX model that onnxruntime runs in int8.

folded safetensors + model spec -> BN-free float model (`api.load_folded`) -> each quantized
Linear swapped for a marker -> ``torch.onnx.export`` (TorchScript exporter: no onnxscript
needed) -> markers lowered to QDQ / dynamic int8 subgraphs (`onnx_qdq`) -> optional check in
onnxruntime against the integer emulation and the QAT simulation -> atomic write.

The weight codes are the folded weight quantized with the trained scales by torch's own
``fake_quantize_per_channel_affine`` (the op the QAT ran), so the int8 initializer holds exactly
the weight the QAT simulated.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qatconv.atomic import write_atomic
from qatconv.config import ModelConfig
from qatconv.errors import (
    BadInputError,
    CheckFailedError,
    CheckpointError,
    UsageError,
    first_line,
)

if TYPE_CHECKING:
    import onnx

    from qatconv.onnx_check import ExportCheck
    from qatconv.onnx_qdq import Lowered, QuantLinear

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportReport:
    output: Path
    mode: str  # "static" | "dynamic" | "mixed" | "float"
    linears: tuple[dict[str, Any], ...]
    opset: int
    bytes: int
    check: ExportCheck | None
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output), "mode": self.mode, "linears": list(self.linears),
            "opset": self.opset, "bytes": self.bytes,
            "check": self.check.to_json() if self.check else None,
            "seconds": self.seconds, "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------- dependencies


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a BadInputError (exit 3) naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise BadInputError(
            f"export needs onnx and onnxruntime ({e.name or e} is not installed)",
            hint='install the extra: pip install "qatconv[onnx]"',
        ) from None
    return onnx, onnxruntime


# ---------------------------------------------------------------------------- the pipeline


def export(
    folded: Path,
    out: Path,
    *,
    model_cfg: ModelConfig | None = None,
    opset: int = DEFAULT_OPSET,
    check: Path | None = None,
    allow_float_kernels: bool = False,
    input_shape: Sequence[int] | None = None,
    target_column: str | None = None,
    force: bool = False,
) -> ExportReport:
    """Write ``folded`` as an int8 ONNX model (QDQ; dynamic for weight-only pairs).

    Args:
        folded: a checkpoint written by `qatconv fold`.
        out: the ``.onnx`` file to write.
        model_cfg: the model spec when the checkpoint's metadata names none.
        check: data to run onnxruntime on against the integer emulation and the QAT
            simulation; the file is written only when that check passes.
        allow_float_kernels: with ``check``, accept quantized Linears that onnxruntime runs
            with float kernels.
        input_shape: one sample's shape (without the batch axis), when there is no ``check``
            data and the model does not start with a Linear.

    Raises:
        BadInputError: onnx/onnxruntime missing, not a folded checkpoint, bad qparams (exit 3).
        CheckFailedError: the check failed (exit 4); nothing is written.
    """
    from qatconv import checkpoint

    require_onnx()
    started = time.perf_counter()
    _check_flags(opset, check, allow_float_kernels, target_column, input_shape)
    checkpoint.check_output_path(out, force=force, inputs=[folded, *([check] if check else [])])
    model, meta = _load(folded, model_cfg)
    linears = quant_linears(model, folded, meta)
    data = _load_data(check, target_column) if check else None
    sample = _sample_input(model, data, input_shape)
    proto, lowered = to_onnx(model, linears, sample, opset)
    result = None
    if data is not None:
        from qatconv.onnx_check import check_onnx

        # `.npy` / `.safetensors` data are lazy rows: the check needs them all, once.
        targets = None if data.targets is None else data.targets[: len(data)]
        result = check_onnx(proto, lowered, model, linears, data.inputs[: len(data)], targets,
                            allow_float_kernels=allow_float_kernels)
        if not result.passed:
            raise CheckFailedError(
                f"onnxruntime check failed: {'; '.join(result.failures)}; nothing was written",
                hint="float kernels: the graph form did not fuse on this onnxruntime "
                "(--allow-float-kernels accepts that); errors: compare with `fold --check`",
            )
    raw = proto.SerializeToString()
    write_atomic(out, raw)
    return ExportReport(out, _mode(linears), _linear_rows(lowered), opset, len(raw),
                        result, time.perf_counter() - started)


def _check_flags(opset: int, check: Path | None, allow_float_kernels: bool,
                 target_column: str | None, input_shape: Sequence[int] | None) -> None:
    if not 13 <= opset <= 20:
        raise UsageError(f"--opset {opset} is not supported",
                         hint="use 13..20 (per-channel QuantizeLinear needs 13; torch's "
                         "TorchScript exporter stops at 20)")
    if check is None and (allow_float_kernels or target_column is not None):
        raise UsageError("--allow-float-kernels and --target-column only apply to --check",
                         hint="add --check DATA")
    if input_shape is not None and any(d <= 0 for d in input_shape):
        raise UsageError(f"--input-shape {list(input_shape)}: every size must be positive")


def _mode(linears: dict[str, QuantLinear]) -> str:
    forms = {q.form for q in linears.values()}
    if not forms:
        return "float"
    return forms.pop() if len(forms) == 1 else "mixed"


def _linear_rows(lowered: Sequence[Lowered]) -> tuple[dict[str, Any], ...]:
    seen: dict[str, dict[str, Any]] = {}
    for low in lowered:
        seen.setdefault(low.path, {"linear": low.path, "form": low.form, "rank": low.rank})
    return tuple(seen.values())


def _load(folded: Path, model_cfg: ModelConfig | None) -> tuple[nn.Module, dict[str, Any]]:
    from qatconv import api, checkpoint

    meta = checkpoint.read_metadata(folded)
    if meta.get("stage") != "folded":
        raise BadInputError(
            f"{folded} is not a folded checkpoint (stage: {meta.get('stage', 'none')})",
            hint="fold it first: qatconv fold QAT.safetensors -o folded.safetensors",
        )
    cfg = api._model_cfg_from_meta(meta, model_cfg)
    model = api.load_model(cfg).model
    api.load_folded(model, folded)
    return model.float().eval(), meta


def _load_data(path: Path, target_column: str | None) -> Any:
    from qatconv import data as data_mod

    return data_mod.load_data(path, target_column=target_column)


# ---------------------------------------------------------------------------- qparams


def quant_linears(model: nn.Module, folded: Path, meta: dict[str, Any]) -> dict[str, QuantLinear]:
    """Each quantized Linear's int8 weight, scales and input qparams, from the folded file.

    A pair is quantized when the metadata's ``qparams`` records its weight scale; excluded
    pairs and float checkpoints have none and stay float.

    Raises:
        CheckpointError: damaged qparams, a weight scheme that is not per-channel symmetric
            int8, or a scale count that does not match the Linear.
    """
    from qatconv import emulate

    qparams = meta.get("qparams") or {}
    if not isinstance(qparams, dict):
        raise CheckpointError(f"{folded}: metadata qparams is not an object")
    quants = emulate.linear_quants(qparams, w8a8_only=False)
    return {path: _quant_linear(model, path, q, qparams[path], folded)
            for path, q in quants.items()}


def _quant_linear(model: nn.Module, path: str, q: Any, rec: dict[str, Any],
                  folded: Path) -> QuantLinear:
    from qatconv.onnx_qdq import QuantLinear

    linear = model.get_submodule(path)
    scheme = str(rec.get("scheme", "symmetric"))
    if "symmetric" not in scheme or not -128 <= q.weight_min < q.weight_max <= 127:
        raise CheckpointError(
            f"{folded}: {path} weights are {scheme} in [{q.weight_min}, {q.weight_max}]; "
            "export writes per-channel symmetric int8 weights",
            hint="prepare with the default weight scheme (--weight-bits 2..8)",
        )
    if q.weight_scale.shape != (linear.out_features,):
        raise CheckpointError(f"{folded}: {path} has {q.weight_scale.size} weight scales for "
                              f"{linear.out_features} output channels")
    scale = torch.from_numpy(q.weight_scale)
    zero = torch.zeros(linear.out_features, dtype=torch.int32)
    w = linear.weight.detach().float()
    # torch's own fake-quant op, as the QAT ran it: the int8 weight is the simulated one.
    fq = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, q.weight_min, q.weight_max)
    codes = torch.round(fq / scale[:, None]).to(torch.int8).numpy()
    bias = None if linear.bias is None else linear.bias.detach().float().numpy()
    return QuantLinear(path, codes, q.weight_scale, bias, q.input)


# ---------------------------------------------------------------------------- tracing


def _sample_input(model: nn.Module, data: Any, input_shape: Sequence[int] | None) -> torch.Tensor:
    """Two samples to trace with: from the data, ``input_shape``, or the first Linear's width."""
    if data is not None:
        return data.inputs[:2].float()
    if input_shape is not None:
        return torch.zeros(2, *input_shape)
    need = UsageError("export needs the model's input shape",
                      hint="pass --check DATA or --input-shape (one sample, e.g. 16,64)")
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise need
    sample = torch.zeros(2, first.in_features)
    try:
        with torch.no_grad():
            model(sample)
    except Exception:  # noqa: BLE001 - any failure means: the guess is not the input shape
        raise need from None
    return sample


def to_onnx(model: nn.Module, linears: dict[str, QuantLinear], sample: torch.Tensor,
            opset: int) -> tuple[onnx.ModelProto, list[Lowered]]:
    """Trace ``model`` with each of ``linears`` as a marker, then lower the markers."""
    import onnx

    from qatconv import onnx_qdq
    from qatconv.modelcopy import copy_model
    from qatconv.outputs import flatten_outputs
    from qatconv.qat import _set_submodule

    inner = copy_model(model)
    for path in linears:
        _set_submodule(inner, path, _Marker(inner.get_submodule(path), path))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The trace bakes the sample's shapes where model code reads them as Python numbers.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        names = list(flatten_outputs(inner(sample), batch=len(sample)).names)
        traced = _FlatOutputs(inner, names)
        try:
            torch.onnx.export(
                traced, (sample,), buf, dynamo=False, opset_version=opset,
                input_names=["input"], output_names=names,
                dynamic_axes={n: {0: "batch"} for n in ["input", *names]},
                custom_opsets={onnx_qdq.MARKER_DOMAIN: 1} if linears else None,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds
            raise BadInputError(f"torch.onnx.export failed: {type(e).__name__}: "
                                f"{first_line(e)[:300]}",
                                hint="the model must be traceable by torch.jit.trace") from None
    proto = onnx.load_from_string(buf.getvalue())
    lowered = onnx_qdq.lower_markers(proto, linears)
    del proto.graph.value_info[:]  # stale shapes of the marker outputs
    onnx.checker.check_model(proto, full_check=True)
    return proto, lowered


class _FlatOutputs(nn.Module):
    """The model with its output flattened to its per-sample float tensors (`qatconv.outputs`):
    the ONNX outputs, named like ``output`` or ``['logits']``, whatever structure it returns."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names  # the per-sample leaves, chosen on an untraced run

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from qatconv.outputs import flatten_outputs

        flat = flatten_outputs(self.model(x))
        return tuple(t for n, t in zip(flat.names, flat.tensors, strict=True) if n in self.names)


class _Marker(nn.Module):
    """Stands in for a quantized Linear while tracing: one ``qatconv::QLinear`` node."""

    def __init__(self, linear: nn.Linear, path: str) -> None:
        super().__init__()
        self.fn = _marker_fn(linear, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)


def _marker_fn(linear: nn.Linear, path: str) -> type[torch.autograd.Function]:
    # Captured outside the trace: a parameter read inside it would become an initializer.
    weight = linear.weight.detach().clone()
    bias = None if linear.bias is None else linear.bias.detach().clone()
    out_features = linear.out_features

    class QLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, weight, bias)

        @staticmethod
        def symbolic(g: Any, x: Any) -> Any:
            from qatconv.onnx_qdq import MARKER_DOMAIN, MARKER_OP

            rank = x.type().dim()  # known: the trace ran on a sample
            y = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, path_s=path, rank_i=rank or 0)
            if rank:
                y.setType(x.type().with_sizes([None] * (rank - 1) + [out_features]))
            return y

    return QLinear
