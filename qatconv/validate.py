"""Refuse inputs whose numbers or metadata cannot give a correct result, before any work.

Three kinds of checks, each raising a `CheckpointError` (exit 3) that names the tensor and the
number of channels affected:

- `check_model_state`: a float model about to be prepared or folded holds only finite floats,
  and each paired BatchNorm's running_var is positive (a fold divides by sqrt(var + eps)).
- `qat_records` / `check_qat_tensors`: the ``qatconv`` metadata of a QAT checkpoint describes
  pairs with the agreed fields and types, and the checkpoint's own numbers are sane; read
  without torch, a block at a time, so memory stays flat whatever the file's size.
- `check_pairs_fit_model`: pair records name a Linear and a BatchNorm1d of the right sizes in
  the model the records are applied to.

Model code named by a checkpoint's metadata is vetted by `qatconv.modelspec.check_recorded_spec`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatconv import st_format
from qatconv.dtypes import DTYPES, FLOAT_DTYPES, SIZES
from qatconv.errors import CheckpointError
from qatconv.pair_record import META_HINT as _META_HINT
from qatconv.pair_record import PairRecord
from qatconv.st_checkpoint import open_checkpoint

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

_NONFINITE_HINT = (
    "the checkpoint is corrupt or its training diverged; re-export it from a healthy run"
)
_VAR_HINT = (
    "a BatchNorm variance must be positive: the statistics are corrupt; re-estimate them "
    "with `qatconv prepare --recalibrate-bn`"
)
_BROKEN_VAR_HINT = (
    "a BatchNorm variance must be positive: the statistics are corrupt; re-export the checkpoint"
)
_BACKENDS = ("x86", "fbgemm", "qnnpack")
_BLOCK_BYTES = 16 << 20  # read this much at a time when scanning a tensor for NaN/inf


# ------------------------------------------------------------------------------ float models


def check_model_state(
    model: nn.Module,
    records: Sequence[PairRecord],
    source: object,
    *,
    stats_recomputed: bool = False,
) -> None:
    """Refuse a float model with NaN/inf tensors or a paired BN whose running_var is <= 0.

    Args:
        model: the loaded float model.
        records: the pairs about to be prepared or folded (``bn`` paths).
        source: the checkpoint, for the message.
        stats_recomputed: BN running stats are about to be re-estimated (``--recalibrate-bn``):
            a running_var <= 0 is then accepted as long as running_var + eps > 0 (the QAT
            forward that re-estimates them divides by sqrt(running_var + eps)).

    Raises:
        CheckpointError: the first problem found (and how many others there are).
    """
    import torch
    from torch import nn

    problems: list[tuple[str, str]] = []
    for name, t in model.state_dict().items():
        # Even stats about to be re-estimated must be finite: the QAT module scales the weight
        # by gamma / sqrt(running_var + eps) in every forward, re-estimation's included.
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            where = _nonfinite_where(t)
            if where:
                problems.append((f"{name} has NaN/inf values in {where}", _NONFINITE_HINT))
    paired = {r.bn for r in records}
    for path, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        var = m.running_var
        if var is None or not bool(torch.isfinite(var).all()):
            continue  # no stats to fold, or already reported as non-finite
        v = var.detach().to(torch.float64)
        broken = int((v + m.eps <= 0).sum())  # sqrt(var + eps) is NaN or 0: no forward works
        # A folded pair divides by sqrt(var + eps): a variance <= 0 means corrupt statistics,
        # unless they are about to be re-estimated. A BN that is not folded only needs
        # var + eps > 0.
        strict = path in paired and not stats_recomputed
        bad = int((v <= 0).sum()) if strict else broken
        if bad:
            what = "<= 0" if strict else "+ eps <= 0"
            problems.append((
                f"{path}.running_var is {what} in {bad} of {v.numel()} channels",
                _VAR_HINT if not broken else _BROKEN_VAR_HINT,
            ))
    _raise_first(problems, source)


def _nonfinite_where(t: torch.Tensor) -> str:
    """'' when ``t`` is finite, else 'k of N output channels' / 'k of N values'."""
    import torch

    finite = torch.isfinite(t)
    if bool(finite.all()):
        return ""
    if t.dim() >= 1 and t.shape[0] > 0:
        rows = int((~finite.reshape(t.shape[0], -1).all(dim=1)).sum())
        unit = "channels" if t.dim() == 1 else "output channels"
        return f"{rows} of {t.shape[0]} {unit}"
    return "its value"


def _raise_first(problems: list[tuple[str, str]], source: object) -> None:
    if not problems:
        return
    message, hint = problems[0]
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    raise CheckpointError(f"{source}: {message}{more}", hint=hint)


# ------------------------------------------------------------------------------ QAT metadata


def qat_records(meta: Mapping[str, Any], source: object) -> list[PairRecord]:
    """The pair records of a QAT checkpoint's ``qatconv`` metadata, validated.

    Each record is validated by `PairRecord.from_json`; no module may be in two pairs. The
    checkpoint-wide ``backend`` and ``weight_bits``, when present, must be ones qatconv knows.

    Raises:
        CheckpointError: the first field that is missing or malformed, naming the pair.
    """
    pairs = meta.get("pairs")
    if not isinstance(pairs, list):
        raise CheckpointError(
            f"{source}: the qatconv metadata has no list of 'pairs' "
            f"(found {type(pairs).__name__})",
            hint=_META_HINT,
        )
    backend = meta.get("backend", "x86")
    if backend not in _BACKENDS:
        raise CheckpointError(
            f"{source}: unknown backend {backend!r} in the qatconv metadata "
            f"(expected one of {', '.join(_BACKENDS)})",
            hint=_META_HINT,
        )
    bits = meta.get("weight_bits", 8)
    if not _is_int(bits) or not 2 <= bits <= 8:
        raise CheckpointError(
            f"{source}: weight_bits {bits!r} in the qatconv metadata is not 2..8", hint=_META_HINT
        )
    out: list[PairRecord] = []
    seen: set[str] = set()
    for i, obj in enumerate(pairs):
        r = PairRecord.from_json(obj, source, i)
        for path, is_qat in ((r.linear, False), (r.bn, False), (r.qat, True)):
            if path in seen and not (is_qat and r.qat == r.linear):
                raise CheckpointError(
                    f"{source}: module {path!r} appears in two pairs of the qatconv metadata",
                    hint=_META_HINT,
                )
        seen.update({r.linear, r.bn})
        out.append(r)
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ------------------------------------------------------------------------------- QAT tensors


def check_qat_tensors(
    path: Path, records: Sequence[PairRecord], *, skip: frozenset[str] = frozenset()
) -> None:
    """Refuse a QAT checkpoint with NaN/inf weights or a paired running_var <= 0.

    Fake-quant state is not scanned (an observer that never ran holds +-inf bounds; fold checks
    the scales itself). See `check_file_tensors`.
    """
    running_vars = {f"{r.qat}.bn.running_var": (float(r.eps), True) for r in records}
    check_file_tensors(path, running_vars, skip=skip,
                       ignore=(".weight_fake_quant.", ".input_fake_quant."))


def check_file_tensors(
    path: Path,
    running_vars: Mapping[str, tuple[float, bool]],
    *,
    skip: frozenset[str] = frozenset(),
    ignore: tuple[str, ...] = (),
) -> None:
    """Refuse a safetensors checkpoint with NaN/inf tensors or broken BatchNorm variances.

    What `check_model_state` checks on a loaded model, read from the file with pread a block at
    a time, without torch: memory stays flat.

    Args:
        running_vars: BN ``running_var`` tensor -> (eps, paired): a paired one must be > 0,
            any other > -eps.
        skip: tensors the caller checks itself (the fold checks every folded weight's values
            as it streams them, so a second full read is not needed).
        ignore: tensors whose name contains one of these are not scanned.

    Raises:
        CheckpointError: the first problem found, naming the tensor and the channels.
    """
    problems: list[tuple[str, str]] = []
    with open_checkpoint(Path(path)) as ckpt:
        for name in sorted(ckpt.where, key=lambda n: (ckpt.where[n], n)):
            fd, header = ckpt.locate(name)
            info = header.tensors[name]
            if info.dtype not in FLOAT_DTYPES or name in skip or any(i in name for i in ignore):
                continue
            problem = _tensor_problem(fd, header, name, running_vars.get(name))
            if problem:
                problems.append(problem)
    _raise_first(problems, path)


def _tensor_problem(
    fd: int, header: st_format.Header, name: str, var: tuple[float, bool] | None
) -> tuple[str, str] | None:
    info = header.tensors[name]
    rows = info.shape[0] if info.shape else 1
    bad_rows = _scan_nonfinite(fd, header, name)
    if bad_rows:
        unit = "channels" if len(info.shape) == 1 else "output channels"
        return f"{name} has NaN/inf values in {bad_rows} of {rows} {unit}", _NONFINITE_HINT
    if var is None:
        return None
    eps, paired = var
    values = _as_float64(st_format.read_tensor_bytes(fd, header, name), info.dtype)
    broken = int((values + eps <= 0).sum())
    bad = int((values <= 0).sum()) if paired else broken
    if not bad:
        return None
    what = "<= 0" if paired else "+ eps <= 0"
    return (f"{name} is {what} in {bad} of {values.size} channels",
            _VAR_HINT if not broken else _BROKEN_VAR_HINT)


def _as_float64(raw: bytes | memoryview, dtype: str) -> np.ndarray:
    import numpy as np

    arr = np.frombuffer(raw, dtype=np.dtype(DTYPES[dtype].numpy))
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return arr.astype(np.float64)


def _scan_nonfinite(fd: int, header: st_format.Header, name: str) -> int:
    """How many rows (first-dimension slices) of tensor ``name`` hold a NaN or inf."""
    import numpy as np

    info = header.tensors[name]
    if info.numel == 0:
        return 0
    rows = info.shape[0] if info.shape else 1
    row_elems = info.numel // rows
    row_bytes = row_elems * SIZES[info.dtype]
    block = max(1, _BLOCK_BYTES // row_bytes)
    buf = bytearray(min(rows, block) * row_bytes)  # reused for every block of this tensor
    bad = 0
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        view = (
            st_format.read_tensor_bytes(fd, header, name, r0, r1, out=buf)
            if info.shape
            else st_format.read_tensor_bytes(fd, header, name, out=buf)
        )
        if info.dtype == "BF16":  # no numpy bfloat16: all exponent bits set means NaN/inf
            bits = np.frombuffer(view, dtype="<u2")
            nonfinite = (bits & 0x7F80) == 0x7F80
        else:
            values = np.frombuffer(view, dtype=np.dtype(DTYPES[info.dtype].numpy))
            if bool(np.isfinite(values).all()):  # the common case, one vectorised pass
                continue
            nonfinite = ~np.isfinite(values)
        if bool(nonfinite.any()):
            bad += int(nonfinite.reshape(r1 - r0, row_elems).any(axis=1).sum())
    return bad


# ---------------------------------------------------------------------------- pairs vs model


def check_pairs_fit_model(
    model: nn.Module, records: Iterable[PairRecord], source: object
) -> None:
    """Each record's ``linear`` is an ``nn.Linear`` and ``bn`` a ``BatchNorm1d`` of its size.

    Raises:
        CheckpointError: a path the model does not have, or a module of another kind or size.
    """
    from torch import nn

    for r in records:
        lin_path, bn_path = r.linear, r.bn
        lin, bn = _submodule(model, lin_path), _submodule(model, bn_path)
        if lin is None or bn is None:
            missing = lin_path if lin is None else bn_path
            raise CheckpointError(
                f"{source}: pair {lin_path} -> {bn_path}: the model has no module {missing!r}",
                hint="the checkpoint was made from another model: check --model / --model-arg",
            )
        if not isinstance(lin, nn.Linear) or not isinstance(bn, nn.BatchNorm1d):
            raise CheckpointError(
                f"{source}: pair {lin_path} -> {bn_path}: the model has a "
                f"{type(lin).__name__} and a {type(bn).__name__} there, not a Linear and a "
                "BatchNorm1d",
                hint="the checkpoint was made from another model: check --model / --model-arg",
            )
        if (bn.num_features != lin.out_features or r.out_features != lin.out_features
                or r.in_features != lin.in_features):
            raise CheckpointError(
                f"{source}: pair {lin_path} -> {bn_path}: the model's sizes "
                f"({lin.in_features}->{lin.out_features}, BN {bn.num_features}) differ from the "
                f"recorded {r.in_features}->{r.out_features}",
                hint="check --model-arg: the checkpoint was made with other sizes",
            )


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
