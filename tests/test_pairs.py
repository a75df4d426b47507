"""find_pairs: the edge-case models give exactly the expected pairs and skip codes, and folding
what is reported (by a float64 reference fold written here) leaves eval outputs unchanged."""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

import pytest
import torch
from reference import fold_into_model_
from torch import nn

from qatconv.errors import DataError
from qatconv.pairs import SKIP_CODES, PairScan, find_pairs
from sample_models import edge_cases
from sample_models.edge_cases import CASES, Case

# Same-graph float64 arithmetic: a correct fold differs only by rounding (~1e-15 relative);
# 1e-5 is the contract's tolerance. A wrong fold with these BN stats differs by far more than 1e-3.
SAME_RTOL = 1e-5
CHANGED_RTOL = 1e-3


# --------------------------------------------------------------------------- reference folds


def fold_linear_bn_(model: nn.Module, linear: str, bn: str) -> None:
    """Reference fold, float64: W' = W * s, b' = (b - mean) * s + beta; BN -> Identity."""
    fold_into_model_(model, linear, bn)


def fold_bn_linear_(model: nn.Module, bn: str, linear: str) -> None:
    """Reference BN -> Linear fold, float64: W' = W diag(s), b' = b + W (beta - mean * s)."""
    fold_into_model_(model, bn, linear)


def eval64(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*(t.double() for t in inputs))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def built(case: Case) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = case.model().eval()
    return model, model.example_inputs()


def pair_list(scan: PairScan) -> list[tuple[str, str]]:
    return [(p.linear, p.bn) for p in scan.pairs]


def skip_map(scan: PairScan) -> dict[str | None, str]:
    return {s.bn: s.code for s in scan.skipped}


# --------------------------------------------------------------------------- expected reports


@pytest.mark.parametrize("name", list(CASES))
def test_case_with_sample(name: str) -> None:
    case = CASES[name]
    model, inputs = built(case)
    scan = find_pairs(model, inputs)
    assert pair_list(scan) == case.pairs
    assert skip_map(scan) == case.skipped
    assert all(p.verified for p in scan.pairs)
    assert scan.unverified == ()
    assert [(b.bn, b.linear) for b in scan.bn_before_linear] == list(case.bn_before_linear)
    assert all(b.verified for b in scan.bn_before_linear)
    assert scan.traced is case.traced
    assert (scan.trace_error is None) is case.traced
    # strict changes nothing when every pair could be checked
    assert find_pairs(model, inputs, strict=True) == scan


@pytest.mark.parametrize("name", list(CASES))
def test_case_without_sample(name: str) -> None:
    case = CASES[name]
    model, _ = built(case)
    scan = find_pairs(model)
    expected_pairs = case.pairs if case.pairs_no_sample is None else case.pairs_no_sample
    expected_skips = case.skipped if case.skipped_no_sample is None else case.skipped_no_sample
    assert pair_list(scan) == expected_pairs
    assert skip_map(scan) == expected_skips
    assert not any(p.verified for p in scan.pairs)
    assert scan.unverified == scan.pairs
    assert [(b.bn, b.linear) for b in scan.bn_before_linear] == (
        list(case.bn_before_linear) if case.traced else []
    )


@pytest.mark.parametrize("name", list(CASES))
def test_case_strict_without_sample(name: str) -> None:
    case = CASES[name]
    model, _ = built(case)
    scan = find_pairs(model, strict=True)
    expected_pairs = case.pairs if case.pairs_no_sample is None else case.pairs_no_sample
    expected_skips = dict(
        case.skipped if case.skipped_no_sample is None else case.skipped_no_sample
    )
    expected_skips.update({bn: "unverified" for _, bn in expected_pairs})
    assert scan.pairs == ()
    assert skip_map(scan) == expected_skips
    for s in scan.skipped:
        if s.code == "unverified":
            assert (s.linear, s.bn) in expected_pairs


def test_every_code_documented_and_reasons_name_modules() -> None:
    codes = set()
    for case in CASES.values():
        model, inputs = built(case)
        for scan in (find_pairs(model, inputs), find_pairs(model, strict=True)):
            for s in scan.skipped:
                codes.add(s.code)
                assert s.code in SKIP_CODES
                assert s.bn is not None and f"'{s.bn}'" in s.reason, s.reason
                if s.linear is not None:
                    assert f"'{s.linear}'" in s.reason, s.reason
                assert "\n" not in s.reason
    # the edge cases exercise every code
    assert codes == set(SKIP_CODES)
    for code, text in SKIP_CODES.items():
        assert text.endswith(".") and text.count(". ") == 0, code


# --------------------------------------------------------------------------- folding


@pytest.mark.parametrize("name", list(CASES))
def test_folding_reported_pairs_keeps_outputs(name: str) -> None:
    case = CASES[name]
    model, inputs = built(case)
    scan = find_pairs(model, inputs)
    reference = eval64(copy.deepcopy(model).double(), inputs)
    folded = copy.deepcopy(model).double()
    for pair in scan.pairs:
        fold_linear_bn_(folded, pair.linear, pair.bn)
    assert rel_err(reference, eval64(folded, inputs)) <= SAME_RTOL


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.fold_changes], ids=lambda n: n)
def test_folding_a_skipped_pair_would_change_outputs(name: str) -> None:
    case = CASES[name]
    model, inputs = built(case)
    with_sample = find_pairs(model, inputs)
    without = find_pairs(model)
    linear_of = {s.bn: s.linear for s in with_sample.skipped}
    linear_of.update({p.bn: p.linear for p in without.pairs if not p.verified})
    reference = eval64(copy.deepcopy(model).double(), inputs)
    for bn in case.fold_changes:
        assert bn not in {p.bn for p in with_sample.pairs}
        folded = copy.deepcopy(model).double()
        fold_linear_bn_(folded, linear_of[bn], bn)
        assert rel_err(reference, eval64(folded, inputs)) > CHANGED_RTOL, bn


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.bn_before_linear])
def test_bn_before_linear_fold_math(name: str) -> None:
    case = CASES[name]
    model, inputs = built(case)
    scan = find_pairs(model, inputs)
    assert scan.bn_before_linear
    reference = eval64(copy.deepcopy(model).double(), inputs)
    folded = copy.deepcopy(model).double()
    for entry in scan.bn_before_linear:
        fold_bn_linear_(folded, entry.bn, entry.linear)
    assert rel_err(reference, eval64(folded, inputs)) <= SAME_RTOL


def test_zero_gamma_channels_fold_to_beta() -> None:
    model = edge_cases.ZeroGamma().eval()
    (pair,) = find_pairs(model, model.example_inputs()).pairs
    folded = copy.deepcopy(model).double()
    fold_linear_bn_(folded, pair.linear, pair.bn)
    zero = list(edge_cases.ZeroGamma.ZERO_CHANNELS)
    assert torch.all(folded.fc.weight[zero] == 0)
    assert torch.equal(folded.fc.bias[zero], model.bn.bias.double()[zero])


# --------------------------------------------------------------------------- records and JSON


def test_pair_record_and_json_schema() -> None:
    cases = ["BnAffineFalse", "BnMomentumNone", "LinearNoBias", "TokenWise", "TwoBlockMLP"]
    for name in cases:
        model, inputs = built(CASES[name])
        scan = find_pairs(model, inputs)
        for pair in scan.pairs:
            lin, bn = model.get_submodule(pair.linear), model.get_submodule(pair.bn)
            assert pair.to_record().to_json() == {
                "linear": pair.linear,
                "bn": pair.bn,
                "qat": pair.linear,
                "eps": bn.eps,
                "momentum": bn.momentum,
                "in_features": lin.in_features,
                "out_features": lin.out_features,
                "bias": lin.bias is not None,
                "affine": bn.affine,
            }
        data = json.loads(json.dumps(scan.to_json()))
        assert set(data) == {
            "version",
            "traced",
            "trace_error",
            "pairs",
            "skipped",
            "bn_before_linear",
            "recorded",
        }
        assert data["version"] == 1
        assert [(p["linear"], p["bn"]) for p in data["pairs"]] == pair_list(scan)
        for p in data["pairs"]:
            assert set(p) == {
                "linear",
                "bn",
                "qat",
                "eps",
                "momentum",
                "in_features",
                "out_features",
                "bias",
                "affine",
                "verified",
                "token_wise",
                "via",
            }
    momentum_none = find_pairs(edge_cases.BnMomentumNone()).pairs[0]
    assert momentum_none.momentum is None
    assert find_pairs(edge_cases.LinearNoBias()).pairs[0].bias is False
    assert find_pairs(edge_cases.BnAffineFalse()).pairs[0].affine is False
    token = find_pairs(edge_cases.TokenWise()).pairs[0]
    assert token.token_wise and token.via == ("flatten",)
    skipped = find_pairs(edge_cases.WrongAxis(), edge_cases.WrongAxis().example_inputs())
    (entry,) = skipped.to_json()["skipped"]
    assert entry["code"] == "wrong-axis" and entry["linear"] == "fc" and entry["bn"] == "bn"


def test_tensor_input_means_one_argument() -> None:
    model = edge_cases.TwoBlockMLP()
    (x,) = model.example_inputs()
    assert find_pairs(model, x) == find_pairs(model, (x,))


# --------------------------------------------------------------------------- no side effects


class WithConstant(nn.Module):
    """A plain tensor attribute: torch.fx stores it as `_tensor_constant0` on the traced root."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.offset = torch.tensor([0.5, -0.5, 1.0, 2.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x + self.offset))


class Uncopyable(WithConstant):
    """deepcopy fails (a lock): find_pairs must analyse in place and restore everything."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


@pytest.mark.parametrize("factory", [WithConstant, Uncopyable, edge_cases.ControlFlow])
def test_find_pairs_does_not_touch_the_model(factory: type[nn.Module]) -> None:
    model = factory().train()  # train mode: running the sample there would update BN stats
    inputs = (torch.randn(8, 4 if factory is not edge_cases.ControlFlow else 6),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    attrs = set(vars(model))
    for args in ((), (inputs,)):
        scan = find_pairs(model, *args)
        assert scan.pairs, scan
    assert all(m.training for m in model.modules())
    assert set(vars(model)) == attrs
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert value is tensors[key]
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_sample_is_a_data_error() -> None:
    with pytest.raises(DataError, match="sample input"):
        find_pairs(edge_cases.TwoBlockMLP(), (torch.randn(3, 7),))
    with pytest.raises(DataError, match="sample input"):
        find_pairs(edge_cases.ControlFlow(), (torch.randn(3, 7),))


# ------------------------------------------------------------- shape propagation vs ShapeProp


class TupleOutputs(nn.Module):
    """Tuple-valued nodes (chunk, a max's values and indices) and a tuple/dict model output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        a, b = self.fc(x).chunk(2, dim=1)
        top = b.max(dim=1)
        return self.bn(a), {"top": (top.values, top.indices), "b": b.double()}

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.randn(5, 6),)


class TokenTranspose(nn.Module):
    """Token-wise (N, L, C) input: Linear, BN over C through transposes, a per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(h)).sum(dim=1, keepdim=True)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.randn(3, 4, 6),)


def _shapes_and_dtypes(meta: Any) -> Any:
    """A node's ``tensor_meta`` as nested (shape, dtype) pairs: ShapeProp's and ours alike."""
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return tuple(int(d) for d in meta.shape), meta.dtype
    if isinstance(meta, (tuple, list)):
        return type(meta).__name__ == "list", tuple(_shapes_and_dtypes(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _shapes_and_dtypes(v) for k, v in meta.items()}
    return meta


_TRACED = [n for n, c in CASES.items() if c.traced]


@pytest.mark.parametrize("name", [*_TRACED, "TupleOutputs", "TokenTranspose"])
def test_shape_propagation_records_what_shapeprop_does(name: str) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    from qatconv import pairs

    model = CASES[name].model() if name in CASES else globals()[name]()
    model.eval()
    inputs = model.example_inputs()
    theirs, ours = (pairs._trace(copy.deepcopy(model)) for _ in range(2))
    with torch.no_grad():
        ShapeProp(theirs).propagate(*inputs)
    pairs._propagate_shapes(ours, inputs)
    want = {n.name: _shapes_and_dtypes(n.meta["tensor_meta"])
            for n in theirs.graph.nodes if "tensor_meta" in n.meta}
    got = {n.name: _shapes_and_dtypes(n.meta["tensor_meta"])
           for n in ours.graph.nodes if "tensor_meta" in n.meta}
    assert got == want
    assert len(want) >= 4


# --------------------------------------------------------------------------- shape ops


class ViewBetween(nn.Module):
    """`x.view(x.size(0), -1)` between Linear and BN: a no-op on 2D, provable only on a sample."""

    def __init__(self, flatten: str = "view") -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.flatten = flatten
        self.mod = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.flatten == "view":
            h = h.view(h.size(0), -1)
        elif self.flatten == "function":
            h = torch.flatten(h, 1)
        else:
            h = self.mod(h)
        return self.bn(h)


@pytest.mark.parametrize("kind", ["view", "function", "module"])
def test_order_preserving_reshape_needs_a_sample(kind: str) -> None:
    model = ViewBetween(kind).eval()
    edge_cases._seed_(model, 30)
    x = torch.randn(5, 4)
    (pair,) = find_pairs(model, (x,)).pairs
    assert pair.verified and not pair.token_wise and len(pair.via) == 1
    unproven = find_pairs(model)
    assert unproven.pairs == ()
    assert skip_map(unproven) == {"bn": "shape-op-changes-axis"}
    assert "sample" in unproven.skipped[0].reason
    folded = copy.deepcopy(model).double()
    fold_linear_bn_(folded, "fc", "bn")
    assert rel_err(eval64(copy.deepcopy(model).double(), (x,)), eval64(folded, (x,))) <= SAME_RTOL


def test_flatten_of_feature_axis_is_caught_on_a_sample() -> None:
    # (N, 2, 4) -> Linear(4, 4) -> flatten(1) -> (N, 8): BN(8) would mix tokens and features
    model = ViewBetween("function")
    model.fc, model.bn = nn.Linear(4, 4), nn.BatchNorm1d(8)
    scan = find_pairs(model, (torch.randn(3, 2, 4),))
    assert skip_map(scan) == {"bn": "shape-op-changes-axis"}


class LinearSubclass(nn.Linear):
    pass


class CustomForwardLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Hooked(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.fc, self.bn = linear, nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_linear_variants() -> None:
    x = (torch.randn(3, 4),)
    assert pair_list(find_pairs(Hooked(LinearSubclass(4, 4)), x)) == [("fc", "bn")]
    skipped = find_pairs(Hooked(CustomForwardLinear(4, 4)), x)
    assert skip_map(skipped) == {"bn": "unsupported-linear"}
    lazy = Hooked(nn.LazyLinear(4))
    assert skip_map(find_pairs(lazy, x)) == {"bn": "unsupported-linear"}
    assert isinstance(lazy.fc, nn.LazyLinear)  # the sample ran on a copy only
    hooked = Hooked(nn.Linear(4, 4))
    hooked.fc.register_forward_hook(lambda m, a, o: o)
    assert skip_map(find_pairs(hooked, x)) == {"bn": "unsupported-linear"}


class ReadsWeight(Hooked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) + self.fc.weight.sum()


def test_weight_read_by_forward_is_reuse() -> None:
    scan = find_pairs(ReadsWeight(nn.Linear(4, 4)), (torch.randn(3, 4),))
    assert skip_map(scan) == {"bn": "linear-reused"}
    assert "fc.weight" in scan.skipped[0].reason


# --------------------------------------------------------------------------- trace fallback


class UntracedReuse(nn.Module):
    """Sequential(Linear, BN) whose Linear is called again in a data-dependent forward."""

    def __init__(self, in_sequence_twice: bool = False) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
        if in_sequence_twice:
            self.again = nn.Sequential(self.seq[0])
        edge_cases._seed_(self, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.seq(x)
        if h.sum() > 0:
            h = h + 1
        return self.seq[0](h)


class UntracedWrongAxis(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x) if x.sum() > 0 else -self.seq(x)


def test_fallback_reports_untraced_and_uses_sequentials() -> None:
    model = edge_cases.ControlFlow().eval()
    inputs = model.example_inputs()
    scan = find_pairs(model, inputs)
    assert scan.traced is False
    assert scan.trace_error is not None and scan.trace_error.startswith("TraceError")
    assert "\n" not in scan.trace_error
    assert scan.to_json()["traced"] is False
    assert pair_list(scan) == [("seq.0", "seq.1")] and scan.pairs[0].verified


def test_fallback_checks_calls_on_the_sample() -> None:
    model = UntracedReuse().eval()
    x = (torch.randn(5, 6),)
    # without a sample the second call cannot be seen: the pair is only unverified
    assert [(p.linear, p.verified) for p in find_pairs(model).pairs] == [("seq.0", False)]
    assert skip_map(find_pairs(model, strict=True)) == {"seq.1": "unverified"}
    scan = find_pairs(model, x)
    assert skip_map(scan) == {"seq.1": "linear-reused"}
    folded = copy.deepcopy(model).double()
    fold_linear_bn_(folded, "seq.0", "seq.1")
    assert rel_err(eval64(copy.deepcopy(model).double(), x), eval64(folded, x)) > CHANGED_RTOL


def test_fallback_module_tree_aliases_are_reuse() -> None:
    scan = find_pairs(UntracedReuse(in_sequence_twice=True))
    assert skip_map(scan) == {"seq.1": "linear-reused"}
    assert "'again.0'" in scan.skipped[0].reason


def test_fallback_wrong_axis_on_sample() -> None:
    model = UntracedWrongAxis()
    assert skip_map(find_pairs(model, (torch.randn(4, 5, 5),))) == {"seq.1": "wrong-axis"}
    assert pair_list(find_pairs(model)) == [("seq.0", "seq.1")]
    assert pair_list(find_pairs(model, (torch.randn(4, 5),))) == [("seq.0", "seq.1")]


def test_reference_fold_matches_torch() -> None:
    # the reference fold used above agrees with torch's own eval-mode fusion
    model = edge_cases.LinearNoBias().eval()
    fused = torch.nn.utils.fusion.fuse_linear_bn_eval(
        copy.deepcopy(model.fc).double(), copy.deepcopy(model.bn).double()
    )
    mine = copy.deepcopy(model).double()
    fold_linear_bn_(mine, "fc", "bn")
    assert torch.allclose(mine.fc.weight, fused.weight, rtol=1e-12, atol=0)
    assert torch.allclose(mine.fc.bias, fused.bias, rtol=1e-12, atol=1e-15)
