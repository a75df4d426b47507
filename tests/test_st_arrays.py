"""qatconv.st_arrays: numpy casts that must give torch's bytes (the fold writes them torch-free)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qatconv import st_arrays

_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}


def _edge_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    f32 = np.finfo(np.float32)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, f32.max, -f32.max, f32.tiny,
                65504.0, 65520.0, 65519.99, 6.0e-8, 1e-45, 3.3895314e38, 3.39e38, 1 + 2**-8,
                1 + 3 * 2**-9, 1 + 2**-8 + 2**-30]
    # random bit patterns cover rounding ties and subnormals; scaled normals the common case
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):  # the NaN bit patterns among them
        return np.concatenate([specials, bits.astype(np.float64), rng.normal(0, 3, 20000),
                               rng.normal(0, 1, 2000) * 2.0 ** rng.integers(-140, 130, 2000)])


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_from_float64_equals_torch_to(dtype: str) -> None:
    x = _edge_values()
    with np.errstate(over="ignore", invalid="ignore"):
        ours = st_arrays.from_float(x, dtype)
    ref = torch.from_numpy(x).to(_TORCH[dtype])
    ref_bits = ref.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else ref.numpy()
    nan = np.isnan(x)
    # NaN payloads may differ; NaN must stay NaN
    assert st_arrays.nonfinite(ours[nan], dtype).all()
    assert (ours[~nan].view(np.uint8) == ref_bits[~nan].view(np.uint8)).all() if dtype in (
        "F32", "F64") else (ours[~nan].view(np.uint16) == ref_bits[~nan].view(np.uint16)).all()


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_to_float_is_exact(dtype: str) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        stored = st_arrays.from_float(_edge_values(), dtype)
    raw = stored.tobytes()
    ours = st_arrays.to_float(st_arrays.storage(raw, dtype), dtype)
    ref = torch.frombuffer(bytearray(raw), dtype=_TORCH[dtype]).double().numpy()
    assert np.array_equal(ours, ref, equal_nan=True)


def test_nonfinite_bf16_bits() -> None:
    x = np.array([1.0, np.inf, -np.inf, np.nan, 3.0e38, -0.0])
    mask = st_arrays.nonfinite(st_arrays.from_float(x, "BF16"), "BF16")
    assert mask.tolist() == [False, True, True, True, False, False]
