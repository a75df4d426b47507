"""safetensors tensor bytes as numpy arrays, with torch's float casts reproduced (no torch import).

numpy has no bfloat16: BF16 data is held as its uint16 bit patterns ("storage" arrays) and
converted through float32 here. Casts from float64 to a 16-bit type go through float32, as
torch's do (``c10::Half`` / ``c10::BFloat16`` are built from a float), so the bytes written equal
``tensor.to(dtype)``'s: round to nearest even at each step, BF16 NaN as 0x7FC0.
"""

from __future__ import annotations

import numpy as np

from qatconv.dtypes import DTYPES

# dtype name -> numpy storage dtype (little-endian, as the format requires; BF16 as uint16).
STORAGE: dict[str, str] = {n: d.numpy for n, d in DTYPES.items() if d.numpy is not None}
_BF16_EXP = 0x7F80


def storage(raw: bytes | bytearray | memoryview, dtype: str,
            shape: tuple[int, ...] | None = None, count: int = -1) -> np.ndarray:
    """A view of ``raw`` (its first ``count`` elements) as ``dtype``'s storage array."""
    arr = np.frombuffer(raw, dtype=np.dtype(STORAGE[dtype]), count=count)
    return arr.reshape(shape) if shape is not None else arr


def to_float(arr: np.ndarray, dtype: str, to: type = np.float64) -> np.ndarray:
    """A float storage array (``dtype``) as float64 (or ``to``); exact for every float type."""
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32).astype(to)
    return arr.astype(to)


def from_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """A float32/float64 array cast to ``dtype``'s storage the way torch's ``.to(dtype)`` does."""
    if dtype in ("F32", "F64"):
        return x.astype(np.dtype(STORAGE[dtype]))
    x32 = np.asarray(x, dtype=np.float32)
    if dtype == "F16":
        return x32.astype(np.float16)
    bits = x32.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x32), np.uint16(0x7FC0), rounded)


def nonfinite(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Boolean mask of NaN/inf elements of a float storage array."""
    if dtype == "BF16":  # all exponent bits set means NaN/inf
        return (arr & _BF16_EXP) == _BF16_EXP
    return ~np.isfinite(arr)


def array_bytes(arr: np.ndarray) -> memoryview:
    """The raw bytes of an array (C order), without a copy when it is contiguous."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.size == 0:
        return memoryview(b"")
    return memoryview(flat.view(np.uint8)).cast("B")
