"""BatchNorm1d -> Linear input-side fold: against the unfused BN -> Linear model run in float64.

Reference everywhere: torch's own eval-mode BatchNorm1d followed by the Linear, run in float64
on the (possibly low-precision) source tensors upcast exactly; the folded Linear is run in
float64 too, so the only difference left is the rounding of W' and b' to the checkpoint dtype.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_rel_close
from safetensors.torch import save_file
from torch import nn

from qatconv import api
from qatconv.errors import CheckpointError
from qatconv.folding import (
    FoldPair,
    fold_bn_before_linear_,
    fold_bn_into_linear_input,
    fold_state_dict,
)
from qatconv.pairs import BnBeforeLinear, find_pairs
from sample_models.edge_cases import CASES

ROOT = Path(__file__).resolve().parents[1]

# Per-dtype relative tolerance: twice the unit roundoff (one rounding of each folded value to
# the dtype; 16-bit casts may round twice, through float32). Applied elementwise to the output
# scale |W'| |x| + |b'|, which bounds the rounding error of x W'^T + b'.
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


def _stats(
    n_in: int, out: int, dtype: torch.dtype, seed: int, *, affine: bool, bias: bool
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    t: dict[str, Any] = {
        "w": (torch.randn(out, n_in, generator=g) / max(n_in, 1) ** 0.5).to(dtype),
        "b": (torch.randn(out, generator=g) * 0.5).to(dtype) if bias else None,
        "mean": (torch.randn(n_in, generator=g) * 2.0).to(dtype),
        "var": (torch.rand(n_in, generator=g) * 3.0 + 0.05).to(dtype),
        "gamma": (1.0 + 0.5 * torch.randn(n_in, generator=g)).to(dtype) if affine else None,
        "beta": (0.5 * torch.randn(n_in, generator=g)).to(dtype) if affine else None,
    }
    return t


def _reference(t: dict[str, Any], eps: float, x: torch.Tensor) -> torch.Tensor:
    """The unfused BatchNorm1d -> Linear in float64 eval mode, on the source tensors."""
    n_in, out = t["w"].shape[1], t["w"].shape[0]
    bn = nn.BatchNorm1d(n_in, eps=eps, affine=t["gamma"] is not None, dtype=torch.float64)
    lin = nn.Linear(n_in, out, bias=t["b"] is not None, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(t["mean"].double())
        bn.running_var.copy_(t["var"].double())
        if t["gamma"] is not None:
            bn.weight.copy_(t["gamma"].double())
            bn.bias.copy_(t["beta"].double())
        lin.weight.copy_(t["w"].double())
        if t["b"] is not None:
            lin.bias.copy_(t["b"].double())
        return lin(bn.eval()(x))


def _check_fold(t: dict[str, Any], eps: float, x: torch.Tensor, dtype: torch.dtype) -> None:
    w2, b2 = fold_bn_into_linear_input(
        t["w"], t["b"], t["mean"], t["var"], eps, t["gamma"], t["beta"]
    )
    assert w2.dtype == dtype and b2.dtype == dtype
    assert w2.shape == t["w"].shape and b2.shape == (t["w"].shape[0],)
    ref = _reference(t, eps, x)
    got = x @ w2.double().T + b2.double()
    scale = x.abs() @ w2.double().abs().T + b2.double().abs()
    err = (got - ref).abs()
    assert bool((err <= RTOL[dtype] * scale + 1e-300).all()), float((err / scale).max())


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize(
    ("affine", "bias"), [(True, True), (False, True), (True, False), (False, False)]
)
def test_fold_matches_unfused_float64(dtype: torch.dtype, affine: bool, bias: bool) -> None:
    for seed, (n_in, out) in enumerate([(7, 5), (1, 3), (32, 16), (5, 1)]):
        t = _stats(n_in, out, dtype, seed, affine=affine, bias=bias)
        x = torch.randn(64, n_in, generator=torch.Generator().manual_seed(100 + seed)) * 3
        _check_fold(t, 1e-5, x.double(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_gamma_channels_drop_their_input(dtype: torch.dtype) -> None:
    t = _stats(9, 4, dtype, 7, affine=True, bias=True)
    zero = [0, 4, 8]
    t["gamma"][zero] = 0
    w2, _ = fold_bn_into_linear_input(
        t["w"], t["b"], t["mean"], t["var"], 1e-3, t["gamma"], t["beta"]
    )
    assert bool((w2[:, zero] == 0).all())
    assert bool((w2[:, [1, 2, 3, 5, 6, 7]] != 0).all())
    # The zeroed channels still contribute W[:, j] * beta_j to the bias: the input is ignored.
    x = torch.randn(16, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x2 = x.clone()
    x2[:, zero] = 1e6
    _check_fold(t, 1e-3, x, dtype)
    _check_fold(t, 1e-3, x2, dtype)


def test_bias_dtype_follows_b_and_w_without_b() -> None:
    t = _stats(4, 3, torch.float16, 0, affine=True, bias=True)
    w2, b2 = fold_bn_into_linear_input(
        t["w"], t["b"].float(), t["mean"], t["var"], 1e-5, t["gamma"], t["beta"]
    )
    assert (w2.dtype, b2.dtype) == (torch.float16, torch.float32)
    w2, b2 = fold_bn_into_linear_input(
        t["w"], None, t["mean"], t["var"], 1e-5, t["gamma"], t["beta"]
    )
    assert (w2.dtype, b2.dtype) == (torch.float16, torch.float16)


def test_empty_input_features() -> None:
    w = torch.zeros(3, 0)
    b = torch.tensor([1.0, -2.0, 0.5])
    e = torch.zeros(0)
    w2, b2 = fold_bn_into_linear_input(w, b, e, e + 1, 1e-5, e, e)
    assert w2.shape == (3, 0) and torch.equal(b2, b)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mean": torch.zeros(6)}, "in_features=5"),
        ({"var": torch.ones(4)}, "in_features"),
        ({"gamma": torch.ones(6)}, "the BN's features must equal the Linear's in_features"),
        ({"b": torch.zeros(4)}, "3 output channels"),
        ({"w": torch.zeros(3, 5, 1)}, "2-D"),
        ({"w": torch.zeros(3, 5, dtype=torch.int32)}, "floating-point"),
        ({"var": torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0])}, "running_var + eps <= 0 in 1 of 5"),
        ({"var": torch.zeros(5)}, "running_var + eps <= 0 in 5 of 5"),
        ({"mean": torch.tensor([0.0, float("nan"), 0, 0, 0])}, "not finite"),
        ({"gamma": torch.full((5,), 3e38), "w": torch.full((3, 5), 4.0)}, "weight are not finite"),
        ({"w": torch.full((3, 5), 60000.0, dtype=torch.float16)}, "not finite in torch.float16"),
    ],
)
def test_bad_inputs_raise_checkpoint_error(change: dict[str, torch.Tensor], message: str) -> None:
    t = _stats(5, 3, torch.float32, 1, affine=True, bias=True)
    t["var"] = torch.ones(5)
    t.update(change)
    eps = 0.0 if "running_var" in message else 1e-5
    with pytest.raises(CheckpointError, match=re.escape(message)):
        fold_bn_into_linear_input(t["w"], t["b"], t["mean"], t["var"], eps, t["gamma"], t["beta"])


def test_non_finite_eps() -> None:
    t = _stats(5, 3, torch.float32, 1, affine=True, bias=True)
    with pytest.raises(CheckpointError, match="eps is nan"):
        fold_bn_into_linear_input(
            t["w"], t["b"], t["mean"], t["var"], float("nan"), t["gamma"], t["beta"]
        )


# --------------------------------------------------------------------------------------------
# fold_bn_before_linear_ on state dicts
# --------------------------------------------------------------------------------------------
class _BnLinear(nn.Module):
    def __init__(self, n_in: int, out: int, *, affine: bool, bias: bool, seed: int) -> None:
        super().__init__()
        self.pre = nn.Linear(3, n_in)
        self.norm = nn.BatchNorm1d(n_in, eps=1e-3, affine=affine)
        self.fc = nn.Linear(n_in, out, bias=bias)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.norm.running_mean.copy_(torch.randn(n_in, generator=g))
            self.norm.running_var.copy_(torch.rand(n_in, generator=g) + 0.1)
            self.norm.num_batches_tracked.fill_(17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.relu(self.pre(x))))


def _folded_model(
    model: nn.Module, folds: list[tuple[str, str]], sd: dict[str, torch.Tensor]
) -> nn.Module:
    """``model`` with each (bn, linear): the BN replaced by nn.Identity and the Linear given a
    bias, loaded (strictly) from the folded state dict ``sd``."""
    new = copy.deepcopy(model)
    for bn, lin in folds:
        new.set_submodule(bn, nn.Identity())
        linear = new.get_submodule(lin)
        assert isinstance(linear, nn.Linear)
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
    new.load_state_dict(sd, strict=True)
    return new.eval()


@pytest.mark.parametrize(("affine", "bias"), [(True, True), (False, False), (True, False)])
def test_state_dict_fold_in_place(affine: bool, bias: bool) -> None:
    model = _BnLinear(6, 4, affine=affine, bias=bias, seed=5).eval()
    sd = dict(model.state_dict())
    before = list(sd)
    bn_keys = [k for k in before if k.startswith("norm.")]
    removed = fold_bn_before_linear_(sd, [{"bn": "norm", "linear": "fc", "eps": 1e-3}])
    assert removed == sorted(bn_keys)
    assert len(bn_keys) == (5 if affine else 3)
    # Order kept; a created bias sits right after its weight.
    expected = [k for k in before if k not in bn_keys]
    if not bias:
        expected.insert(expected.index("fc.weight") + 1, "fc.bias")
    assert list(sd) == expected
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.double()(x.double())
        got = _folded_model(model.float(), [("norm", "fc")], sd)(x)
    assert_rel_close(got, ref, 1e-5)


def test_state_dict_fold_missing_keys_name_the_key_and_change_nothing() -> None:
    model = _BnLinear(4, 2, affine=True, bias=True, seed=1)
    rec = {"bn": "norm", "linear": "fc", "eps": 1e-5}
    for key in ("norm.running_var", "norm.running_mean", "fc.weight", "norm.bias", "norm.weight"):
        sd = dict(model.state_dict())
        del sd[key]
        snapshot = dict(sd)
        with pytest.raises(CheckpointError, match=f"'{key}' is missing"):
            fold_bn_before_linear_(sd, [rec])
        assert sd.keys() == snapshot.keys() and all(sd[k] is snapshot[k] for k in sd)
    # A bad second record leaves the first one unapplied too.
    sd = dict(model.state_dict())
    snapshot = dict(sd)
    with pytest.raises(CheckpointError, match="'other.running_mean' is missing"):
        fold_bn_before_linear_(sd, [rec, {"bn": "other", "linear": "pre", "eps": 1e-5}])
    assert sd.keys() == snapshot.keys() and all(sd[k] is snapshot[k] for k in sd)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"bn": "norm", "linear": "fc"}], "'eps'"),
        ([{"bn": "norm", "eps": 1e-5}], "'linear'"),
        ([{"bn": 3, "linear": "fc", "eps": 1e-5}], "'bn'"),
        ([{"bn": "norm", "linear": "fc", "eps": True}], "'eps'"),
        (
            [
                {"bn": "norm", "linear": "fc", "eps": 1e-5},
                {"bn": "norm", "linear": "pre", "eps": 1},
            ],
            "'norm' appears in two",
        ),
        ([{"bn": "norm", "linear": "pre", "eps": 1e-5}], "in_features=3"),
    ],
)
def test_state_dict_fold_bad_records(records: list[dict[str, Any]], message: str) -> None:
    sd = dict(_BnLinear(4, 2, affine=True, bias=True, seed=1).state_dict())
    with pytest.raises(CheckpointError, match=message):
        fold_bn_before_linear_(sd, records)


def _candidates() -> list[str]:
    return [name for name, case in CASES.items() if case.bn_before_linear]


@pytest.mark.parametrize("name", _candidates())
def test_edge_case_end_to_end(name: str) -> None:
    case = CASES[name]
    model = case.model().eval()
    (x,) = model.example_inputs()
    scan = find_pairs(model, (x,))
    assert [(c.bn, c.linear) for c in scan.bn_before_linear] == list(case.bn_before_linear)
    assert all(isinstance(c, BnBeforeLinear) and c.verified for c in scan.bn_before_linear)
    records = [
        {"bn": c.bn, "linear": c.linear, "eps": model.get_submodule(c.bn).eps}
        for c in scan.bn_before_linear
    ]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    removed = fold_bn_before_linear_(sd, records)
    assert removed and all(k.startswith(tuple(f"{r['bn']}." for r in records)) for k in removed)
    new = _folded_model(model, [(r["bn"], r["linear"]) for r in records], sd)
    xs = torch.cat([x, torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(9))])
    with torch.no_grad():
        ref, got = model(xs), new(xs)
    assert_rel_close(got, ref, 1e-5)
    assert not any(isinstance(new.get_submodule(r["bn"]), nn.BatchNorm1d) for r in records)
    # The fold is not a no-op: leaving the BN out without folding changes the outputs.
    plain = copy.deepcopy(model)
    for r in records:
        plain.set_submodule(r["bn"], nn.Identity())
    with torch.no_grad():
        assert float((plain(xs) - ref).abs().max()) > 1e-2


# --------------------------------------------------------------------------------------------
# BN -> Linear -> BN: input-side fold, then the ordinary output-side fold
# --------------------------------------------------------------------------------------------
class _Sandwich(nn.Module):
    def __init__(self, bias: bool, affine_in: bool) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(6, affine=affine_in, eps=1e-4)
        self.fc = nn.Linear(6, 8, bias=bias)
        self.bn_out = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        g = torch.Generator().manual_seed(21)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7 + (1.0 if p.dim() == 1 else 0))
            for bn in (self.bn_in, self.bn_out):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn_out(self.fc(self.bn_in(x)))))


@pytest.mark.parametrize(("bias", "affine_in"), [(True, True), (False, True), (False, False)])
def test_bn_linear_bn_chain(bias: bool, affine_in: bool) -> None:
    model = _Sandwich(bias, affine_in).eval()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(2)) * 2
    scan = find_pairs(model, (x,))
    assert [(p.linear, p.bn) for p in scan.pairs] == [("fc", "bn_out")]
    assert [(c.bn, c.linear) for c in scan.bn_before_linear] == [("bn_in", "fc")]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fold_bn_before_linear_(sd, [{"bn": "bn_in", "linear": "fc", "eps": model.bn_in.eps}])
    assert "fc.bias" in sd  # created when the Linear had none
    record = replace(scan.pairs[0].to_record(), bias=True)  # the input-side fold gave it one
    out = fold_state_dict(sd, [FoldPair.from_float_record(record)])
    assert not any(k.startswith(("bn_in.", "bn_out.")) for k in out)
    new = copy.deepcopy(model)
    new.bn_in, new.bn_out = nn.Identity(), nn.Identity()
    if new.fc.bias is None:
        new.fc.bias = nn.Parameter(torch.zeros(8))
    new.load_state_dict(out, strict=True)
    with torch.no_grad():
        assert_rel_close(new.eval()(x), model(x), 1e-5)


# --------------------------------------------------------------------------------------------
# Property test
# --------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 24),
    out=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    affine=st.booleans(),
    bias=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    zero_gamma=st.booleans(),
    var_scale=st.sampled_from([1e-4, 1.0, 100.0]),
)
def test_property_fold_equals_unfused(
    n_in: int,
    out: int,
    seed: int,
    affine: bool,
    bias: bool,
    eps: float,
    dtype: torch.dtype,
    zero_gamma: bool,
    var_scale: float,
) -> None:
    t = _stats(n_in, out, dtype, seed, affine=affine, bias=bias)
    t["var"] = (t["var"].double() * var_scale).to(dtype)
    if affine and zero_gamma:
        t["gamma"][::2] = 0
    x = torch.randn(8, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _check_fold(t, eps, x, dtype)


# --------------------------------------------------------------------------------------------
# BN -> Linear in inspect, in the no-pairs hint, and in prepare
# --------------------------------------------------------------------------------------------
def test_inspect_lists_the_candidate_and_the_no_pairs_hint_names_the_flag(
    tmp_path: Path, cli: Any
) -> None:
    from sample_models.edge_cases import BnBeforeLinear as OnlyBefore

    model = OnlyBefore().eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    spec = f"{ROOT / 'sample_models' / 'edge_cases.py'}:BnBeforeLinear"
    r = cli("inspect", tmp_path / "w.safetensors", "--model", spec)
    assert r.code == 0, r.err
    row = [line for line in r.err.splitlines() if "fold with --fold-bn-before-linear" in line]
    assert len(row) == 1 and "fc" in row[0] and "bn" in row[0]
    assert "not-adjacent" not in r.err
    (x,) = model.example_inputs()
    np.savez(tmp_path / "x.npz", inputs=x.numpy())
    r = cli("prepare", "--model", spec, "--weights", tmp_path / "w.safetensors", "--data",
            tmp_path / "x.npz", "-o", tmp_path / "q.safetensors")
    assert r.code == 3
    assert "hint: 1 BatchNorm1d -> Linear candidate(s) (bn -> fc) fold with " \
           "--fold-bn-before-linear" in r.err


def test_prepare_folds_bn_before_linear_and_the_fold_matches_the_float_model(
    tmp_path: Path, cli: Any
) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    from structured import BnSandwich, randomize_bn_

    model = randomize_bn_(BnSandwich()).eval()
    weights, data = tmp_path / "w.safetensors", tmp_path / "x.npz"
    save_file(model.state_dict(), weights)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(4))
    np.savez(data, inputs=x.numpy())
    spec = f"{ROOT / 'tests' / 'models' / 'structured.py'}:BnSandwich"
    q = tmp_path / "q.safetensors"
    r = cli("prepare", "--model", spec, "--weights", weights, "--data", data, "-o", q,
            "--fold-bn-before-linear", "--json")
    assert r.code == 0, r.err
    assert [(p["linear"], p["bn"], p["bias"]) for p in r.json()["pairs"]] == [
        ("fc", "bn_out", True)]  # the input-side fold gave fc its bias
    assert [(b["bn"], b["linear"]) for b in r.json()["bn_before_linear"]] == [("bn_in", "fc")]
    out = tmp_path / "f.safetensors"
    r = cli("fold", q, "-o", out, "--check", data, "--json")
    assert r.code == 0, r.err
    assert r.json()["check"]["passed"]
    folded = api.load_folded(BnSandwich().eval(), out)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    with torch.no_grad():  # against the unfused float model; tolerance: float32 rounding
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
