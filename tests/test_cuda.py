"""`--device cuda`: the same pipeline on a GPU. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from qatconv import api
from qatconv.config import Device, Mode, ModelConfig, QuantConfig, TrainConfig
from qatconv.errors import UsageError
from qatconv.qat import QatLinearBn1d, make_qconfig, set_fake_quant_

ROOT = Path(__file__).resolve().parent.parent
SPEC = str(ROOT / "sample_models" / "digits_mlp.py:DigitsMLP")
WEIGHTS = ROOT / "sample_models" / "digits_mlp.safetensors"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no CUDA"):
        api.prepare(ModelConfig(spec=SPEC, weights=WEIGHTS),
                    ROOT / "sample_models" / "digits_calib.npz", tmp_path / "q.safetensors",
                    train=TrainConfig(device=Device.cuda))
    assert not (tmp_path / "q.safetensors").exists()


@needs_cuda
def test_qat_module_on_cuda_matches_linear_bn_in_float64() -> None:
    torch.manual_seed(0)
    lin, bn = nn.Linear(6, 5), nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.normal_()
        bn.weight[0] = 0
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    ref = nn.Sequential(copy.deepcopy(lin), copy.deepcopy(bn)).double().cuda().train()
    mod = QatLinearBn1d.from_pair(lin.double().cuda(), bn.double().cuda(),
                                  make_qconfig(QuantConfig()))
    set_fake_quant_(mod, fake_quant=False, observer=False)
    mod.train()
    x = torch.randn(32, 6, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mod.bn.running_var, ref[1].running_var, rtol=1e-12, atol=1e-12)


@needs_cuda
def test_finetune_on_cuda_then_fold_check(tmp_path: Path) -> None:
    data = ROOT / "sample_models" / "digits_train.npz"
    held = ROOT / "sample_models" / "digits_heldout.npz"
    out = tmp_path / "qat.safetensors"
    report = api.prepare(
        ModelConfig(spec=SPEC, weights=WEIGHTS), data, out,
        train=TrainConfig(mode=Mode.finetune, steps=200, batch_size=128, device=Device.cuda),
    )
    assert report.metrics["top1_agreement"] >= 0.98
    from qatconv.data import load_data

    ds = load_data(held)
    qat_model = api.load_qat(out)  # loads on CPU: the checkpoint holds CPU tensors
    float_model = api.load_model(ModelConfig(spec=SPEC, weights=WEIGHTS)).model
    with torch.no_grad():
        acc_q = float((qat_model(ds.inputs).argmax(1) == ds.targets).double().mean())
        acc_f = float((float_model(ds.inputs).argmax(1) == ds.targets).double().mean())
    assert acc_q >= acc_f - 0.003
    result = api.fold(tmp_path / "folded.safetensors", qat_checkpoint=out, check=held)
    assert result.check is not None and result.check.passed
    assert result.check.max_abs_error < 1e-4


@needs_cuda
def test_device_auto_picks_cuda(tmp_path: Path) -> None:
    assert api._pick_device("auto").type == "cuda"
