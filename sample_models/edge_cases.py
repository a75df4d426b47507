"""Tiny models, one per Linear/BatchNorm1d edge case, with what `find_pairs` must say about them.

Every model is deterministic (weights, BN statistics and inputs come from a seeded generator)
and has non-trivial BN running statistics, so a wrong fold shows in the outputs. Each has
`example_inputs()` returning a tuple of small tensors.

`CASES` maps a name to a `Case`: the model class, the pairs `[(linear, bn)]` that fold when a
sample is given, the skipped BatchNorms `{bn path: code}` with a sample, what changes without
a sample (`None`: the same), BatchNorm1d -> Linear candidates, and the BN paths whose forced
fold (the pair skipped, or unverified) changes the eval outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CASES", "Case"]


def _seed_(model: nn.Module, seed: int) -> None:
    """Overwrite every Linear and BatchNorm tensor with draws from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                fan_in = m.weight.shape[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            elif isinstance(m, _BatchNorm):
                n = m.num_features
                if m.running_mean is not None and m.running_var is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.8)
                    m.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.2)
                if m.affine:
                    m.weight.copy_(1.0 + 0.5 * torch.randn(n, generator=g))
                    m.bias.copy_(0.5 * torch.randn(n, generator=g))


class _Tiny(nn.Module):
    """Base: `example_inputs()` draws one tensor of shape INPUT_SHAPE from a fixed seed."""

    INPUT_SHAPE: tuple[int, ...] = (5, 6)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1234)
        return (torch.randn(self.INPUT_SHAPE, generator=g),)


class TwoBlockMLP(_Tiny):
    """Healthy: Linear-BN-ReLU twice, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        _seed_(self, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(x)


class LinearCalledTwice(_Tiny):
    """One Linear at two call sites; only the first is followed by the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        _seed_(self, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.fc(x)))
        h = torch.relu(self.fc(h))
        return self.head(h)


class LinearTwoUsers(_Tiny):
    """The Linear's output feeds the BN and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        _seed_(self, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.head(torch.relu(self.bn(h)) + h)


class BnAffineFalse(_Tiny):
    """BatchNorm1d(affine=False): gamma = 1, beta = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False)
        self.head = nn.Linear(8, 3)
        _seed_(self, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class BnNoRunningStats(_Tiny):
    """track_running_stats=False: eval uses batch statistics, nothing to fold."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8, track_running_stats=False)
        self.head = nn.Linear(8, 3)
        _seed_(self, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class BnMomentumNone(_Tiny):
    """momentum=None (cumulative average); folds like any other BN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None)
        self.head = nn.Linear(8, 3)
        _seed_(self, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class LinearNoBias(_Tiny):
    """Linear(bias=False) followed by a BN: the fold creates a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        _seed_(self, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class ZeroGamma(_Tiny):
    """Some BN channels have gamma == 0: their output is beta whatever the input."""

    ZERO_CHANNELS = (0, 3, 6)

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        _seed_(self, 8)
        with torch.no_grad():
            self.bn.weight[list(self.ZERO_CHANNELS)] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class WrongAxis(_Tiny):
    """Linear on (N, L, C) with L == C, then BatchNorm1d(C): the BN normalizes L, not C."""

    INPUT_SHAPE = (4, 5, 5)

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
        _seed_(self, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class TokenWise(_Tiny):
    """Token-wise block: Linear -> flatten(0, 1) -> BatchNorm1d -> reshape to (N, L, C)."""

    INPUT_SHAPE = (3, 4, 6)

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        _seed_(self, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(x).flatten(0, 1)).reshape(x.shape[0], x.shape[1], -1)
        return self.head(torch.relu(h))


class TokenWiseReshape(_Tiny):
    """Token-wise block written with reshape(-1, h.shape[-1]); the shape query is no user."""

    INPUT_SHAPE = (3, 4, 6)

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        _seed_(self, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = self.bn(h.reshape(-1, h.shape[-1])).view(x.shape[0], x.shape[1], -1)
        return self.head(torch.relu(h))


class BnBeforeLinear(_Tiny):
    """BatchNorm1d on the input, then a Linear: nothing to fold backwards, but a BN -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc, self.head = nn.BatchNorm1d(6), nn.Linear(6, 8), nn.Linear(8, 3)
        _seed_(self, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.bn(x))))


class NotAdjacent(_Tiny):
    """Linear -> ReLU -> BatchNorm1d: the BN sees the ReLU's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        _seed_(self, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(torch.relu(self.fc(x))))


class FeatureMismatch(_Tiny):
    """Linear(5 -> 4) on (N, 6, 5) then BatchNorm1d(6): the BN normalizes the 6 tokens."""

    INPUT_SHAPE = (3, 6, 5)

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(5, 4), nn.BatchNorm1d(6), nn.Linear(4, 3)
        _seed_(self, 14)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc(x)))


class UnsupportedBn(_Tiny):
    """SyncBatchNorm after a Linear: not exactly BatchNorm1d, LinearBn1d cannot take it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.SyncBatchNorm(8), nn.Linear(8, 3)
        _seed_(self, 15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: its output is not x @ W.T + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class UnsupportedLinear(_Tiny):
    """A Linear subclass overriding forward, then a BN: the fold math would not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = ScaledLinear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        _seed_(self, 21)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class TransposeTrap(_Tiny):
    """Linear on (N, L, C), L == C, transpose(1, 2).reshape(-1, C), BN: BN normalizes L.

    The BN's input is 2D with C columns, so only the static rule (transpose moves the
    feature axis) catches it.
    """

    INPUT_SHAPE = (3, 4, 4)

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)
        _seed_(self, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x).transpose(1, 2).reshape(-1, 4)
        h = self.bn(h).reshape(x.shape[0], 4, 4)
        return self.head(h)


class SharedBn(_Tiny):
    """One BatchNorm1d called after two different Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(6, 8)
        self.bn, self.head = nn.BatchNorm1d(8), nn.Linear(8, 3)
        _seed_(self, 17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc1(x)) + self.bn(self.fc2(x)))


class AliasedLinear(_Tiny):
    """The Linear is reachable under two names (`fc` and `alias`), called once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.alias = self.fc
        _seed_(self, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class TiedWeight(_Tiny):
    """The Linear's weight is tied to another Linear's (`out.weight is fc.weight`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 6)
        _seed_(self, 19)
        self.out.weight = self.fc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


class ControlFlow(_Tiny):
    """Tensor-dependent control flow: torch.fx cannot trace it; with a sample an eager run is
    recorded, without one nn.Sequential order is used."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.tail = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.BatchNorm1d(8))
        self.extra_bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        _seed_(self, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.seq(x)
        if h.sum() > 0:  # data-dependent branch: symbolic tracing fails here
            h = h * 0.5
        return self.head(self.extra_bn(self.tail(h)))


class Case(NamedTuple):
    """What `find_pairs` must report for one model (module paths as in named_modules())."""

    model: type[nn.Module]
    pairs: list[tuple[str, str]]  # (linear, bn) that fold with example inputs (verified)
    skipped: dict[str, str]  # bn path -> skip code, with example inputs
    pairs_no_sample: list[tuple[str, str]] | None = None  # None: same as `pairs` (unverified)
    skipped_no_sample: dict[str, str] | None = None  # None: same as `skipped`
    bn_before_linear: tuple[tuple[str, str], ...] = ()  # (bn, linear)
    fold_changes: tuple[str, ...] = ()  # bn paths whose forced fold changes eval outputs
    traced: bool = True


CASES: dict[str, Case] = {
    "TwoBlockMLP": Case(TwoBlockMLP, [("fc1", "bn1"), ("fc2", "bn2")], {}),
    "LinearCalledTwice": Case(LinearCalledTwice, [], {"bn": "linear-reused"}, fold_changes=("bn",)),
    "LinearTwoUsers": Case(LinearTwoUsers, [], {"bn": "multiple-users"}, fold_changes=("bn",)),
    "BnAffineFalse": Case(BnAffineFalse, [("fc", "bn")], {}),
    "BnNoRunningStats": Case(BnNoRunningStats, [], {"bn": "no-running-stats"}),
    "BnMomentumNone": Case(BnMomentumNone, [("fc", "bn")], {}),
    "LinearNoBias": Case(LinearNoBias, [("fc", "bn")], {}),
    "ZeroGamma": Case(ZeroGamma, [("fc", "bn")], {}),
    "WrongAxis": Case(
        WrongAxis,
        [],
        {"bn": "wrong-axis"},
        pairs_no_sample=[("fc", "bn")],
        skipped_no_sample={},
        fold_changes=("bn",),
    ),
    "TokenWise": Case(TokenWise, [("fc", "bn")], {}),
    "TokenWiseReshape": Case(TokenWiseReshape, [("fc", "bn")], {}),
    "BnBeforeLinear": Case(
        BnBeforeLinear, [], {"bn": "not-adjacent"}, bn_before_linear=(("bn", "fc"),)
    ),
    "NotAdjacent": Case(
        NotAdjacent, [], {"bn": "not-adjacent"}, bn_before_linear=(("bn", "head"),)
    ),
    "FeatureMismatch": Case(FeatureMismatch, [], {"bn": "feature-mismatch"}),
    "UnsupportedBn": Case(UnsupportedBn, [], {"bn": "unsupported-bn"}),
    "UnsupportedLinear": Case(
        UnsupportedLinear, [], {"bn": "unsupported-linear"}, fold_changes=("bn",)
    ),
    "TransposeTrap": Case(TransposeTrap, [], {"bn": "shape-op-changes-axis"}, fold_changes=("bn",)),
    "SharedBn": Case(SharedBn, [], {"bn": "bn-reused"}, fold_changes=("bn",)),
    "AliasedLinear": Case(AliasedLinear, [], {"bn": "linear-reused"}),
    "TiedWeight": Case(TiedWeight, [], {"bn": "linear-reused"}, fold_changes=("bn",)),
    "ControlFlow": Case(
        ControlFlow,
        [("seq.0", "seq.1")],
        # With a sample the recorded eager run shows extra_bn is fed by tail.2, a BatchNorm.
        {"tail.2": "not-adjacent", "extra_bn": "not-adjacent"},
        skipped_no_sample={"tail.2": "not-adjacent", "extra_bn": "untraced"},
        bn_before_linear=(("extra_bn", "head"),),
        traced=False,
    ),
}
