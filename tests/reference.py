"""Independent references the tests compare qatconv with (never qatconv's own code paths).

- The eval-mode BatchNorm folds in float64, written from the formulas (``1 / sqrt``, not the
  library's ``rsqrt``): Linear -> BN (`fold_linear_bn64`) and BN -> Linear (`fold_bn_linear64`),
  on tensors or on modules (`fold_modules64`, in place: `fold_into_model_`).
- `fold_state64`: the same fold on a state dict's tensors.
- `assert_rel_close`: outputs agree within ``rel`` times the reference's largest magnitude.
- `pair_record`: the `PairRecord` of a Linear and a BatchNorm1d of a model, read off the modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qatconv.pair_record import PairRecord

F64 = torch.float64


def bn_scale64(var: Tensor, eps: float, gamma: Tensor | None = None) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` in float64 (``gamma`` None: an affine=False BN)."""
    g = gamma.to(F64) if gamma is not None else torch.ones(var.shape, dtype=F64)
    return g / torch.sqrt(var.to(F64) + eps)


def fold_linear_bn64(
    w: Tensor, b: Tensor | None, mean: Tensor, var: Tensor, eps: float,
    gamma: Tensor | None = None, beta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Linear -> BN folded, float64: ``W' = W * s[:, None]``, ``b' = (b - mean) * s + beta``."""
    out = w.shape[0]
    s = bn_scale64(var, eps, gamma)
    b64 = b.to(F64) if b is not None else torch.zeros(out, dtype=F64)
    beta64 = beta.to(F64) if beta is not None else torch.zeros(out, dtype=F64)
    return w.to(F64) * s[:, None], (b64 - mean.to(F64)) * s + beta64


def fold_bn_linear64(
    w: Tensor, b: Tensor | None, mean: Tensor, var: Tensor, eps: float,
    gamma: Tensor | None = None, beta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BN -> Linear folded, float64: ``W' = W diag(s)``, ``b' = b + W (beta - mean * s)``."""
    n_in = w.shape[1]
    s = bn_scale64(var, eps, gamma)
    beta64 = beta.to(F64) if beta is not None else torch.zeros(n_in, dtype=F64)
    b64 = b.to(F64) if b is not None else torch.zeros(w.shape[0], dtype=F64)
    w64 = w.to(F64)
    return w64 * s[None, :], b64 + w64 @ (beta64 - mean.to(F64) * s)


def fold_state64(
    state: dict[str, Tensor], linear: str, bn: str, eps: float, prefix: str = ""
) -> tuple[Tensor, Tensor]:
    """`fold_linear_bn64` on a state dict's tensors, cast back to the weight's dtype.

    ``prefix``: where the BN's tensors live when not at ``bn`` (a QAT checkpoint keeps them
    under ``<linear>.bn``). An absent bias / BN weight / BN bias reads as 0 / 1 / 0.
    """
    w = state[f"{linear}.weight"]
    at = prefix or bn
    w64, b64 = fold_linear_bn64(
        w, state.get(f"{linear}.bias"), state[f"{at}.running_mean"], state[f"{at}.running_var"],
        eps, state.get(f"{at}.weight"), state.get(f"{at}.bias"),
    )
    return w64.to(w.dtype), b64.to(w.dtype)


def _bn_tensors(norm: nn.Module) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]:
    gamma = norm.weight if norm.affine else None
    beta = norm.bias if norm.affine else None
    return norm.running_mean, norm.running_var, float(norm.eps), gamma, beta


def fold_modules64(first: nn.Module, second: nn.Module) -> tuple[Tensor, Tensor]:
    """The folded Linear (weight, bias) of ``Linear -> BN`` or ``BN -> Linear``, float64."""
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            return fold_linear_bn64(first.weight, first.bias, *_bn_tensors(second))
        assert isinstance(second, nn.Linear)
        return fold_bn_linear64(second.weight, second.bias, *_bn_tensors(first))


# float32 model outputs of a folded vs an unfolded model: a few float32 roundings of each of a
# handful of layers, relative to the output's scale.
REL = 1e-5


def fold_into_model_(model: nn.Module, first: str, second: str) -> None:
    """Fold ``first -> second`` (Linear -> BN or BN -> Linear) in place with `fold_modules64`:
    the Linear's tensors are overwritten (so tied / aliased uses see the change, as they would
    in a folded checkpoint; a missing bias is created), the BN becomes ``nn.Identity``."""
    a, b = model.get_submodule(first), model.get_submodule(second)
    lin, bn_path = (a, second) if isinstance(a, nn.Linear) else (b, first)
    w, bias = fold_modules64(a, b)
    with torch.no_grad():
        lin.weight.copy_(w)
        if lin.bias is None:
            lin.bias = nn.Parameter(bias.to(lin.weight.dtype))
        else:
            lin.bias.copy_(bias)
    parent, _, name = bn_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())


def assert_rel_close(got: Tensor, ref: Tensor, rel: float = REL) -> None:
    """``max |got - ref| <= rel * max |ref|``, and ``got`` finite, with the numbers on failure."""
    assert got.shape == ref.shape
    assert bool(torch.isfinite(got).all()), "non-finite outputs"
    err = float((got.to(F64) - ref.to(F64)).abs().max())
    scale = float(ref.to(F64).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * max|ref| ({scale:.3g})"


def pair_record(model: nn.Module, linear: str, bn: str) -> PairRecord:
    """The record of the pair (``linear``, ``bn``) of ``model``, as the pair finder writes it."""
    lin, norm = model.get_submodule(linear), model.get_submodule(bn)
    assert isinstance(lin, nn.Linear) and isinstance(norm, nn.BatchNorm1d)
    return PairRecord(linear, bn, linear, norm.eps, norm.momentum, lin.in_features,
                      lin.out_features, lin.bias is not None, norm.affine)
