"""qatconv.optim against torch.optim, bit for bit: `FusedAdam` vs ``Adam(fused=True)``,
`MomentumSGD` vs ``SGD(momentum=0.9)``, and the fallbacks to torch.optim.

Whether building and stepping them imports torch._dynamo is checked in tests/test_import_cost.py
(a fresh interpreter: this one may have imported it already).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from qatconv import optim
from qatconv.config import Loss, Mode, Optimizer, QuantConfig, TrainConfig


class _Net(nn.Module):
    """Linear + BN + Linear, and a parameter no loss reaches (its grad stays None: skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.unused = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _train(net: nn.Module, make: Callable[[list[nn.Parameter]], Any], dtype: torch.dtype,
           steps: int = 25) -> list[torch.Tensor]:
    """``steps`` MSE steps on fixed random batches; the parameters afterwards."""
    net = copy.deepcopy(net).to(dtype)
    opt = make(list(net.parameters()))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g).to(dtype)
        y = torch.randn(16, 3, generator=g).to(dtype)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _net() -> _Net:
    torch.manual_seed(0)
    net = _Net()
    assert next(net.parameters()) is net.unused  # the tests below index parameters() this way
    return net


def _assert_bit_identical(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_is_torch_fused_adam_bit_for_bit(dtype: torch.dtype) -> None:
    net = _net()
    assert isinstance(optim.adam(list(net.parameters()), 1e-2), optim.FusedAdam)
    got = _train(net, lambda ps: optim.adam(ps, 1e-2), dtype)
    want = _train(net, lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), dtype)
    _assert_bit_identical(got, want)
    assert torch.equal(got[0], torch.ones(4, dtype=dtype))  # `unused`: no gradient, no update
    assert not torch.equal(got[1], _net().fc1.weight.to(dtype))  # it did train


def test_sgd_is_torch_momentum_sgd_bit_for_bit() -> None:
    net = _net()
    assert isinstance(optim.sgd(list(net.parameters()), 0.05, 0.9), optim.MomentumSGD)
    got = _train(net, lambda ps: optim.sgd(ps, 0.05, 0.9), torch.float32)
    want = _train(net, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), torch.float32)
    _assert_bit_identical(got, want)
    assert not torch.equal(got[1], _net().fc1.weight)


def test_zero_grad_without_set_to_none_zeroes_like_torch() -> None:
    net = _net()
    mine = optim.adam(list(net.parameters()), 1e-2)
    nn.functional.mse_loss(net(torch.randn(4, 6)), torch.zeros(4, 3)).backward()
    mine.zero_grad(set_to_none=False)
    assert net.fc1.weight.grad is not None and not net.fc1.weight.grad.any()
    assert net.unused.grad is None


def _refusing(*args: object, **kwargs: object) -> None:
    raise RuntimeError("_fused_adam_ not implemented for this device or dtype")


@pytest.mark.parametrize("how", ["refuses", "missing"])
def test_adam_falls_back_to_torch_plain_adam(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "refuses":
        monkeypatch.setattr(torch, "_fused_adam_", _refusing)
    else:
        monkeypatch.delattr(torch, "_fused_adam_")
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = optim.adam(list(net.parameters()), 1e-2)
    assert type(opt) is torch.optim.Adam and not opt.defaults["fused"]
    _assert_bit_identical([p.detach() for p in net.parameters()], before)  # the probe touched none
    got = _train(net, lambda ps: optim.adam(ps, 1e-2), torch.float32)
    want = _train(net, lambda ps: torch.optim.Adam(ps, lr=1e-2), torch.float32)
    _assert_bit_identical(got, want)


def test_sgd_off_the_cpu_is_torch_sgd() -> None:
    params = [nn.Parameter(torch.zeros(3, device="meta"))]
    opt = optim.sgd(params, 0.1, 0.9)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9


def test_an_empty_parameter_list_is_refused_as_torch_refuses_it() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.adam([], 1e-3)
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam([], lr=1e-3)


@pytest.mark.parametrize("which", [Optimizer.adam, Optimizer.sgd])
def test_finetune_trains_as_with_torch_optim(monkeypatch: pytest.MonkeyPatch,
                                             which: Optimizer) -> None:
    """The fine-tune loop (fake quant, freeze schedule) with qatconv.optim and with torch.optim:
    every tensor of the QAT model equal afterwards."""
    from reference import pair_record

    from qatconv.qat import finetune_, make_qconfig, swap_pairs_

    base = _net()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 6, generator=g), torch.randn(64, 3, generator=g)
    cfg = TrainConfig(mode=Mode.finetune, steps=15, batch_size=16, lr=0.01, loss=Loss.mse,
                      optimizer=which, freeze_bn_after=8, freeze_observers_after=10, seed=3)

    def run() -> dict[str, torch.Tensor]:
        net = copy.deepcopy(base)
        swap_pairs_(net, [pair_record(net, "fc1", "bn")], make_qconfig(QuantConfig()))
        finetune_(net, None, x, y, cfg)
        return net.state_dict()

    got = run()
    monkeypatch.setattr(optim, "adam", lambda ps, lr: torch.optim.Adam(ps, lr=lr, fused=True))
    monkeypatch.setattr(optim, "sgd", lambda ps, lr, momentum: torch.optim.SGD(
        ps, lr=lr, momentum=momentum))
    want = run()
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k
    assert not torch.equal(got["fc2.weight"], base.fc2.weight)
