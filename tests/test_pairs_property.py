"""Property: on random small models, folding exactly what find_pairs reports keeps eval outputs,
and every skipped pair either would change them or cannot be folded / proven at all.

Models come from a grammar of blocks: Linear+BN pairs, residual adds (around the pair or on the
Linear's output), branches, a Linear called twice, a shared BN, an aliased Linear, Linear->act->BN,
BN->Linear, token-wise blocks (flatten / reshape), and L == C traps on (N, L, C) tensors (a BN
right after the Linear, or after transpose + reshape). The grammar also knows which code each BN
must get, so the report is compared exactly.

QATCONV_HYPOTHESIS_MAX sets the number of examples (default 25).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import fold_into_model_
from torch import nn

from qatconv.pairs import SKIP_CODES, find_pairs
from sample_models.edge_cases import _seed_

MAX_EXAMPLES = int(os.environ.get("QATCONV_HYPOTHESIS_MAX", "25"))
SAME_RTOL = 1e-5  # float64 throughout: a correct fold differs by rounding only (~1e-15)
CHANGED_RTOL = 1e-7  # a wrong fold with random stats differs by orders of magnitude more

FLAT_KINDS = (
    "pair", "residual_in", "residual_out", "branch", "twice", "shared_bn", "alias",
    "act_between", "bn_first",
)  # fmt: skip
TOKEN_KINDS = ("token_pair", "token_direct", "transpose", "to_flat")


@dataclass(frozen=True)
class Block:
    kind: str
    w_in: int
    w_out: int
    seq_len: int  # L in token mode, else 0
    bias: bool = True
    affine: bool = True
    momentum_none: bool = False
    track: bool = True
    zero_gamma: bool = False
    reshape: str = "flatten"  # token_pair: flatten | reshape_int | reshape_size


@dataclass(frozen=True)
class Spec:
    token: bool
    seq_len: int
    width: int
    blocks: tuple[Block, ...]
    seed: int

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.seq_len, self.width) if self.token else (4, self.width)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    token = draw(st.booleans())
    seq_len = draw(st.integers(2, 4)) if token else 0
    width = draw(st.integers(2, 6))
    w, mode = width, "token" if token else "flat"
    blocks = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(TOKEN_KINDS if mode == "token" else FLAT_KINDS))
        if kind in ("residual_in", "residual_out", "twice", "to_flat"):
            w_out = w
        elif kind == "transpose":
            w_out = seq_len
        elif kind == "token_direct":  # the L == C trap half of the time
            w_out = draw(st.one_of(st.just(seq_len), st.integers(2, 6)))
        else:
            w_out = draw(st.integers(2, 6))
        blocks.append(
            Block(
                kind,
                w,
                w_out,
                seq_len if mode == "token" else 0,
                bias=draw(st.booleans()),
                affine=draw(st.booleans()),
                momentum_none=draw(st.booleans()),
                track=draw(st.sampled_from([True, True, True, False])),
                zero_gamma=draw(st.booleans()),
                reshape=draw(st.sampled_from(["flatten", "reshape_int", "reshape_size"])),
            )
        )
        w = w_out
        if kind == "to_flat":
            mode = "flat"
    return Spec(token, seq_len, width, tuple(blocks), draw(st.integers(0, 2**16)))


class RandomNet(nn.Module):
    """Interprets a Spec; torch.fx unrolls the Python loop into a plain graph."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        for i, b in enumerate(spec.blocks):
            if b.kind == "to_flat":
                continue
            bn_width = b.seq_len if b.kind == "token_direct" else b.w_out
            if b.kind == "bn_first":
                bn_width = b.w_in
            setattr(self, f"b{i}_fc", nn.Linear(b.w_in, b.w_out, bias=b.bias))
            setattr(self, f"b{i}_bn", self._bn(b, bn_width))
            if b.kind in ("branch", "shared_bn"):
                setattr(self, f"b{i}_fc2", nn.Linear(b.w_in, b.w_out, bias=b.bias))
            if b.kind == "branch":
                setattr(self, f"b{i}_bn2", self._bn(b, bn_width))
            if b.kind == "alias":
                setattr(self, f"b{i}_alias", getattr(self, f"b{i}_fc"))
        width = spec.blocks[-1].w_out
        self.head = nn.Linear(width, 3)
        _seed_(self, spec.seed)
        with torch.no_grad():
            for i, b in enumerate(spec.blocks):
                for name in (f"b{i}_bn", f"b{i}_bn2"):
                    bn = getattr(self, name, None)
                    if bn is not None and b.zero_gamma and bn.affine:
                        bn.weight[0] = 0.0

    @staticmethod
    def _bn(b: Block, width: int) -> nn.BatchNorm1d:
        return nn.BatchNorm1d(
            width,
            affine=b.affine,
            momentum=None if b.momentum_none else 0.1,
            track_running_stats=b.track,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, b in enumerate(self.spec.blocks):
            h = self._block(i, b, h)
        return self.head(h)

    def _block(self, i: int, b: Block, h: torch.Tensor) -> torch.Tensor:
        fc, bn = getattr(self, f"b{i}_fc", None), getattr(self, f"b{i}_bn", None)
        k = b.kind
        if k in ("pair", "alias"):
            return torch.tanh(bn(fc(h)))
        if k == "residual_in":
            return torch.tanh(bn(fc(h))) + h
        if k == "residual_out":
            a = fc(h)
            return torch.tanh(bn(a)) + a
        if k == "branch":
            return torch.tanh(bn(fc(h))) + torch.tanh(self.get_submodule(f"b{i}_bn2")(
                self.get_submodule(f"b{i}_fc2")(h)))  # fmt: skip
        if k == "twice":
            return torch.tanh(fc(torch.tanh(bn(fc(h)))))
        if k == "shared_bn":
            return torch.tanh(bn(fc(h)) + bn(self.get_submodule(f"b{i}_fc2")(h)))
        if k == "act_between":
            return bn(torch.tanh(fc(h)))
        if k == "bn_first":
            return torch.tanh(fc(bn(h)))
        if k == "to_flat":
            return h.mean(1)
        n, seq = h.shape[0], h.shape[1]
        if k == "token_pair":
            a = fc(h)
            if b.reshape == "flatten":
                flat = a.flatten(0, 1)
            elif b.reshape == "reshape_int":
                flat = a.reshape(-1, b.w_out)
            else:
                flat = a.reshape(-1, a.size(-1))
            return torch.tanh(bn(flat).view(n, seq, -1))
        if k == "token_direct":
            return torch.tanh(bn(fc(h)))
        if k == "transpose":
            a = fc(h).transpose(1, 2).reshape(-1, b.w_out)
            return torch.tanh(bn(a).reshape(n, seq, -1))
        raise AssertionError(k)


@dataclass
class Expected:
    pairs: list[tuple[str, str]]  # with a sample
    skipped: dict[str, tuple[str, str | None]]  # bn -> (code, linear), with a sample
    traps: list[tuple[str, str]]  # wrong-axis with a sample, unverified pairs without
    changes: set[str]  # bn paths whose forced fold must change the outputs
    bn_before: list[tuple[str, str]]  # (bn, linear) that must be listed


def expected_report(spec: Spec) -> Expected:
    e = Expected([], {}, [], set(), [])
    for i, b in enumerate(spec.blocks):
        fc, bn = f"b{i}_fc", f"b{i}_bn"
        k = b.kind
        if k == "to_flat":
            continue
        if k in ("act_between", "bn_first"):
            e.skipped[bn] = ("not-adjacent", None)
            if k == "bn_first" and b.track:
                e.bn_before.append((bn, fc))
            continue
        structural = {
            "transpose": "shape-op-changes-axis",
            "twice": "linear-reused",
            "alias": "linear-reused",
            "shared_bn": "bn-reused",
            "residual_out": "multiple-users",
        }.get(k)
        if structural:
            e.skipped[bn] = (structural, fc)
            if b.track and k != "alias":  # an alias is called once: folding is bookkeeping-unsafe
                e.changes.add(bn)
            continue
        names = [(fc, bn)] + ([(f"b{i}_fc2", f"b{i}_bn2")] if k == "branch" else [])
        for lin, norm in names:
            if not b.track:
                e.skipped[norm] = ("no-running-stats", lin)
            elif k == "token_direct" and b.w_out != b.seq_len:
                e.skipped[norm] = ("feature-mismatch", lin)
            elif k == "token_direct":
                e.skipped[norm] = ("wrong-axis", lin)
                e.traps.append((lin, norm))
                e.changes.add(norm)
            else:
                e.pairs.append((lin, norm))
    return e


def fold_(model: nn.Module, linear: str, bn: str) -> None:
    """Reference fold in float64 (in place, so tied uses see it); the BN becomes Identity."""
    fold_into_model_(model, linear, bn)


def fold_bn_first_(model: nn.Module, bn: str, linear: str) -> None:
    fold_into_model_(model, bn, linear)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=specs())
def test_folding_reported_pairs_is_exact_and_skips_are_justified(spec: Spec) -> None:
    model = RandomNet(spec).double().eval()
    g = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(spec.input_shape(), generator=g, dtype=torch.float64)
    reference = run(model, x)
    want = expected_report(spec)

    scan = find_pairs(model, (x,))
    assert scan.traced
    assert [(p.linear, p.bn) for p in scan.pairs] == want.pairs
    assert {s.bn: (s.code, s.linear) for s in scan.skipped} == want.skipped
    assert all(p.verified for p in scan.pairs)
    assert all(s.code in SKIP_CODES for s in scan.skipped)

    # folding exactly the reported pairs keeps the outputs
    folded = copy.deepcopy(model)
    for pair in scan.pairs:
        fold_(folded, pair.linear, pair.bn)
    assert rel_err(reference, run(folded, x)) <= SAME_RTOL

    # every skipped pair that could be folded at all would change the outputs
    for s in scan.skipped:
        if s.bn in want.changes:
            forced = copy.deepcopy(model)
            assert s.linear is not None
            fold_(forced, s.linear, s.bn)
            assert rel_err(reference, run(forced, x)) > CHANGED_RTOL, s
        else:  # unprovable: nothing to fold into, or an alias (called once) only
            bn = model.get_submodule(s.bn)
            foldable = (
                s.linear is not None
                and bn.track_running_stats
                and bn.num_features == model.get_submodule(s.linear).out_features
            )
            assert not foldable or s.code == "linear-reused" and "reachable as" in s.reason, s

    # BN -> Linear entries fold into the Linear's input side exactly
    assert set(want.bn_before) <= {(b.bn, b.linear) for b in scan.bn_before_linear}
    for entry in scan.bn_before_linear:
        single = copy.deepcopy(model)
        fold_bn_first_(single, entry.bn, entry.linear)
        assert rel_err(reference, run(single, x)) <= SAME_RTOL, entry

    # without a sample the L == C traps cannot be seen: they come back as unverified pairs
    blind = find_pairs(model)
    assert sorted((p.linear, p.bn) for p in blind.pairs) == sorted(want.pairs + want.traps)
    assert not any(p.verified for p in blind.pairs)
    strict = find_pairs(model, strict=True)
    assert strict.pairs == ()
    unverified = {s.bn for s in strict.skipped if s.code == "unverified"}
    assert unverified == {bn for _, bn in want.pairs + want.traps}
