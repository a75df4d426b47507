"""Fold Linear+BatchNorm1d pairs into plain Linears, in memory or streaming file to file.

The arithmetic is `torch.nn.utils.fusion.fuse_linear_bn_weights` (what
``LinearBn1d.to_float()`` calls), done in float64 and cast back to the checkpoint's dtype:

    s  = gamma * rsqrt(running_var + eps)
    W' = W * s[:, None]
    b' = (b - running_mean) * s + beta

`fold_file` never maps or loads the checkpoint: headers are parsed without torch, tensors that
pass through are copied file to file inside the kernel, and each folded weight is read,
scaled and written a block of rows at a time through one reused buffer, so memory stays a
few tens of MB whatever the checkpoint's size. `fold_state_dict` does the same in memory, and
both produce the same tensors (and, saved with safetensors, the same bytes).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qatconv import st_format
from qatconv.errors import CheckpointError, OutputError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "FoldPair",
    "FoldReport",
    "fold_file",
    "fold_state_dict",
    "fold_weights",
]

# Weights are folded this many elements at a time: 16 MiB of float64 per block.
CHUNK_ELEMENTS = 1 << 21

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_ST_DTYPES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_INT_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")
_INDEX_SUFFIX = ".safetensors.index.json"


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldPair:
    """Where one pair's tensors live in a checkpoint, and what folding it writes.

    The folded weight and bias are written as ``<linear>.weight`` / ``<linear>.bias``; every
    tensor named by a ``*_key`` and every tensor under a ``drop_prefixes`` entry (module paths
    ending in ".") is removed. ``quant_min`` / ``quant_max`` (the weight fake-quant's integer
    range, when known) only feed the reported quant params.
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

    def __post_init__(self) -> None:
        for p in self.drop_prefixes:
            if not p.endswith("."):
                raise ValueError(f"drop prefix {p!r} must be a module path ending in '.'")
        if (self.scale_key is None) != (self.zero_point_key is None):
            raise ValueError("scale_key and zero_point_key go together")

    @property
    def out_weight(self) -> str:
        return f"{self.linear}.weight"

    @property
    def out_bias(self) -> str:
        return f"{self.linear}.bias"

    def source_keys(self) -> list[str]:
        """The tensors this pair reads, weight first."""
        keys = [self.weight_key, self.bias_key, self.mean_key, self.var_key, self.gamma_key,
                self.beta_key, self.scale_key, self.zero_point_key]  # fmt: skip
        return [k for k in keys if k is not None]

    @classmethod
    def from_qat_record(
        cls, record: Mapping[str, Any], quant_range: tuple[int, int] | None = None
    ) -> FoldPair:
        """The pair of a QAT checkpoint: a ``LinearBn1d`` at ``record["qat"]``.

        ``quant_range`` (the weight fake-quant's ``(quant_min, quant_max)``, e.g. from the
        checkpoint's metadata) is used when the record has no ``quant_min`` / ``quant_max``.

        Raises:
            CheckpointError: the record lacks a field or has one of the wrong type.
        """
        q = _field(record, "qat", str)
        linear = _field(record, "linear", str)
        has_bias = _field(record, "bias", bool)
        qmin, qmax = record.get("quant_min"), record.get("quant_max")
        if not (isinstance(qmin, int) and isinstance(qmax, int)) and quant_range is not None:
            qmin, qmax = quant_range
        return cls(
            linear=linear,
            weight_key=f"{q}.weight",
            bias_key=f"{q}.bias" if has_bias else None,
            # LinearBn1d's BN is always affine; affine=False pairs are stored as ones/zeros.
            gamma_key=f"{q}.bn.weight",
            beta_key=f"{q}.bn.bias",
            mean_key=f"{q}.bn.running_mean",
            var_key=f"{q}.bn.running_var",
            eps=float(_field(record, "eps", (int, float))),
            drop_prefixes=(f"{q}.bn.", f"{q}.weight_fake_quant.", f"{q}.activation_post_process."),
            scale_key=f"{q}.weight_fake_quant.scale",
            zero_point_key=f"{q}.weight_fake_quant.zero_point",
            quant_min=qmin if isinstance(qmin, int) else None,
            quant_max=qmax if isinstance(qmax, int) else None,
        )

    @classmethod
    def from_float_record(cls, record: Mapping[str, Any]) -> FoldPair:
        """The pair of a float checkpoint: Linear at ``record["linear"]``, BN at ``record["bn"]``.

        Raises:
            CheckpointError: the record lacks a field or has one of the wrong type.
        """
        lin = _field(record, "linear", str)
        bn = _field(record, "bn", str)
        has_bias = _field(record, "bias", bool)
        affine = record.get("affine", True)
        if not isinstance(affine, bool):
            raise CheckpointError(f"pair record {record!r}: 'affine' must be true or false")
        return cls(
            linear=lin,
            weight_key=f"{lin}.weight",
            bias_key=f"{lin}.bias" if has_bias else None,
            gamma_key=f"{bn}.weight" if affine else None,
            beta_key=f"{bn}.bias" if affine else None,
            mean_key=f"{bn}.running_mean",
            var_key=f"{bn}.running_var",
            eps=float(_field(record, "eps", (int, float))),
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
# The arithmetic
# --------------------------------------------------------------------------------------------
def fold_weights(
    w: torch.Tensor,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold BatchNorm statistics into a Linear's weight and bias (eval-mode BN fold).

    Float64 arithmetic in `fuse_linear_bn_weights`' order; the weight comes back in ``w``'s
    dtype, the bias in ``b``'s (``w``'s when ``b`` is None). ``gamma`` / ``beta`` None mean an
    ``affine=False`` BN (1 and 0).

    Raises:
        CheckpointError: shapes that do not fit a (out, in) weight and (out,) statistics.
    """
    out = _check_fold_shapes(w, b, mean, var, gamma, beta)
    s = _bn_scale(var, eps, gamma)
    w_out = (w.to(torch.float64) * s.unsqueeze(-1)).to(w.dtype)
    b_out = _fold_bias(b, mean, s, beta, b.dtype if b is not None else w.dtype, out)
    return w_out, b_out


def _bn_scale(var: torch.Tensor, eps: float, gamma: torch.Tensor | None) -> torch.Tensor:
    s = torch.rsqrt(var.to(torch.float64) + eps)
    return s if gamma is None else gamma.to(torch.float64) * s


def _fold_bias(
    b: torch.Tensor | None,
    mean: torch.Tensor,
    s: torch.Tensor,
    beta: torch.Tensor | None,
    dtype: torch.dtype,
    out: int,
) -> torch.Tensor:
    b64 = torch.zeros(out, dtype=torch.float64) if b is None else b.to(torch.float64)
    # Adding beta = 0 when affine=False is not a no-op: it turns -0.0 into 0.0, as torch does
    # with the zeros a LinearBn1d stores, so both record kinds give the same bytes.
    beta64 = torch.zeros(out, dtype=torch.float64) if beta is None else beta.to(torch.float64)
    return ((b64 - mean.to(torch.float64)) * s + beta64).to(dtype)


def _check_fold_shapes(
    w: torch.Tensor,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> int:
    if w.dim() != 2:
        raise CheckpointError(f"a Linear weight must be 2-D (out, in); got shape {list(w.shape)}")
    out = w.shape[0]
    for what, t in (("bias", b), ("running_mean", mean), ("running_var", var),
                    ("BN weight", gamma), ("BN bias", beta)):  # fmt: skip
        if t is not None and tuple(t.shape) != (out,):
            raise CheckpointError(
                f"{what} has shape {list(t.shape)}, but the weight has {out} output channels"
            )
    return out


# --------------------------------------------------------------------------------------------
# Planning (shared by the in-memory and the streaming fold)
# --------------------------------------------------------------------------------------------
@dataclass
class _PairPlan:
    pair: FoldPair
    weight_dtype: str
    shape: tuple[int, int]
    scale: torch.Tensor  # float64 (out,)
    bias: torch.Tensor  # folded, in the output bias dtype
    extra: dict[str, torch.Tensor]  # qparam tensors to emit, by output name
    qparams: dict[str, Any] | None


@dataclass
class _Out:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None = None  # pass-through: the source tensor's name
    pair: _PairPlan | None = None  # folded weight of this pair
    tensor: torch.Tensor | None = None  # small tensor computed up front


@dataclass
class _Plan:
    outputs: list[_Out]  # in source order
    removed: list[str]
    pairs: list[_PairPlan]


def _make_plan(
    infos: Mapping[str, tuple[str, tuple[int, ...]]],
    load: Callable[[str], torch.Tensor],
    pairs: Sequence[FoldPair],
    emit_qparams: bool,
    where: str,
) -> _Plan:
    """Validate ``pairs`` against the source (name -> (dtype, shape), in source order) and
    compute everything but the folded weights."""
    if emit_qparams:
        no_q = [p.linear for p in pairs if p.scale_key is None]
        if no_q:
            raise UsageError(
                f"--emit-qparams needs fake-quant state, and pair(s) {', '.join(no_q[:3])} "
                "have none (a float checkpoint has no quant params)",
                hint="fold a QAT checkpoint written by `qatconv prepare`, or drop --emit-qparams",
            )
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
    prefixes = {pre for p in pairs for pre in p.drop_prefixes}

    def dropped(name: str) -> bool:
        if name in claimed:
            return True
        cut = name.find(".")
        while cut != -1:
            if name[: cut + 1] in prefixes:
                return True
            cut = name.find(".", cut + 1)
        return False

    plans = [_plan_pair(p, infos, load, emit_qparams) for p in pairs]
    by_weight = {pp.pair.weight_key: pp for pp in plans}
    outputs: list[_Out] = []
    for name, (dtype, shape) in infos.items():
        pp = by_weight.get(name)
        if pp is not None:
            p = pp.pair
            outputs.append(_Out(p.out_weight, pp.weight_dtype, pp.shape, pair=pp))
            outputs.append(
                _Out(p.out_bias, _ST_DTYPES[pp.bias.dtype], (pp.shape[0],), tensor=pp.bias)
            )
            for qname, t in pp.extra.items():
                outputs.append(_Out(qname, _ST_DTYPES[t.dtype], tuple(t.shape), tensor=t))
        elif not dropped(name):
            outputs.append(_Out(name, dtype, shape, source=name))
    seen: dict[str, _Out] = {}
    for o in outputs:
        if o.name in seen:
            raise CheckpointError(
                f"folding would write tensor {o.name!r} twice: {where} already holds it "
                "beside the pair that produces it",
                hint="a pair record says bias=false while the checkpoint has the Linear's bias?",
            )
        seen[o.name] = o
    removed = sorted(n for n in infos if n not in seen)
    return _Plan(outputs, removed, plans)


def _plan_pair(
    p: FoldPair,
    infos: Mapping[str, tuple[str, tuple[int, ...]]],
    load: Callable[[str], torch.Tensor],
    emit_qparams: bool,
) -> _PairPlan:
    w_dtype, w_shape = infos[p.weight_key]
    if w_dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"pair {p.linear!r}: weight {p.weight_key!r} is {w_dtype}; folding supports "
            f"{', '.join(_FLOAT_DTYPES)}"
        )
    if len(w_shape) != 2:
        raise CheckpointError(
            f"pair {p.linear!r}: weight {p.weight_key!r} has shape {list(w_shape)}, not (out, in)"
        )
    out = w_shape[0]
    vecs: dict[str, torch.Tensor | None] = {}
    for what, key in (("bias", p.bias_key), ("running_mean", p.mean_key),
                      ("running_var", p.var_key), ("BN weight", p.gamma_key),
                      ("BN bias", p.beta_key)):  # fmt: skip
        if key is None:
            vecs[what] = None
            continue
        dtype, shape = infos[key]
        if dtype not in _FLOAT_DTYPES or shape != (out,):
            raise CheckpointError(
                f"pair {p.linear!r}: {what} {key!r} is {dtype} {list(shape)}; expected a float "
                f"vector of the weight's {out} output channels"
            )
        vecs[what] = load(key)
    mean, var = vecs["running_mean"], vecs["running_var"]
    assert mean is not None and var is not None  # keys are mandatory
    bias, gamma, beta = vecs["bias"], vecs["BN weight"], vecs["BN bias"]
    if not math.isfinite(p.eps):
        raise CheckpointError(f"pair {p.linear!r}: eps is {p.eps}")
    for what, t in vecs.items():
        if t is not None:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(
                    f"pair {p.linear!r}: {what} has non-finite values in {bad} of {out} channels",
                    hint="the checkpoint is corrupt or training diverged; folding would spread "
                    "NaN/inf into the weights",
                )
    bad = int((var.to(torch.float64) + p.eps <= 0).sum())
    if bad:
        raise CheckpointError(
            f"pair {p.linear!r}: running_var + eps <= 0 in {bad} of {out} channels",
            hint="a variance must be positive: the BN statistics are corrupt",
        )
    s = _bn_scale(var, p.eps, gamma)
    bias_dtype = bias.dtype if bias is not None else _TORCH_DTYPES[w_dtype]
    folded_bias = _fold_bias(bias, mean, s, beta, bias_dtype, out)
    if not bool(torch.isfinite(s).all()) or not bool(torch.isfinite(folded_bias).all()):
        raise CheckpointError(
            f"pair {p.linear!r}: the folded bias overflows {_ST_DTYPES[bias_dtype]} "
            f"(gamma / sqrt(running_var + eps) reaches {float(s.abs().max()):.3g})"
        )
    extra: dict[str, torch.Tensor] = {}
    qparams = None
    if p.scale_key is not None and p.zero_point_key is not None:
        qparams, extra = _qparams(p, infos, load, out, emit_qparams)
    return _PairPlan(p, w_dtype, (out, w_shape[1]), s, folded_bias, extra, qparams)


def _qparams(
    p: FoldPair,
    infos: Mapping[str, tuple[str, tuple[int, ...]]],
    load: Callable[[str], torch.Tensor],
    out: int,
    emit: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    assert p.scale_key is not None and p.zero_point_key is not None
    (s_dtype, s_shape), (z_dtype, z_shape) = infos[p.scale_key], infos[p.zero_point_key]
    if s_dtype not in _FLOAT_DTYPES or z_dtype not in _INT_DTYPES or s_shape != z_shape:
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
    scale, zp = load(p.scale_key), load(p.zero_point_key).to(torch.int64)
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise CheckpointError(f"pair {p.linear!r}: fake-quant scale has values <= 0 or non-finite")
    asym = bool((zp != 0).any())
    info: dict[str, Any] = {
        "scheme": "asymmetric" if asym else "symmetric",
        "granularity": "channel" if s_shape == (out,) and out != 1 else "tensor",
    }
    if p.quant_min is not None and p.quant_max is not None:
        info["quant_min"], info["quant_max"] = p.quant_min, p.quant_max
        info["bits"] = max(1, math.ceil(math.log2(p.quant_max - p.quant_min + 1)))
    extra: dict[str, torch.Tensor] = {}
    if emit:
        extra[f"{p.linear}.weight_scale"] = scale.to(torch.float32).reshape(-1, 1).expand(out, 1)
        if asym:
            lo = p.quant_min if p.quant_min is not None else int(zp.min())
            hi = p.quant_max if p.quant_max is not None else int(zp.max())
            zp_dtype = torch.int8 if -128 <= lo and hi <= 127 else torch.int32
            extra[f"{p.linear}.weight_zero_point"] = zp.to(zp_dtype).reshape(-1, 1).expand(out, 1)
        extra = {k: v.contiguous() for k, v in extra.items()}
    return info, extra


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
    infos: dict[str, tuple[str, tuple[int, ...]]] = {}
    for k, t in tensors.items():
        infos[k] = (_ST_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape))
    plan = _make_plan(infos, lambda k: tensors[k], pairs, emit_qparams, "the state dict")
    result: dict[str, torch.Tensor] = {}
    for o in plan.outputs:
        if o.source is not None:
            result[o.name] = tensors[o.source]
        elif o.tensor is not None:
            result[o.name] = o.tensor
        else:
            assert o.pair is not None
            w = tensors[o.pair.pair.weight_key]
            folded = (w.to(torch.float64) * o.pair.scale.unsqueeze(-1)).to(w.dtype)
            _check_folded(o.pair.pair, folded)
            result[o.name] = folded
    return result


def _check_folded(p: FoldPair, folded: torch.Tensor) -> None:
    if not bool(torch.isfinite(folded).all()):
        bad = int((~torch.isfinite(folded)).sum())
        raise CheckpointError(
            f"pair {p.linear!r}: {bad} folded weight values are not finite in "
            f"{_ST_DTYPES[folded.dtype]}",
            hint="the source weight holds NaN/inf, or gamma / sqrt(running_var + eps) is so "
            "large that the weight overflows its dtype",
        )


# --------------------------------------------------------------------------------------------
# Streaming, file to file
# --------------------------------------------------------------------------------------------
@dataclass
class _Source:
    headers: list[st_format.Header]
    where: dict[str, int]  # tensor name -> index into headers
    index: Path | None = None

    @property
    def paths(self) -> list[Path]:
        return [h.path for h in self.headers] + ([self.index] if self.index else [])


def _open_source(src: Path) -> _Source:
    src = Path(src)
    if src.is_dir():
        indexes = sorted(src.glob("*" + _INDEX_SUFFIX))
        singles = sorted(src.glob("*.safetensors"))
        if len(indexes) == 1:
            src = indexes[0]
        elif not indexes and len(singles) == 1:
            src = singles[0]
        else:
            raise CheckpointError(
                f"{src} is a folder without exactly one *{_INDEX_SUFFIX} or one .safetensors",
                hint="name the checkpoint file (or its index) itself",
            )
    if src.name.endswith(_INDEX_SUFFIX):
        weight_map = st_format.read_index(src)
        files = list(dict.fromkeys(weight_map.values()))
        headers = [st_format.read_header(f) for f in files]
        where: dict[str, int] = {}
        for i, h in enumerate(headers):
            for name in sorted(h.tensors, key=lambda n: h.tensors[n].begin):
                if name in where:
                    raise CheckpointError(
                        f"tensor {name!r} is in both {headers[where[name]].path.name} and "
                        f"{h.path.name}"
                    )
                where[name] = i
        for name, f in weight_map.items():
            if name not in where or headers[where[name]].path != f:
                raise CheckpointError(
                    f"{src}: weight_map puts {name!r} in {f.name}, which does not hold it"
                )
        return _Source(headers, where, src)
    h = st_format.read_header(src)
    return _Source([h], {n: 0 for n in sorted(h.tensors, key=lambda n: h.tensors[n].begin)})


def _load_small(fd: int, header: st_format.Header, name: str) -> torch.Tensor:
    info = header.tensors[name]
    dtype = _TORCH_DTYPES[info.dtype]
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    data = bytearray(st_format.read_tensor_bytes(fd, header, name))
    return torch.frombuffer(data, dtype=dtype).reshape(info.shape)


def fold_file(
    src: Path,
    out: Path,
    pairs: Sequence[FoldPair],
    *,
    metadata: Mapping[str, str] | Callable[[FoldReport], Mapping[str, str]],
    emit_qparams: bool = False,
    max_shard_size: int | None = None,
    force: bool = False,
    on_pair: Callable[[str], None] | None = None,
    fsync: bool = True,
) -> FoldReport:
    """Fold ``pairs`` from a safetensors checkpoint into a new one, streaming.

    ``src`` is a ``.safetensors`` file, a ``*.safetensors.index.json`` (all its shards are
    read as one checkpoint) or a folder holding exactly one of either. Tensors are written in
    safetensors' canonical order (dtype, then name); pass-through tensors are copied
    bit-identically, each folded weight block by block in float64. ``metadata`` (``format:
    pt`` is added) may be a callable that receives the report before anything is written
    (pairs, removed, qparams, bytes_in known), to record those in the header.

    With ``max_shard_size`` (bytes of tensor data per shard), ``out`` names the index file:
    ``model-0000k-of-0000N.safetensors`` shards and the index are written in its folder; a
    tensor larger than the limit gets a shard of its own. Every file is written to a temp file
    and renamed once all are complete, so a failure leaves no output.

    Args:
        on_pair: called with each Linear path once its folded weight is written.
        fsync: flush each file to disk before the rename (on by default).

    Raises:
        CheckpointError: unreadable source, or a pair's tensor missing / mis-shaped / not
            finite (the message names the pair and the tensor).
        OutputError: ``out`` is an input, exists without ``force``, or cannot be written.
        UsageError: ``emit_qparams`` without fake-quant state; bad ``max_shard_size``.
    """
    out = Path(out)
    if max_shard_size is not None and max_shard_size <= 0:
        raise UsageError(f"--max-shard-size must be positive, got {max_shard_size}")
    if max_shard_size is None and out.name.endswith(_INDEX_SUFFIX):
        raise UsageError(
            f"{out.name} names a shard index, but no --max-shard-size was given",
            hint="pass --max-shard-size (e.g. 2GB) or an output ending in .safetensors",
        )
    if max_shard_size is not None and (out.is_dir() or not out.name.endswith(".json")):
        out = (out if out.is_dir() else out.parent) / "model.safetensors.index.json"
    source = _open_source(src)
    _refuse_input_as_output(source.paths, [out])
    infos: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, i in source.where.items():
        info = source.headers[i].tensors[name]
        infos[name] = (info.dtype, info.shape)

    with ExitStack() as stack:
        fds = []
        for h in source.headers:
            try:
                fd = os.open(h.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise CheckpointError(f"cannot read {h.path}: {e.strerror or e}") from None
            stack.callback(os.close, fd)
            fds.append(fd)

        def load(name: str) -> torch.Tensor:
            i = source.where[name]
            return _load_small(fds[i], source.headers[i], name)

        plan = _make_plan(infos, load, pairs, emit_qparams, str(src))
        report = FoldReport(
            pairs=[pp.pair.linear for pp in plan.pairs],
            removed=plan.removed,
            bytes_in=sum(h.file_size for h in source.headers),
            qparams={pp.pair.linear: pp.qparams for pp in plan.pairs if pp.qparams is not None},
        )
        meta = dict(metadata(report) if callable(metadata) else metadata)
        by_name = {o.name: o for o in plan.outputs}
        ordered = st_format.canonical_order([(o.name, o.dtype, o.shape) for o in plan.outputs])
        shards = _split(ordered, max_shard_size)
        targets = _target_paths(out, len(shards), max_shard_size is not None)
        _refuse_input_as_output(source.paths, targets)
        existing = [t for t in targets if t.exists()]
        if existing and not force:
            raise OutputError(
                f"{existing[0]} exists",
                hint="pass --force to replace it, or choose another output path",
            )

        writers: list[_Pending] = []
        queue = _WriteQueue()
        try:
            buffers = _Buffers()
            for entries, target in zip(shards, targets, strict=False):
                writer = st_format.StreamWriter(target, entries, meta, fsync=fsync, commit=False)
                writers.append(writer)
                with writer:
                    done = False
                    try:
                        for name, _, _ in entries:
                            o = by_name[name]
                            if o.source is not None:
                                i = source.where[o.source]
                                h = source.headers[i]
                                info = h.tensors[o.source]
                                queue.submit(writer.copy_range, fds[i], h.data_start + info.begin,
                                             info.nbytes, name)  # fmt: skip
                            elif o.tensor is not None:
                                queue.submit(writer.write, name, _tensor_bytes(o.tensor))
                            else:
                                assert o.pair is not None
                                pp = o.pair
                                i = source.where[pp.pair.weight_key]
                                _stream_weight(queue, writer, fds[i], source.headers[i], pp, name,
                                               buffers)  # fmt: skip
                                if on_pair is not None:
                                    on_pair(pp.pair.linear)
                        queue.drain()
                        done = True
                    finally:
                        if not done:  # stop the writes before the temp file is removed
                            queue.abort()
            if max_shard_size is not None:
                index = _RawWriter(out, _index_json(shards, targets, meta), fsync)
                writers.append(index)
                index.write_now()
            for w in writers:
                w.commit()
        except BaseException:
            for w in writers:
                w.discard()
            raise
        finally:
            queue.abort()
    report.files = [w.final_path for w in writers]
    report.bytes_out = sum(w.size for w in writers[: len(shards)])
    logger.info(
        "folded %d pairs from %s into %s (%d tensors removed)",
        len(report.pairs), src, out, len(report.removed),
    )  # fmt: skip
    return report


class _WriteQueue:
    """Runs writer calls in order on one background thread.

    Writing into the page cache is the slowest step of a fold; on its own thread it overlaps
    with reading and scaling the next block (os.write, numpy and torch release the GIL).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qatconv-fold-write")
        self._pending: deque[Future[None]] = deque()

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()  # raise a failed write now, not at the end
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def wait(self, future: Future[None]) -> None:
        """Wait until ``future`` ran; raise the first failure among the calls up to it."""
        while self._pending:
            first = self._pending.popleft()
            first.result()
            if first is future:
                return
        future.result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def abort(self) -> None:
        """Cancel the calls not started, wait for the running one."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class _Buffers:
    """Two read/write buffers (one filled while the other is written) and a float32 scratch,
    reused for every block of every folded weight (grown, never shrunk)."""

    def __init__(self) -> None:
        self.raw = [bytearray(), bytearray()]
        self.busy: list[Future[None] | None] = [None, None]  # pending write of each buffer
        self.f32 = np.empty(0, dtype=np.float32)
        self.turn = 0

    def next(self, queue: _WriteQueue, nbytes: int, elements: int) -> tuple[int, bytearray]:
        """The buffer to fill next, once its previous write is done."""
        i = self.turn
        self.turn = 1 - i
        busy = self.busy[i]
        if busy is not None:
            queue.wait(busy)
            self.busy[i] = None
        if len(self.raw[i]) < nbytes:
            self.raw[i] = bytearray(nbytes)
        if self.f32.size < elements:
            self.f32 = np.empty(elements, dtype=np.float32)
        return i, self.raw[i]


def _stream_weight(
    queue: _WriteQueue,
    writer: st_format.StreamWriter,
    fd: int,
    header: st_format.Header,
    pp: _PairPlan,
    name: str,
    buffers: _Buffers,
) -> None:
    """Fold one weight block by block: pread, scale in float64, cast, queue the write.

    numpy's ufunc computes ``w * s`` in float64 in small internal buffers and casts each
    result straight into the output, so a block costs about one pass over memory instead of
    the four of torch's ``w.double().mul_(s).to(dtype)``; the bits are the same (exact
    up-cast, one IEEE float64 product, round to nearest even). 16-bit weights go through
    float32 because that is how torch casts float64 to float16 / bfloat16 (double rounding),
    and the result must equal torch's.
    """
    rows, cols = pp.shape
    if rows * cols == 0:
        queue.submit(writer.write, name, b"")
        return
    itemsize = st_format.DTYPE_SIZES[pp.weight_dtype]
    block = max(1, CHUNK_ELEMENTS // cols)
    scale = pp.scale.numpy()
    key = pp.pair.weight_key
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        n = (r1 - r0) * cols
        slot, raw = buffers.next(queue, n * itemsize, n)
        view = st_format.read_tensor_bytes(fd, header, key, r0, r1, out=raw)
        s = scale[r0:r1, None]
        with np.errstate(over="ignore", invalid="ignore"):
            if pp.weight_dtype in ("F32", "F64"):
                np_dtype = np.float32 if pp.weight_dtype == "F32" else np.float64
                w = np.frombuffer(raw, dtype=np_dtype, count=n).reshape(r1 - r0, cols)
                np.multiply(w, s, out=w, casting="unsafe")
                total = float(w.sum())
            else:
                w16 = torch.frombuffer(raw, dtype=_TORCH_DTYPES[pp.weight_dtype], count=n)
                acc = buffers.f32[:n].reshape(r1 - r0, cols)
                torch.from_numpy(acc).view(-1).copy_(w16)
                np.multiply(acc, s, out=acc, casting="unsafe")
                w16.copy_(torch.from_numpy(acc).view(-1))
                total = float(w16.sum(dtype=torch.float32))
        # A sum is finite unless some value is NaN/inf (or the sum overflows: then look closer).
        if not math.isfinite(total):
            _check_folded(
                pp.pair,
                torch.frombuffer(raw, dtype=_TORCH_DTYPES[pp.weight_dtype], count=n),
            )
        buffers.busy[slot] = queue.submit(writer.write_chunk, name, view)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _split(
    ordered: list[tuple[str, str, tuple[int, ...]]], max_shard_size: int | None
) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    if max_shard_size is None:
        return [ordered]
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in ordered:
        n = math.prod(entry[2]) * st_format.DTYPE_SIZES[entry[1]]
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _target_paths(out: Path, n: int, sharded: bool) -> list[Path]:
    if not sharded:
        return [out]
    names = [out.parent / f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    return names + [out]


def _index_json(
    shards: list[list[tuple[str, str, tuple[int, ...]]]],
    targets: list[Path],
    metadata: Mapping[str, str],
) -> bytes:
    weight_map = {name: t.name for entries, t in zip(shards, targets, strict=False)
                  for name, _, _ in entries}  # fmt: skip
    total = sum(math.prod(s) * st_format.DTYPE_SIZES[d] for es in shards for _, d, s in es)
    meta: dict[str, Any] = {k: v for k, v in metadata.items() if k != "format"}
    meta["total_size"] = total
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")


class _Pending(Protocol):
    """A finished temporary file waiting to be renamed onto ``final_path``."""

    final_path: Path
    size: int

    def commit(self) -> None: ...
    def discard(self) -> None: ...


class _RawWriter:
    """Writes a small non-safetensors file (the index) to a temp file, renamed by commit()."""

    def __init__(self, path: Path, data: bytes, fsync: bool) -> None:
        self.final_path = path
        self.temp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.data = data
        self.size = len(data)
        self._fsync = fsync

    def write_now(self) -> None:
        try:
            fd = os.open(
                self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666
            )
            try:
                os.write(fd, self.data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.discard()
            raise OutputError(f"cannot write {self.final_path}: {e.strerror or e}") from None

    def commit(self) -> None:
        try:
            os.replace(self.temp_path, self.final_path)
        except OSError as e:
            self.discard()
            raise OutputError(f"cannot write {self.final_path}: {e.strerror or e}") from None

    def discard(self) -> None:
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


def _refuse_input_as_output(inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    resolved = {Path(p).resolve() for p in inputs}
    for o in outputs:
        same = Path(o).resolve() in resolved or (
            o.exists() and any(i.exists() and os.path.samefile(o, i) for i in inputs)
        )
        if same:
            raise OutputError(
                f"output {o} is one of the inputs",
                hint="write the folded checkpoint to another path",
            )


def _field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = record.get(key) if isinstance(record, Mapping) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(
            f"pair record {record!r} has no valid {key!r}",
            hint="the checkpoint's qatconv metadata is damaged; re-run `qatconv prepare`",
        )
    return value


# --------------------------------------------------------------------------------------------
# BatchNorm1d -> Linear: fold the BN into the Linear's input side (plain float fold only)
# --------------------------------------------------------------------------------------------
def fold_bn_into_linear_input(
    w: torch.Tensor,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm1d that feeds a Linear into that Linear's weight and bias.

    ``Linear(BN(x)) = W (s * (x - mean) + beta) + b = (W diag(s)) x + (b + W (beta - mean * s))``
    with ``s = gamma * rsqrt(var + eps)``; so, in float64::

        W' = W * s[None, :]
        b' = b + W @ (beta - mean * s)

    ``gamma`` / ``beta`` None mean an ``affine=False`` BN (1 and 0); ``b`` None means no Linear
    bias (0; a bias is always returned). The weight comes back in ``w``'s dtype, the bias in
    ``b``'s (``w``'s when ``b`` is None).

    Raises:
        CheckpointError: ``w`` not a 2-D float (out, in) weight, BN vectors not of the Linear's
            ``in_features``, ``b`` not of its ``out_features``, ``var + eps <= 0``, or a result
            that is not finite (in float64 or after the cast back).
    """
    out, n_in = _check_input_fold_shapes(w, b, mean, var, gamma, beta)
    if not math.isfinite(eps):
        raise CheckpointError(f"BatchNorm eps is {eps}")
    var64 = var.to(torch.float64)
    bad = int((var64 + eps <= 0).sum())
    if bad:
        raise CheckpointError(
            f"running_var + eps <= 0 in {bad} of {n_in} BatchNorm channels",
            hint="a variance must be positive: the BN statistics are corrupt",
        )
    s = _bn_scale(var, eps, gamma)
    w64 = w.to(torch.float64)
    beta64 = torch.zeros(n_in, dtype=torch.float64) if beta is None else beta.to(torch.float64)
    shift = beta64 - mean.to(torch.float64) * s
    b64 = torch.zeros(out, dtype=torch.float64) if b is None else b.to(torch.float64)
    w_out = (w64 * s.unsqueeze(0)).to(w.dtype)
    b_out = (b64 + w64 @ shift).to(b.dtype if b is not None else w.dtype)
    for what, t in (("weight", w_out), ("bias", b_out)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(
                f"{bad} values of the Linear's folded {what} are not finite in {t.dtype}",
                hint="the BN statistics or the Linear hold NaN/inf, or gamma / sqrt(running_var "
                "+ eps) is too large for the checkpoint's dtype",
            )
    return w_out, b_out


def _check_input_fold_shapes(
    w: torch.Tensor,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[int, int]:
    if w.dim() != 2:
        raise CheckpointError(f"a Linear weight must be 2-D (out, in); got shape {list(w.shape)}")
    out, n_in = int(w.shape[0]), int(w.shape[1])
    named = (("Linear weight", w), ("Linear bias", b), ("BatchNorm running_mean", mean),
             ("BatchNorm running_var", var), ("BatchNorm weight (gamma)", gamma),
             ("BatchNorm bias (beta)", beta))  # fmt: skip
    for what, t in named:
        if t is not None and not t.is_floating_point():
            raise CheckpointError(f"{what} is {t.dtype}; folding needs floating-point tensors")
    for what, t in named[2:]:
        if t is not None and tuple(t.shape) != (n_in,):
            raise CheckpointError(
                f"{what} has shape {list(t.shape)}, but the Linear after it has "
                f"in_features={n_in}: the BN's features must equal the Linear's in_features"
            )
    if b is not None and tuple(b.shape) != (out,):
        raise CheckpointError(
            f"Linear bias has shape {list(b.shape)}, but the weight has {out} output channels"
        )
    return out, n_in


def fold_bn_before_linear_(
    tensors: dict[str, torch.Tensor], records: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Fold BatchNorm1d -> Linear candidates into their Linears, in place on a float state dict.

    Each record is ``{"bn": path, "linear": path, "eps": float}`` (other fields are ignored).
    The BN's tensors are ``<bn>.weight`` / ``.bias`` (both absent for ``affine=False``),
    ``.running_mean``, ``.running_var`` and ``.num_batches_tracked`` (optional); the Linear's
    are ``<linear>.weight`` and ``.bias`` (created when absent, right after the weight). The
    Linear's weight and bias are replaced (`fold_bn_into_linear_input`) and the BN's tensors
    deleted. Every record is checked and computed before ``tensors`` is changed, so on error
    it is left as it was.

    Returns:
        The removed tensor names, sorted.

    Raises:
        CheckpointError: a record lacks a field, a BN or Linear is in two records, a tensor
            is missing (named) or does not fit (see `fold_bn_into_linear_input`).
    """
    results: list[tuple[str, str, torch.Tensor, torch.Tensor, list[str]]] = []
    used: dict[str, str] = {}
    for record in records:
        bn = _field(record, "bn", str)
        lin = _field(record, "linear", str)
        eps = float(_field(record, "eps", (int, float)))
        for path, role in ((bn, "BatchNorm"), (lin, "Linear")):
            if path in used:
                raise CheckpointError(
                    f"module {path!r} appears in two BatchNorm -> Linear folds "
                    f"(as {used[path]} and as {role})"
                )
            used[path] = role

        def need(key: str, bn: str = bn, lin: str = lin) -> torch.Tensor:
            if key not in tensors:
                raise CheckpointError(
                    f"BatchNorm {bn!r} -> Linear {lin!r}: tensor {key!r} is missing",
                    hint="the fold records do not match this checkpoint: check --model",
                )
            return tensors[key]

        w = need(f"{lin}.weight")
        b = tensors.get(f"{lin}.bias")
        mean, var = need(f"{bn}.running_mean"), need(f"{bn}.running_var")
        gamma_key, beta_key = f"{bn}.weight", f"{bn}.bias"
        affine = gamma_key in tensors or beta_key in tensors
        gamma = need(gamma_key) if affine else None
        beta = need(beta_key) if affine else None
        try:
            w_out, b_out = fold_bn_into_linear_input(w, b, mean, var, eps, gamma, beta)
        except CheckpointError as e:
            raise CheckpointError(
                f"BatchNorm {bn!r} -> Linear {lin!r}: {e.message}", hint=e.hint
            ) from None
        bn_keys = [f"{bn}.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                         "num_batches_tracked")]  # fmt: skip
        results.append((lin, bn, w_out, b_out, [k for k in bn_keys if k in tensors]))

    removed: list[str] = []
    created: dict[str, str] = {}  # weight key -> the bias key created for it
    for lin, bn, w_out, b_out, bn_keys in results:
        if f"{lin}.bias" not in tensors:
            created[f"{lin}.weight"] = f"{lin}.bias"
        tensors[f"{lin}.weight"] = w_out
        tensors[f"{lin}.bias"] = b_out
        for k in bn_keys:
            del tensors[k]
        removed.extend(bn_keys)
        logger.debug("folded BatchNorm %s into the input of Linear %s", bn, lin)
    if created:  # put each created bias right after its weight, where a state dict has it
        items = [(k, t) for k, t in tensors.items() if k not in created.values()]
        biases = {k: tensors[k] for k in created.values()}
        tensors.clear()
        for k, t in items:
            tensors[k] = t
            if k in created:
                tensors[created[k]] = biases[created[k]]
    return sorted(removed)
