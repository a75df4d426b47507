"""qatconv's float32 fake quant (`_FakeQuantSTE`, `_FastFakeQuantize`) against torch's own ops
and `FakeQuantize`, bit for bit: outputs, straight-through gradients, observed qparams."""

from __future__ import annotations

import pytest
import torch

from qatconv.qat import _FakeQuantize, _FakeQuantSTE, _FastFakeQuantize, _PerChannelObserver

RANGES = [(-128, 127), (-127, 127), (0, 127), (0, 255)]


def _data(rows: int, cols: int, scale: torch.Tensor, seed: int) -> torch.Tensor:
    """Random values, a block exactly on rounding ties (k + 0.5 steps) and a block beyond the
    representable range, so rounding, clamping and the gradient mask are all exercised."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * scale.reshape(-1, 1) * 60
    ties = torch.randint(-300, 300, (rows, cols // 4), generator=g).float() + 0.5
    x[:, : cols // 4] = ties * scale.reshape(-1, 1)
    x[:, -4:] *= 40  # far out of range
    return x


def _torch_grad(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(g)
    assert leaf.grad is not None
    return out.detach(), leaf.grad


@pytest.mark.parametrize("qmin, qmax", RANGES)
@pytest.mark.parametrize("shifted", [False, True])
def test_per_channel_matches_torch_bit_for_bit(qmin: int, qmax: int, shifted: bool) -> None:
    rows, cols = 64, 96
    scale = torch.rand(rows, generator=torch.Generator().manual_seed(1)) * 0.05 + 1e-3
    zero_point = torch.zeros(rows, dtype=torch.int32)
    if shifted:
        zero_point = torch.randint(qmin, qmax + 1, (rows,),
                                   generator=torch.Generator().manual_seed(2)).to(torch.int32)
    x = _data(rows, cols, scale, seed=qmax)
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    ref, ref_grad = _torch_grad(
        lambda t: torch.fake_quantize_per_channel_affine(t, scale, zero_point, 0, qmin, qmax),
        x, g)  # fmt: skip
    got, got_grad = _torch_grad(
        lambda t: _FakeQuantSTE.apply(t, scale.unsqueeze(1), zero_point.unsqueeze(1).float(),
                                      qmin, qmax),
        x, g)  # fmt: skip
    assert torch.equal(got, ref)
    assert torch.equal(got_grad, ref_grad)
    assert 0 < int((ref_grad == 0).sum()) < ref_grad.numel()  # the mask was exercised


@pytest.mark.parametrize("qmin, qmax", RANGES)
@pytest.mark.parametrize("zero_point", [0, 3, 100])
def test_per_tensor_matches_torch_bit_for_bit(qmin: int, qmax: int, zero_point: int) -> None:
    zero_point = min(max(zero_point, qmin), qmax)
    scale = torch.tensor([0.0371])
    zp = torch.tensor([zero_point], dtype=torch.int32)
    x = _data(32, 80, scale.expand(32), seed=zero_point)
    g = torch.randn(32, 80, generator=torch.Generator().manual_seed(4))
    ref, ref_grad = _torch_grad(
        lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, qmin, qmax), x, g)
    got, got_grad = _torch_grad(
        lambda t: _FakeQuantSTE.apply(t, scale, zp.float(), qmin, qmax), x, g)
    assert torch.equal(got, ref)
    assert torch.equal(got_grad, ref_grad)


def _weight_fq(cls: type, qmin: int, qmax: int) -> torch.nn.Module:
    return cls(observer=_PerChannelObserver, quant_min=qmin, quant_max=qmax, dtype=torch.qint8,
               qscheme=torch.per_channel_symmetric, averaging_constant=1.0)  # fmt: skip


@pytest.mark.parametrize("qmin, qmax", [(-128, 127), (-127, 127)])
def test_module_matches_torch_fake_quantize_over_steps(qmin: int, qmax: int) -> None:
    """Observer on for three changing weights, then off: the same qparams, outputs, gradients
    and state dict as torch's `FakeQuantize` with the same arguments."""
    ours, ref = _weight_fq(_FastFakeQuantize, qmin, qmax), _weight_fq(_FakeQuantize, qmin, qmax)
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        if step == 3:
            ours.disable_observer()
            ref.disable_observer()
        w = torch.randn(48, 40, generator=gen) * (step + 1)
        g = torch.randn(48, 40, generator=gen)
        ref_out, ref_grad = _torch_grad(ref, w, g)
        got_out, got_grad = _torch_grad(ours, w, g)
        assert torch.equal(got_out, ref_out)
        assert torch.equal(got_grad, ref_grad)
        assert torch.equal(ours.scale, ref.scale)
        assert torch.equal(ours.zero_point, ref.zero_point)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_module_falls_back_to_torch_for_other_dtypes() -> None:
    """float64 (the tests' exact runs) goes through torch's op and still observes."""
    ours, ref = _weight_fq(_FastFakeQuantize, -128, 127), _weight_fq(_FakeQuantize, -128, 127)
    w = torch.randn(8, 5, dtype=torch.float64)
    assert torch.equal(ours(w), ref(w))
    assert ours(w).dtype == torch.float64
    assert torch.equal(ours.scale, ref.scale)


def test_fake_quant_off_is_identity_but_observes() -> None:
    ours, ref = _weight_fq(_FastFakeQuantize, -128, 127), _weight_fq(_FakeQuantize, -128, 127)
    ours.disable_fake_quant()
    ref.disable_fake_quant()
    w = torch.randn(6, 7)
    assert torch.equal(ours(w), w)
    ref(w)
    assert torch.equal(ours.scale, ref.scale)
    assert bool(ours.fake_quant_enabled[0] == 0)
