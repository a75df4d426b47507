"""QatLinearBn1d against Linear -> BatchNorm1d in float64, and the fine-tune loop's schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import pair_record
from torch import nn

from qatconv.config import Loss, Mode, Optimizer, QuantConfig, TrainConfig
from qatconv.qat import (
    QatLinearBn1d,
    calibrate_,
    finetune_,
    make_qconfig,
    set_fake_quant_,
    swap_pairs_,
)

QCONFIG = make_qconfig(QuantConfig())


def _pair(in_f: int = 6, out_f: int = 5, *, bias: bool = True, affine: bool = True,
          momentum: float | None = 0.1, zero_gamma: bool = False, seed: int = 0
          ) -> tuple[nn.Linear, nn.BatchNorm1d]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    bn = nn.BatchNorm1d(out_f, affine=affine, momentum=momentum)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
        if affine:
            bn.weight.copy_(torch.randn(out_f, generator=g))
            bn.bias.copy_(torch.randn(out_f, generator=g))
            if zero_gamma:
                bn.weight[::2] = 0
        bn.running_mean.copy_(torch.randn(out_f, generator=g))
        bn.running_var.copy_(torch.rand(out_f, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(7)
    return lin, bn


def _qat64(lin: nn.Linear, bn: nn.BatchNorm1d) -> QatLinearBn1d:
    mod = QatLinearBn1d.from_pair(lin.double(), bn.double(), QCONFIG)
    set_fake_quant_(mod, fake_quant=False, observer=False)
    return mod


CASES = {
    "plain": {},
    "no-bias": {"bias": False},
    "affine-false": {"affine": False},
    "momentum-none": {"momentum": None},
    "zero-gamma": {"zero_gamma": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("train", [True, False])
def test_fake_quant_off_equals_linear_bn_in_float64(case: str, train: bool) -> None:
    lin, bn = _pair(**CASES[case])
    ref = nn.Sequential(copy.deepcopy(lin), copy.deepcopy(bn)).double()
    qat = _qat64(copy.deepcopy(lin), copy.deepcopy(bn))
    ref.train(train)
    qat.train(train)
    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), qat(x2)
    # Dividing by the per-channel scale and multiplying back costs a few float64 ulps.
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    y_ref.backward(grad)
    y.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(qat.weight.grad, ref[0].weight.grad, rtol=1e-10, atol=1e-12)
    if CASES[case].get("bias", True):
        torch.testing.assert_close(qat.bias.grad, ref[0].bias.grad, rtol=1e-10, atol=1e-12)
    if CASES[case].get("affine", True):
        torch.testing.assert_close(qat.bn.weight.grad, ref[1].weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(qat.bn.bias.grad, ref[1].bias.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(qat.bn.running_mean, ref[1].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qat.bn.running_var, ref[1].running_var, rtol=1e-12, atol=1e-12)
    assert int(qat.bn.num_batches_tracked) == int(ref[1].num_batches_tracked)


def test_zero_gamma_stays_finite_with_fake_quant_and_gives_beta() -> None:
    lin, bn = _pair(zero_gamma=True)
    qat = QatLinearBn1d.from_pair(lin, bn, QCONFIG)
    qat.train()
    x = torch.randn(32, 6)
    for _ in range(3):
        y = qat(x)
        y.sum().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(qat.bn.running_mean).all() and torch.isfinite(qat.bn.running_var).all()
    assert torch.isfinite(qat.weight_fake_quant.scale).all()
    qat.eval()
    set_fake_quant_(qat, fake_quant=True, observer=False)
    y = qat(x)  # torch's own LinearBn1d crashes here after a NaN-poisoned step
    zero = bn.weight == 0
    # Whatever the input, a gamma == 0 channel outputs exactly beta.
    assert torch.equal(y[:, zero], bn.bias[zero].expand(32, -1))


def test_from_pair_never_shares_tensors_with_the_float_modules() -> None:
    lin, bn = _pair()
    before = {k: v.clone() for k, v in {**lin.state_dict(), **bn.state_dict()}.items()}
    qat = QatLinearBn1d.from_pair(lin, bn, QCONFIG)
    qat.train()
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    qat(torch.randn(8, 6)).pow(2).sum().backward()
    opt.step()
    after = {**lin.state_dict(), **bn.state_dict()}
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_token_wise_input_is_flattened_around_the_module() -> None:
    lin, bn = _pair()
    qat = _qat64(copy.deepcopy(lin), copy.deepcopy(bn))
    qat.eval()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    ref = bn.double().eval()(lin.double()(x).flatten(0, 1)).reshape(3, 4, 5)
    torch.testing.assert_close(qat(x), ref, rtol=1e-12, atol=1e-12)


def test_affine_false_bn_params_are_fixed() -> None:
    lin, bn = _pair(affine=False)
    qat = QatLinearBn1d.from_pair(lin, bn, QCONFIG)
    assert torch.equal(qat.bn.weight, torch.ones(5)) and torch.equal(qat.bn.bias, torch.zeros(5))
    assert not qat.bn.weight.requires_grad and not qat.bn.bias.requires_grad


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        lin, bn = _pair(6, 8, seed=1)
        self.fc1, self.bn1 = lin, bn
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn1(self.fc1(x))))


def _reference_sgd(net: _Net, x: torch.Tensor, y: torch.Tensor, steps: int, bs: int,
                   lr: float, bn_at: int, seed: int) -> _Net:
    """The folded-weight QAT method written out by hand, fake quant off (float64)."""
    net = copy.deepcopy(net).double()
    params = [net.fc1.weight, net.fc1.bias, net.bn1.weight, net.bn1.bias, *net.fc2.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    perm_iter = None
    for step in range(steps):
        if perm_iter is None:
            perm = torch.randperm(len(x), generator=gen)
            perm_iter = iter([perm[i:i + bs] for i in range(0, len(x), bs) if len(perm[i:i + bs]) >= 2])
        idx = next(perm_iter, None)
        if idx is None:
            perm_iter = None
            perm = torch.randperm(len(x), generator=gen)
            perm_iter = iter([perm[i:i + bs] for i in range(0, len(x), bs) if len(perm[i:i + bs]) >= 2])
            idx = next(perm_iter)
        bn = net.bn1
        frozen = step >= bn_at
        s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        z = torch.nn.functional.linear(x[idx], net.fc1.weight * s[:, None]) / s + net.fc1.bias
        bn.train(not frozen)
        h = bn(z)
        out = net.fc2(torch.relu(h))
        loss = torch.nn.functional.mse_loss(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def test_sgd_steps_with_freeze_schedule_match_hand_written_reference() -> None:
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randn(40, 3, dtype=torch.float64)
    cfg = TrainConfig(mode=Mode.finetune, steps=12, batch_size=8, lr=0.05, loss=Loss.mse,
                      optimizer=Optimizer.sgd, freeze_bn_after=5, freeze_observers_after=0, seed=3)
    qat_net = copy.deepcopy(net).double()
    swap_pairs_(qat_net, [pair_record(qat_net, "fc1", "bn1")], QCONFIG)
    qat_net.double()
    # Fake quant off: the float64 schedule itself is what is compared.
    import qatconv.qat as q

    orig = q.set_fake_quant_
    q.set_fake_quant_ = lambda m, **k: orig(m, fake_quant=False, observer=False)
    try:
        finetune_(qat_net, None, x, y, cfg)
    finally:
        q.set_fake_quant_ = orig
    ref = _reference_sgd(net, x, y, 12, 8, 0.05, 5, 3)
    m = qat_net.fc1
    torch.testing.assert_close(m.weight, ref.fc1.weight, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.bias, ref.fc1.bias, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.bn.weight, ref.bn1.weight, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.bn.running_mean, ref.bn1.running_mean, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.bn.running_var, ref.bn1.running_var, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(qat_net.fc2.weight, ref.fc2.weight, rtol=1e-9, atol=1e-11)


def test_recalibrate_bn_is_the_exact_average_over_the_data() -> None:
    net = _Net()
    x = torch.randn(50, 6)
    qat_net = copy.deepcopy(net)
    swap_pairs_(qat_net, [pair_record(qat_net, "fc1", "bn1")], QCONFIG)
    calibrate_(qat_net, x, batch_size=16, recalibrate_bn=True)
    z = net.fc1(x).double()
    torch.testing.assert_close(qat_net.fc1.bn.running_mean.double(), z.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qat_net.fc1.bn.running_var.double(), z.var(0), rtol=1e-5, atol=1e-6)


def test_quant_range_per_backend_and_bits() -> None:
    from qatconv.config import Backend

    assert QuantConfig(Backend.x86, 8).quant_range == (-128, 127)
    assert QuantConfig(Backend.fbgemm, 4).quant_range == (-8, 7)
    assert QuantConfig(Backend.qnnpack, 8).quant_range == (-127, 127)
    assert QuantConfig(Backend.x86, 2).quant_range == (-2, 1)
