"""The fold arithmetic: BatchNorm statistics into a Linear's weight and bias, in float64.

Pure functions on tensors (no files, no plans), as `torch.nn.utils.fusion.fuse_linear_bn_weights`
is. The output-side fold (Linear -> BN, what ``LinearBn1d.to_float()`` computes):

    s  = gamma * rsqrt(running_var + eps)
    W' = W * s[:, None]
    b' = (b - running_mean) * s + beta

and the input-side fold (BN -> Linear, `fold_bn_into_linear_input`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from qatconv.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["bn_scale", "fold_bias", "fold_bn_into_linear_input", "fold_weights"]


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
    import torch

    out = _check_fold_shapes(w, b, mean, var, gamma, beta)
    s = bn_scale(_f64(var), eps, _f64(gamma))
    w_out = (w.to(torch.float64) * torch.from_numpy(s).unsqueeze(-1)).to(w.dtype)
    b64 = fold_bias(_f64(b), _f64(mean), s, _f64(beta), out)
    b_out = torch.from_numpy(b64).to(b.dtype if b is not None else w.dtype)
    return w_out, b_out


def _f64(t: torch.Tensor | None) -> np.ndarray | None:
    import torch

    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def bn_scale(var: np.ndarray, eps: float, gamma: np.ndarray | None) -> np.ndarray:
    """``gamma * rsqrt(running_var + eps)`` in float64 (as torch's rsqrt: 1 / sqrt, each exact)."""
    s = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    return s if gamma is None else np.asarray(gamma, dtype=np.float64) * s


def fold_bias(
    b: np.ndarray | None,
    mean: np.ndarray,
    s: np.ndarray,
    beta: np.ndarray | None,
    out: int,
) -> np.ndarray:
    """``(b - running_mean) * s + beta`` in float64 (``b`` / ``beta`` None: zeros)."""
    b64 = np.zeros(out) if b is None else np.asarray(b, dtype=np.float64)
    # Adding beta = 0 when affine=False is not a no-op: it turns -0.0 into 0.0, as torch does
    # with the zeros a LinearBn1d stores, so both record kinds give the same bytes.
    beta64 = np.zeros(out) if beta is None else np.asarray(beta, dtype=np.float64)
    return (b64 - np.asarray(mean, dtype=np.float64)) * s + beta64


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
    import torch

    var64 = var.to(torch.float64)
    bad = int((var64 + eps <= 0).sum())
    if bad:
        raise CheckpointError(
            f"running_var + eps <= 0 in {bad} of {n_in} BatchNorm channels",
            hint="a variance must be positive: the BN statistics are corrupt",
        )
    s = torch.from_numpy(bn_scale(_f64(var), eps, _f64(gamma)))
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
