"""`fold --check` measures the reference's own float32 noise floor (its float64 run) and scales
the default tolerance with it, so an exact fold of an ill-conditioned model passes and a wrong
one still fails, with a message that says which error exceeded what."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qatconv import api
from qatconv.config import ModelConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "models"))
from ill_conditioned import ResidualMLP

SPEC = f"{HERE / 'models' / 'ill_conditioned.py'}:ResidualMLP"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    d = tmp_path_factory.mktemp("ill")
    model = ResidualMLP().eval()
    save_file(model.state_dict(), d / "w.safetensors")
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    np.savez(d / "x.npz", inputs=x.numpy())
    return d / "w.safetensors", d / "x.npz", x


def _floor(x: torch.Tensor) -> float:
    """The independent noise floor: the float32 model vs the same model in float64."""
    model = ResidualMLP().eval()
    with torch.no_grad():
        y32 = model(x).double()
        y64 = model.double()(x.double())
    return float((y32 - y64).abs().max())


def test_exact_fold_of_ill_conditioned_model_passes_with_noise_floor(
    files: tuple[Path, Path, torch.Tensor], tmp_path: Path, cli: Any
) -> None:
    weights, data, x = files
    floor = _floor(x)
    assert floor > 1e-3  # the model is ill-conditioned indeed: 10x the float32 default atol
    r = cli("fold", "--model", SPEC, "--weights", weights, "-o", tmp_path / "f.safetensors",
            "--check", data, "--json")
    assert r.code == 0, r.err
    check = r.json()["check"]
    # float32 matmul rounding depends on the kernel's blocking (threads): same order, not bits.
    assert check["noise_floor"] == pytest.approx(floor, rel=0.5)
    assert check["atol"] == pytest.approx(4 * check["noise_floor"], rel=1e-12)
    assert check["max_abs_error"] > 1e-4  # the dtype default alone would have failed it
    # ... as it does when the user fixes the tolerance: the message names both numbers.
    r = cli("fold", "--model", SPEC, "--weights", weights, "-o", tmp_path / "g.safetensors",
            "--check", data, "--atol", "1e-4", "--rtol", "1e-4")
    assert r.code == 4
    assert "exceeds the allowed 0.0001 (atol)" in r.err
    assert "the reference's own float noise floor is 0.00" in r.err
    assert not (tmp_path / "g.safetensors").exists()


def test_wrong_fold_still_fails_beyond_the_noise_floor(
    files: tuple[Path, Path, torch.Tensor], tmp_path: Path, cli: Any
) -> None:
    weights, data, x = files
    folded = tmp_path / "f.safetensors"
    assert cli("fold", "--model", SPEC, "--weights", weights, "-o", folded, "--quiet").code == 0
    with safe_open(folded, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    floor = _floor(x)
    tensors["head.bias"][0] += 20 * floor  # an error 5x beyond the scaled tolerance
    save_file(tensors, tmp_path / "wrong.safetensors", metadata=meta)
    result = api.verify(tmp_path / "wrong.safetensors", "float", ModelConfig(SPEC, {}, weights),
                        data)
    assert not result.passed
    assert result.max_abs_error == pytest.approx(20 * floor, rel=0.2)
    assert result.failure is not None and "(atol = 4 x the noise floor)" in result.failure
    ok = api.verify(folded, "float", ModelConfig(SPEC, {}, weights), data)
    assert ok.passed and ok.failure is None
