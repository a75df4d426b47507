"""Static W8A8 in the QAT model: the input fake quant against hand-written references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import fold_modules64, pair_record
from torch import nn

from qatconv.config import (
    ACTIVATION_SCHEMES,
    Activations,
    Backend,
    Mode,
    QuantConfig,
    QuantScheme,
    TrainConfig,
)
from qatconv.pair_record import PairRecord
from qatconv.qat import (
    calibrate_,
    finetune_,
    input_fake_quants,
    make_input_fake_quant,
    make_qconfig,
    qat_modules,
    set_fake_quant_,
    swap_pairs_,
)

X86 = QuantConfig(Backend.x86)


def _hand_qparams(lo: float, hi: float, qmin: int, qmax: int) -> tuple[np.float32, int]:
    """Affine per-tensor qparams from a min/max, as the textbook (and torch) defines them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range always holds 0.0
    scale = np.float32(np.float32(hi) - np.float32(lo)) / np.float32(qmax - qmin)
    scale = max(scale, np.finfo(np.float32).eps)
    zp = int(np.clip(qmin - round(float(np.float32(lo) / scale)), qmin, qmax))
    return np.float32(scale), zp


def _hand_fake_quant(x: np.ndarray, scale: np.float32, zp: int, qmin: int, qmax: int) -> np.ndarray:
    inv = np.float32(1) / scale  # torch multiplies by the float32 reciprocal
    q = np.clip(np.rint(x.astype(np.float32) * inv) + zp, qmin, qmax)
    return ((q - zp) * np.float64(scale)).astype(np.float32)


@pytest.mark.parametrize("backend", list(Backend))
@pytest.mark.parametrize("shift", [0.0, 3.0])  # 3.0: all inputs positive (post-ReLU like)
def test_input_fake_quant_equals_hand_written_quantize_dequantize(
    backend: Backend, shift: float
) -> None:
    scheme = ACTIVATION_SCHEMES[backend]
    fq = make_input_fake_quant(scheme)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 8, generator=g) * 2 + shift for _ in range(3)]
    fq.disable_fake_quant()
    fq.activation_post_process.exact = True
    for b in batches:
        fq(b)
    fq.activation_post_process.exact = False
    fq.enable_fake_quant()
    fq.disable_observer()
    allx = torch.cat(batches)
    scale, zp = _hand_qparams(float(allx.min()), float(allx.max()), scheme.quant_min,
                              scheme.quant_max)
    assert float(fq.scale) == scale and int(fq.zero_point) == zp
    x = torch.cat([allx, torch.zeros(1, 8), 10 * allx[:2]])  # zeros, and saturating values
    got = fq(x).numpy()
    want = _hand_fake_quant(x.numpy(), scale, zp, scheme.quant_min, scheme.quant_max)
    np.testing.assert_array_equal(got, want)
    assert (got[-3] == 0).all()  # 0.0 is exactly representable


class _TwoPairs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 4), nn.BatchNorm1d(4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


PAIRS = [("fc1", "bn1"), ("fc2", "bn2")]


def _w8a8(model: nn.Module, quant: QuantConfig = X86) -> nn.Module:
    qat = copy.deepcopy(model)
    swap_pairs_(qat, [pair_record(qat, lin, bn) for lin, bn in PAIRS], make_qconfig(quant),
                quant.activation_scheme)
    return qat


def _captured_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(
        lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].detach().clone()))
        for n, m in qat_modules(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_calibrated_ranges_are_the_exact_min_max_over_the_data() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 6) * 3
    qat = _w8a8(_TwoPairs())
    calibrate_(qat, x, batch_size=7, recalibrate_bn=False)  # 8 batches: the range spans them all
    # Reference: the inputs each Linear reads with weight fake quant on, input fake quant off.
    for fq in input_fake_quants(qat):
        fq.disable_fake_quant()
    seen = _captured_inputs(qat.eval(), x)
    for name, mod in qat_modules(qat):
        obs = mod.input_fake_quant.activation_post_process
        assert float(obs.min_val) == float(seen[name].min())
        assert float(obs.max_val) == float(seen[name].max())
        assert not bool(mod.input_fake_quant.observer_enabled[0])


def test_token_wise_input_is_quantized_per_tensor_over_all_tokens() -> None:
    qat = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).eval()
    swap_pairs_(qat, [pair_record(qat, "0", "1")], make_qconfig(X86), X86.activation_scheme)
    x = torch.randn(4, 6, 5)  # (batch, tokens, features): BN normalizes the last axis
    calibrate_(qat, x, batch_size=2, recalibrate_bn=False)
    fq = qat[0].input_fake_quant
    obs = fq.activation_post_process
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max())
    scale, zp = _hand_qparams(float(x.min()), float(x.max()), 0, 127)
    assert float(fq.scale) == scale and int(fq.zero_point) == zp
    assert qat(x).shape == (4, 6, 3)


def test_finetune_observes_inputs_until_the_freeze_then_keeps_them() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 6) * 2
    model = _TwoPairs()
    qat = _w8a8(model)
    scales: list[float] = []
    fq = qat.fc2.input_fake_quant
    cfg = TrainConfig(mode=Mode.finetune, steps=8, batch_size=16, lr=1e-2,
                      freeze_observers_after=5)
    finetune_(qat, model, x, None, cfg, on_step=lambda _s: scales.append(float(fq.scale)))
    assert len(set(scales[:5])) > 1  # moving while observed
    assert len(set(scales[4:])) == 1  # fixed from step 5 on (the value after step 5's update)
    assert float(fq.scale) == scales[-1]
    assert not bool(fq.observer_enabled[0]) and bool(fq.fake_quant_enabled[0])


def test_weight_only_models_have_no_input_fake_quant_state() -> None:
    model = _TwoPairs()
    quant = QuantConfig(activations=Activations.none)
    assert quant.activation_scheme is None
    qat = _w8a8(model, quant)
    assert not any("input_fake_quant" in k for k in qat.state_dict())
    w8a8 = _w8a8(model)
    keys = {k for k in w8a8.state_dict() if "input_fake_quant" in k}
    assert {"fc1.input_fake_quant.scale", "fc1.input_fake_quant.zero_point",
            "fc1.input_fake_quant.activation_post_process.min_val"} <= keys


def test_fake_quant_off_w8a8_equals_weight_only_equals_float() -> None:
    model = _TwoPairs().eval()
    x = torch.randn(20, 6)
    qat = _w8a8(model).eval()
    set_fake_quant_(qat, fake_quant=False, observer=False)
    with torch.no_grad():
        torch.testing.assert_close(qat(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", list(Backend))
def test_backend_ranges_cannot_saturate_the_int16_pair_sum(backend: Backend) -> None:
    """u8 x s8 pair sums (AVX2 vpmaddubsw) and s8 x s8 sums stay <= 32767 for every code."""
    act = ACTIVATION_SCHEMES[backend]
    w = QuantConfig(backend).weight_scheme
    worst = max(abs(a * b) for a in (act.quant_min, act.quant_max)
                for b in (w.quant_min, w.quant_max))
    assert 2 * worst <= 32767
    assert act.quant_min <= 0 <= act.quant_max or act.dtype == "quint8"
    assert QuantScheme.from_json(act.to_json()) == act


# ------------------------------------------------------------- exclusion and sensitivity


def test_exclude_globs_match_the_linear_path() -> None:
    from qatconv.sensitivity import excluded_skips, split_excluded

    recs = [PairRecord(lin, bn, lin, 1e-5, 0.1, 4, 4, True) for lin, bn in
            (("blocks.0.fc", "blocks.0.bn"), ("blocks.1.fc", "blocks.1.bn"), ("head", "head_bn"))]
    kept, out = split_excluded(recs, ["blocks.*.fc"])
    assert [r.linear for r in kept] == ["head"]
    assert [r.linear for r in out] == ["blocks.0.fc", "blocks.1.fc"]
    assert {s["code"] for s in excluded_skips(out, ["blocks.*.fc"])} == {"excluded"}
    from qatconv.errors import UsageError

    with pytest.raises(UsageError, match="matches no pair"):
        split_excluded(recs, ["blocks.*.fc", "typo"])
    with pytest.raises(UsageError, match="every pair"):
        split_excluded(recs, ["*"])
    assert split_excluded(recs, []) == (recs, [])


def test_sqnr_is_the_power_ratio_in_db() -> None:
    from qatconv.sensitivity import sqnr_db

    ref = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    assert sqnr_db(ref, ref) == float("inf")
    # signal 25, noise 0.25 -> 20 dB
    assert sqnr_db(ref, ref + torch.tensor([[0.3, 0.4]], dtype=torch.float64)) == pytest.approx(
        20.0, abs=1e-12)


def test_weight_only_sensitivity_equals_a_hand_quantized_fold() -> None:
    """Only fc1 quantized, by hand: fold BN1 into fc1, per-channel symmetric int8 weights."""
    from qatconv.sensitivity import pair_sensitivity, sqnr_db

    torch.manual_seed(0)
    model = _TwoPairs().eval()
    x = torch.randn(40, 6)
    table = pair_sensitivity(model, [pair_record(model, lin, bn) for lin, bn in PAIRS], X86, x,
                             batch_size=16)
    assert [t.linear for t in table] == ["fc1", "fc2"]
    with torch.no_grad():
        w, b = fold_modules64(model.fc1, model.bn1)
        scale = (w.abs().amax(1, keepdim=True) / 127.5).float()
        # float32 times the reciprocal, as torch rounds: the extreme weight sits on a tie
        wq = torch.clamp(torch.round(w.float() * (1 / scale)), -128, 127).double() * scale
        hand = copy.deepcopy(model).double()
        hand.fc1.weight.copy_(wq)
        hand.fc1.bias.copy_(b)
        hand.bn1 = nn.Identity()
        want = sqnr_db(model(x).double(), hand(x.double()))
    assert table[0].weight_only_db == pytest.approx(want, abs=0.05)
    assert all(t.w8a8_db < t.weight_only_db for t in table)  # input rounding only adds noise
