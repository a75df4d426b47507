"""Fold planning: which tensors a fold reads, drops and writes, checked before anything is written.

`make_plan` validates the pairs against a checkpoint's tensor table (name -> dtype, shape) and
computes everything but the folded weights (per-pair BN scale, folded bias, quant params); the
in-memory fold (`fold_state_dict`, here) and the streaming one (`fold_stream.fold_file`) both
execute a plan, so both produce the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qatconv import st_arrays
from qatconv.dtypes import FLOAT_DTYPES, INT_DTYPES, has_st_dtype, st_dtype, torch_dtype
from qatconv.errors import CheckpointError, UsageError
from qatconv.fold_math import bn_scale, fold_bias
from qatconv.pair_record import PairRecord

if TYPE_CHECKING:
    import torch

__all__ = ["FoldPair", "FoldReport", "fold_state_dict", "make_plan"]

TensorInfos = Mapping[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)
# Reads one (small) tensor by name as its storage array (`st_arrays`: BF16 as uint16 bits).
Loader = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class FoldPair:
    """Where one pair's tensors live in a checkpoint, and what folding it writes.

    The folded weight and bias are written as ``<linear>.weight`` / ``<linear>.bias``; every
    tensor named by a ``*_key`` and every tensor under a ``drop_prefixes`` entry (module paths
    ending in ".") is removed. ``quant_min`` / ``quant_max`` (the weight fake-quant's integer
    range, when known) only feed the reported quant params. ``input_scale_key`` /
    ``input_zero_point_key`` (static W8A8) name the input fake quant's per-tensor qparams.
    """

    linear: str
    weight_key: str
    bias_key: str | None
    gamma_key: str | None
    beta_key: str | None
    mean_key: str
    var_key: str
    eps: float
    drop_prefixes: tuple[str, ...] = ()
    scale_key: str | None = None
    zero_point_key: str | None = None
    quant_min: int | None = None
    quant_max: int | None = None
    input_scale_key: str | None = None
    input_zero_point_key: str | None = None
    excluded: bool = False  # kept out of quantization (`--exclude`): no quant params by design

    def __post_init__(self) -> None:
        for p in self.drop_prefixes:
            if not p.endswith("."):
                raise ValueError(f"drop prefix {p!r} must be a module path ending in '.'")
        if (self.scale_key is None) != (self.zero_point_key is None):
            raise ValueError("scale_key and zero_point_key go together")
        if (self.input_scale_key is None) != (self.input_zero_point_key is None):
            raise ValueError("input_scale_key and input_zero_point_key go together")

    @property
    def out_weight(self) -> str:
        return f"{self.linear}.weight"

    @property
    def out_bias(self) -> str:
        return f"{self.linear}.bias"

    def source_keys(self) -> list[str]:
        """The tensors this pair reads, weight first."""
        keys = [self.weight_key, self.bias_key, self.mean_key, self.var_key, self.gamma_key,
                self.beta_key, self.scale_key, self.zero_point_key, self.input_scale_key,
                self.input_zero_point_key]  # fmt: skip
        return [k for k in keys if k is not None]

    @classmethod
    def from_qat_record(
        cls,
        record: PairRecord,
        quant_range: tuple[int, int] | None = None,
        *,
        w8a8: bool = False,
    ) -> FoldPair:
        """The pair of a QAT checkpoint: a ``LinearBn1d`` at ``record.qat``.

        ``quant_range`` (the weight fake-quant's ``(quant_min, quant_max)``, e.g. from the
        checkpoint's metadata) is used when the record has no ``quant_min`` / ``quant_max``.
        ``w8a8``: the module also holds an ``input_fake_quant`` whose qparams are read.
        """
        q = record.qat
        qmin, qmax = record.extra.get("quant_min"), record.extra.get("quant_max")
        if not (isinstance(qmin, int) and isinstance(qmax, int)) and quant_range is not None:
            qmin, qmax = quant_range
        return cls(
            linear=record.linear,
            weight_key=f"{q}.weight",
            bias_key=f"{q}.bias" if record.bias else None,
            # LinearBn1d's BN is always affine; affine=False pairs are stored as ones/zeros.
            gamma_key=f"{q}.bn.weight",
            beta_key=f"{q}.bn.bias",
            mean_key=f"{q}.bn.running_mean",
            var_key=f"{q}.bn.running_var",
            eps=float(record.eps),
            drop_prefixes=(f"{q}.bn.", f"{q}.weight_fake_quant.", f"{q}.activation_post_process.",
                           f"{q}.input_fake_quant."),
            scale_key=f"{q}.weight_fake_quant.scale",
            zero_point_key=f"{q}.weight_fake_quant.zero_point",
            quant_min=qmin if isinstance(qmin, int) else None,
            quant_max=qmax if isinstance(qmax, int) else None,
            input_scale_key=f"{q}.input_fake_quant.scale" if w8a8 else None,
            input_zero_point_key=f"{q}.input_fake_quant.zero_point" if w8a8 else None,
        )

    @classmethod
    def from_float_record(cls, record: PairRecord) -> FoldPair:
        """The pair of a float checkpoint: Linear at ``record.linear``, BN at ``record.bn``."""
        lin, bn, affine = record.linear, record.bn, record.is_affine
        return cls(
            linear=lin,
            weight_key=f"{lin}.weight",
            bias_key=f"{lin}.bias" if record.bias else None,
            gamma_key=f"{bn}.weight" if affine else None,
            beta_key=f"{bn}.bias" if affine else None,
            mean_key=f"{bn}.running_mean",
            var_key=f"{bn}.running_var",
            eps=float(record.eps),
            drop_prefixes=(f"{bn}.",),
        )


@dataclass
class FoldReport:
    """What a fold did.

    ``pairs``: the Linear paths folded. ``removed``: source tensor names not in the output
    (BN and fake-quant state). ``bytes_in`` / ``bytes_out``: sizes of the safetensors files
    read / written (0 in memory). ``files``: files written (shards, then the index).
    ``qparams``: per pair with fake-quant state, ``{"scheme": "symmetric"|"asymmetric",
    "granularity": "channel"|"tensor", and "quant_min", "quant_max", "bits" when known}``.
    """

    pairs: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    files: list[Path] = field(default_factory=list)
    qparams: dict[str, dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Planning (shared by the in-memory and the streaming fold)
# --------------------------------------------------------------------------------------------
@dataclass
class PairPlan:
    pair: FoldPair
    weight_dtype: str
    shape: tuple[int, int]
    scale: np.ndarray  # float64 (out,)
    bias_dtype: str
    bias: np.ndarray  # folded, as the output dtype's storage (`st_arrays`)
    extra: dict[str, tuple[str, np.ndarray]]  # qparam tensors to emit: name -> (dtype, storage)
    qparams: dict[str, Any] | None


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None = None  # pass-through: the source tensor's name
    pair: PairPlan | None = None  # folded weight of this pair
    data: np.ndarray | None = None  # small tensor computed up front (storage array)


@dataclass
class Plan:
    outputs: list[OutTensor]  # in source order
    removed: list[str]
    pairs: list[PairPlan]


def make_plan(
    infos: TensorInfos,
    load: Loader,
    pairs: Sequence[FoldPair],
    emit_qparams: bool,
    where: str,
) -> Plan:
    """Validate ``pairs`` against the source (name -> (dtype, shape), in source order) and
    compute everything but the folded weights."""
    if emit_qparams:
        _check_qparams_exist(pairs)
    claimed = _claim_tensors(infos, pairs, where)
    prefixes = {pre for p in pairs for pre in p.drop_prefixes}
    plans = [_plan_pair(p, infos, load, emit_qparams) for p in pairs]
    outputs = _outputs(infos, plans, lambda name: _dropped(name, claimed, prefixes))
    seen = _unique_outputs(outputs, where)
    removed = sorted(n for n in infos if n not in seen)
    return Plan(outputs, removed, plans)


def _check_qparams_exist(pairs: Sequence[FoldPair]) -> None:
    no_q = [p.linear for p in pairs if p.scale_key is None and not p.excluded]
    if no_q:
        raise UsageError(
            f"--emit-qparams needs fake-quant state, and pair(s) {', '.join(no_q[:3])} "
            "have none (a float checkpoint has no quant params)",
            hint="fold a QAT checkpoint written by `qatconv prepare`, or drop --emit-qparams",
        )


def _claim_tensors(infos: TensorInfos, pairs: Sequence[FoldPair], where: str) -> dict[str, str]:
    """Source tensor -> the Linear of the one pair that reads it; every one must exist."""
    claimed: dict[str, str] = {}
    linears: set[str] = set()
    for p in pairs:
        if p.linear in linears:
            raise CheckpointError(f"Linear {p.linear!r} appears in two pairs")
        linears.add(p.linear)
        for k in p.source_keys():
            if k in claimed:
                raise CheckpointError(
                    f"tensor {k!r} belongs to pairs {claimed[k]!r} and {p.linear!r}"
                )
            claimed[k] = p.linear
        missing = [k for k in p.source_keys() if k not in infos]
        if missing:
            raise CheckpointError(
                f"pair {p.linear!r}: tensor {missing[0]!r} is missing from {where}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                hint="the pairs do not match this checkpoint: check --model, or that the file "
                "is the one `qatconv prepare` wrote",
            )
    return claimed


def _dropped(name: str, claimed: Mapping[str, str], prefixes: set[str]) -> bool:
    if name in claimed:
        return True
    cut = name.find(".")
    while cut != -1:
        if name[: cut + 1] in prefixes:
            return True
        cut = name.find(".", cut + 1)
    return False


def _outputs(
    infos: TensorInfos, plans: Sequence[PairPlan], dropped: Callable[[str], bool]
) -> list[OutTensor]:
    """The output tensors in source order: each folded weight where its source weight was,
    followed by its bias and qparam tensors; pass-through tensors as they come."""
    by_weight = {pp.pair.weight_key: pp for pp in plans}
    outputs: list[OutTensor] = []
    for name, (dtype, shape) in infos.items():
        pp = by_weight.get(name)
        if pp is not None:
            p = pp.pair
            outputs.append(OutTensor(p.out_weight, pp.weight_dtype, pp.shape, pair=pp))
            outputs.append(OutTensor(p.out_bias, pp.bias_dtype, (pp.shape[0],), data=pp.bias))
            for qname, (dtype, arr) in pp.extra.items():
                outputs.append(OutTensor(qname, dtype, tuple(arr.shape), data=arr))
        elif not dropped(name):
            outputs.append(OutTensor(name, dtype, shape, source=name))
    return outputs


def _unique_outputs(outputs: Sequence[OutTensor], where: str) -> dict[str, OutTensor]:
    seen: dict[str, OutTensor] = {}
    for o in outputs:
        if o.name in seen:
            raise CheckpointError(
                f"folding would write tensor {o.name!r} twice: {where} already holds it "
                "beside the pair that produces it",
                hint="a pair record says bias=false while the checkpoint has the Linear's bias?",
            )
        seen[o.name] = o
    return seen


def _plan_pair(p: FoldPair, infos: TensorInfos, load: Loader, emit_qparams: bool) -> PairPlan:
    w_dtype, w_shape = _check_weight(p, infos)
    out = w_shape[0]
    vecs = _load_vectors(p, infos, load, out)
    _check_statistics(p, vecs, out)
    mean, var = vecs["running_mean"], vecs["running_var"]
    assert mean is not None and var is not None  # keys are mandatory
    bias, gamma, beta = vecs["bias"], vecs["BN weight"], vecs["BN bias"]
    s = bn_scale(var, p.eps, gamma)
    bias_dtype = infos[p.bias_key][0] if p.bias_key is not None else w_dtype
    with np.errstate(over="ignore", invalid="ignore"):
        folded_bias = st_arrays.from_float(fold_bias(bias, mean, s, beta, out), bias_dtype)
    if not bool(np.isfinite(s).all()) or bool(st_arrays.nonfinite(folded_bias, bias_dtype).any()):
        raise CheckpointError(
            f"pair {p.linear!r}: the folded bias overflows {bias_dtype} "
            f"(gamma / sqrt(running_var + eps) reaches {float(np.abs(s).max()):.3g})"
        )
    extra: dict[str, tuple[str, np.ndarray]] = {}
    qparams = None
    if p.scale_key is not None and p.zero_point_key is not None:
        qparams, extra = _qparams(p, infos, load, out, emit_qparams)
    if qparams is not None and p.input_scale_key is not None:
        qparams["input"], input_extra = _input_qparams(p, infos, load, emit_qparams)
        extra.update(input_extra)
    return PairPlan(p, w_dtype, (out, w_shape[1]), s, bias_dtype, folded_bias, extra, qparams)


def _check_weight(p: FoldPair, infos: TensorInfos) -> tuple[str, tuple[int, ...]]:
    w_dtype, w_shape = infos[p.weight_key]
    if w_dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"pair {p.linear!r}: weight {p.weight_key!r} is {w_dtype}; folding supports "
            f"{', '.join(FLOAT_DTYPES)}"
        )
    if len(w_shape) != 2:
        raise CheckpointError(
            f"pair {p.linear!r}: weight {p.weight_key!r} has shape {list(w_shape)}, not (out, in)"
        )
    return w_dtype, w_shape


def _load_vectors(
    p: FoldPair, infos: TensorInfos, load: Loader, out: int
) -> dict[str, np.ndarray | None]:
    """The pair's per-channel vectors by role (None: absent), each a float64 (out,) vector."""
    vecs: dict[str, np.ndarray | None] = {}
    for what, key in (("bias", p.bias_key), ("running_mean", p.mean_key),
                      ("running_var", p.var_key), ("BN weight", p.gamma_key),
                      ("BN bias", p.beta_key)):  # fmt: skip
        if key is None:
            vecs[what] = None
            continue
        dtype, shape = infos[key]
        if dtype not in FLOAT_DTYPES or shape != (out,):
            raise CheckpointError(
                f"pair {p.linear!r}: {what} {key!r} is {dtype} {list(shape)}; expected a float "
                f"vector of the weight's {out} output channels"
            )
        vecs[what] = st_arrays.to_float(load(key), dtype)
    return vecs


def _check_statistics(p: FoldPair, vecs: Mapping[str, np.ndarray | None], out: int) -> None:
    if not math.isfinite(p.eps):
        raise CheckpointError(f"pair {p.linear!r}: eps is {p.eps}")
    for what, t in vecs.items():
        if t is not None:
            bad = int((~np.isfinite(t)).sum())
            if bad:
                raise CheckpointError(
                    f"pair {p.linear!r}: {what} has non-finite values in {bad} of {out} channels",
                    hint="the checkpoint is corrupt or training diverged; folding would spread "
                    "NaN/inf into the weights",
                )
    var = vecs["running_var"]
    assert var is not None
    bad = int((var + p.eps <= 0).sum())
    if bad:
        raise CheckpointError(
            f"pair {p.linear!r}: running_var + eps <= 0 in {bad} of {out} channels",
            hint="a variance must be positive: the BN statistics are corrupt",
        )


def _qparams(
    p: FoldPair, infos: TensorInfos, load: Loader, out: int, emit: bool
) -> tuple[dict[str, Any], dict[str, tuple[str, np.ndarray]]]:
    assert p.scale_key is not None and p.zero_point_key is not None
    (s_dtype, s_shape), (z_dtype, z_shape) = infos[p.scale_key], infos[p.zero_point_key]
    if s_dtype not in FLOAT_DTYPES or z_dtype not in INT_DTYPES or s_shape != z_shape:
        raise CheckpointError(
            f"pair {p.linear!r}: fake-quant scale {s_dtype} {list(s_shape)} / zero_point "
            f"{z_dtype} {list(z_shape)} are not float / integer vectors of one shape"
        )
    if s_shape not in ((out,), (1,)):
        raise CheckpointError(
            f"pair {p.linear!r}: fake-quant scale has shape {list(s_shape)}; expected one "
            f"value per output channel ({out}) or one for the tensor",
            hint="was the observer ever run? calibrate the QAT model before folding",
        )
    scale = st_arrays.to_float(load(p.scale_key), s_dtype)
    zp = load(p.zero_point_key).astype(np.int64)
    if not bool(np.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise CheckpointError(f"pair {p.linear!r}: fake-quant scale has values <= 0 or non-finite")
    asym = bool((zp != 0).any())
    info: dict[str, Any] = {
        "scheme": "asymmetric" if asym else "symmetric",
        "granularity": "channel" if s_shape == (out,) and out != 1 else "tensor",
    }
    if p.quant_min is not None and p.quant_max is not None:
        info["quant_min"], info["quant_max"] = p.quant_min, p.quant_max
        info["bits"] = max(1, math.ceil(math.log2(p.quant_max - p.quant_min + 1)))
    extra: dict[str, tuple[str, np.ndarray]] = {}
    if emit:
        column = (out, 1)
        scale32 = st_arrays.from_float(scale, "F32").reshape(-1, 1)
        extra[f"{p.linear}.weight_scale"] = (
            "F32", np.ascontiguousarray(np.broadcast_to(scale32, column)))
        if asym:
            lo = p.quant_min if p.quant_min is not None else int(zp.min())
            hi = p.quant_max if p.quant_max is not None else int(zp.max())
            zp_dtype = "I8" if -128 <= lo and hi <= 127 else "I32"
            zp_col = zp.astype(st_arrays.STORAGE[zp_dtype]).reshape(-1, 1)
            extra[f"{p.linear}.weight_zero_point"] = (
                zp_dtype, np.ascontiguousarray(np.broadcast_to(zp_col, column)))
    return info, extra


def _input_qparams(
    p: FoldPair, infos: TensorInfos, load: Loader, emit: bool
) -> tuple[dict[str, Any], dict[str, tuple[str, np.ndarray]]]:
    """The input fake quant's per-tensor scale and zero point; with ``emit``, the tensors
    ``<linear>.input_scale`` ((1,) float32) and ``<linear>.input_zero_point`` ((1,) int32, only
    when not zero)."""
    assert p.input_scale_key is not None and p.input_zero_point_key is not None
    (s_dtype, s_shape) = infos[p.input_scale_key]
    (z_dtype, z_shape) = infos[p.input_zero_point_key]
    if s_dtype != "F32" or z_dtype not in INT_DTYPES or s_shape != (1,) or z_shape != (1,):
        raise CheckpointError(
            f"pair {p.linear!r}: input fake-quant scale {s_dtype} {list(s_shape)} / zero_point "
            f"{z_dtype} {list(z_shape)} are not one float32 and one integer value",
            hint="the checkpoint was not written by `qatconv prepare --activations int8`",
        )
    scale = load(p.input_scale_key).astype(np.float32).reshape(1)
    zp = int(load(p.input_zero_point_key).reshape(-1)[0])
    if not (math.isfinite(float(scale[0])) and float(scale[0]) > 0):
        raise CheckpointError(
            f"pair {p.linear!r}: input fake-quant scale is {float(scale[0])}",
            hint="calibrate the QAT model (qatconv prepare) before folding",
        )
    extra: dict[str, tuple[str, np.ndarray]] = {}
    if emit:
        extra[f"{p.linear}.input_scale"] = ("F32", np.ascontiguousarray(scale))
        if zp != 0:
            extra[f"{p.linear}.input_zero_point"] = ("I32", np.array([zp], dtype="<i4"))
    return {"scale": float(scale[0]), "zero_point": zp}, extra


# --------------------------------------------------------------------------------------------
# In memory
# --------------------------------------------------------------------------------------------
def fold_state_dict(
    tensors: Mapping[str, torch.Tensor],
    pairs: Sequence[FoldPair],
    *,
    emit_qparams: bool = False,
) -> dict[str, torch.Tensor]:
    """Fold ``pairs`` in a state dict; every other tensor passes through (the same object).

    The result keeps the source order, with each folded bias (and, with ``emit_qparams``,
    ``<linear>.weight_scale`` / ``.weight_zero_point``) right after its weight.

    Raises:
        CheckpointError: a pair's tensor is missing, mis-shaped or not finite.
        UsageError: ``emit_qparams`` for pairs without fake-quant state.
    """
    import torch

    infos: dict[str, tuple[str, tuple[int, ...]]] = {}
    for k, t in tensors.items():
        infos[k] = (st_dtype(t.dtype) if has_st_dtype(t.dtype) else str(t.dtype), tuple(t.shape))
    plan = make_plan(infos, lambda k: _storage_of(tensors[k]), pairs, emit_qparams,
                     "the state dict")
    result: dict[str, torch.Tensor] = {}
    for o in plan.outputs:
        if o.source is not None:
            result[o.name] = tensors[o.source]
        elif o.data is not None:
            result[o.name] = _tensor_of(o.data, o.dtype)
        else:
            assert o.pair is not None
            w = tensors[o.pair.pair.weight_key]
            scale = torch.from_numpy(o.pair.scale).unsqueeze(-1)
            folded = (w.to(torch.float64) * scale).to(w.dtype)
            check_folded(o.pair.pair, _storage_of(folded), o.pair.weight_dtype)
            result[o.name] = folded
    return result


def _storage_of(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's `st_arrays` storage array (BF16 as its uint16 bits)."""
    import torch

    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _tensor_of(arr: np.ndarray, dtype: str) -> torch.Tensor:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr).copy())
    return t.view(torch_dtype(dtype)) if dtype == "BF16" else t


def check_folded(p: FoldPair, folded: np.ndarray, dtype: str) -> None:
    """Refuse a folded weight (storage array of ``dtype``) holding NaN/inf."""
    bad = int(st_arrays.nonfinite(folded, dtype).sum())
    if bad:
        raise CheckpointError(
            f"pair {p.linear!r}: {bad} values of {p.weight_key!r} are not finite in {dtype} "
            "after folding",
            hint="the source weight holds NaN/inf, or gamma / sqrt(running_var + eps) is so "
            "large that the weight overflows its dtype",
        )


def record_field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = record.get(key) if isinstance(record, Mapping) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(
            f"pair record {record!r} has no valid {key!r}",
            hint="the checkpoint's qatconv metadata is damaged; re-run `qatconv prepare`",
        )
    return value
