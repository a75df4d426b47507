"""BatchNorm1d -> Linear: fold a BN into the input side of the Linear it feeds (plain fold only).

Edits a float state dict in place; the arithmetic is `fold_math.fold_bn_into_linear_input`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from qatconv.errors import CheckpointError
from qatconv.fold_math import fold_bn_into_linear_input
from qatconv.fold_plan import record_field

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["fold_bn_before_linear_"]

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _InputFold(NamedTuple):
    linear: str
    bn: str
    weight: torch.Tensor
    bias: torch.Tensor
    bn_keys: list[str]  # the BN tensors present, to delete


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
    used: dict[str, str] = {}
    folds = [_compute(tensors, record, used) for record in records]
    return _apply_(tensors, folds)


def _compute(
    tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any], used: dict[str, str]
) -> _InputFold:
    """One record's folded weight and bias, checked; ``tensors`` is not changed."""
    bn = record_field(record, "bn", str)
    lin = record_field(record, "linear", str)
    eps = float(record_field(record, "eps", (int, float)))
    for path, role in ((bn, "BatchNorm"), (lin, "Linear")):
        if path in used:
            raise CheckpointError(
                f"module {path!r} appears in two BatchNorm -> Linear folds "
                f"(as {used[path]} and as {role})"
            )
        used[path] = role

    def need(key: str) -> torch.Tensor:
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
    bn_keys = [f"{bn}.{n}" for n in _BN_TENSORS]
    return _InputFold(lin, bn, w_out, b_out, [k for k in bn_keys if k in tensors])


def _apply_(tensors: dict[str, torch.Tensor], folds: Sequence[_InputFold]) -> list[str]:
    """Write the folded Linears, delete the BN tensors; return the removed names, sorted."""
    removed: list[str] = []
    created: dict[str, str] = {}  # weight key -> the bias key created for it
    for f in folds:
        if f"{f.linear}.bias" not in tensors:
            created[f"{f.linear}.weight"] = f"{f.linear}.bias"
        tensors[f"{f.linear}.weight"] = f.weight
        tensors[f"{f.linear}.bias"] = f.bias
        for k in f.bn_keys:
            del tensors[k]
        removed.extend(f.bn_keys)
        logger.debug("folded BatchNorm %s into the input of Linear %s", f.bn, f.linear)
    if created:  # put each created bias right after its weight, where a state dict has it
        items = [(k, t) for k, t in tensors.items() if k not in created.values()]
        biases = {k: tensors[k] for k in created.values()}
        tensors.clear()
        for k, t in items:
            tensors[k] = t
            if k in created:
                tensors[created[k]] = biases[created[k]]
    return sorted(removed)
