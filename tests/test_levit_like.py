"""The LeViT pattern: `bn(linear(x).flatten(0, 1)).reshape_as(linear(x))` pairs fold exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from reference import fold_modules64
from safetensors.torch import load_file, save_file
from torch import nn

from qatconv import api
from qatconv.config import ModelConfig
from qatconv.pairs import find_pairs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "models"))
from levit_like import LeViTLike

SPEC = f"{HERE / 'models' / 'levit_like.py'}:LeViTLike"


def _trained_like() -> LeViTLike:
    torch.manual_seed(0)
    model = LeViTLike().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _files(tmp_path: Path) -> tuple[LeViTLike, Path, torch.Tensor, Path]:
    """The model, its checkpoint, its example input and that input as a data file."""
    model = _trained_like()
    weights = tmp_path / "levit.safetensors"
    save_file(model.state_dict(), weights)
    (x,) = model.example_inputs()
    data = tmp_path / "x.npz"
    np.savez(data, inputs=x.numpy())
    return model, weights, x, data


def test_reshape_as_back_is_a_shape_only_use() -> None:
    model = _trained_like()
    scan = find_pairs(model, model.example_inputs())
    assert scan.traced
    assert len(scan.pairs) == 8 and all(p.token_wise and p.verified for p in scan.pairs)
    assert all(p.linear.endswith(".linear") for p in scan.pairs)
    assert [b.bn for b in scan.bn_before_linear] == ["head.bn"]


def test_prepare_and_fold_match_the_float_model(tmp_path: Path) -> None:
    _, weights, x, data = _files(tmp_path)
    qat = tmp_path / "qat.safetensors"
    api.prepare(ModelConfig(spec=SPEC, weights=weights), data, qat)
    folded = tmp_path / "folded.safetensors"
    result = api.fold(folded, qat_checkpoint=qat, check=data)
    assert result.check is not None and result.check.passed
    # Independent reference: the float model in float64 against the folded tensors loaded
    # into the architecture with every folded BN replaced by Identity.
    ref = _trained_like().double()
    with torch.no_grad():
        want = ref(x.double())
    got_model = _trained_like()
    for p in result.pairs:
        parent, _, name = p["bn"].rpartition(".")
        setattr(got_model.get_submodule(parent), name, nn.Identity())
        lin = got_model.get_submodule(p["linear"])
        lin.bias = nn.Parameter(torch.zeros(lin.out_features))
    got_model.load_state_dict(load_file(folded), strict=True)
    with torch.no_grad():
        got = got_model.double()(x.double())
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_plain_fold_with_bn_before_linear_through_dropout(tmp_path: Path) -> None:
    model, weights, _, data = _files(tmp_path)
    folded = tmp_path / "folded.safetensors"
    result = api.fold(folded, model_cfg=ModelConfig(spec=SPEC, weights=weights), check=data,
                      fold_bn_before_linear=True)
    assert result.check is not None and result.check.passed
    assert [r["bn"] for r in result.metadata["bn_before_linear"]] == ["head.bn"]
    tensors = load_file(folded)
    assert not any(k.startswith("head.bn.") for k in tensors)
    # Independent check of the head: W' = W diag(s), b' = b + W (beta - mean * s), float64.
    w_ref, b_ref = fold_modules64(model.head.bn, model.head.linear)
    torch.testing.assert_close(tensors["head.linear.weight"].double(), w_ref, rtol=2**-23, atol=1e-7)
    torch.testing.assert_close(tensors["head.linear.bias"].double(), b_ref, rtol=2**-23, atol=1e-7)
