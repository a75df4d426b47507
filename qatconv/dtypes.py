"""The one dtype table: safetensors dtype names, their sizes and layout rank, torch and numpy types.

Imports no torch at module level (`inspect` of a safetensors file stays torch-free); the torch
side is looked up on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "INT_DTYPES",
    "RANK",
    "SIZES",
    "has_st_dtype",
    "st_dtype",
    "tensor_bytes",
    "torch_dtype",
]


@dataclass(frozen=True)
class Dtype:
    """One safetensors dtype: ``name`` as in the header, ``size`` in bytes, ``torch`` the
    attribute of the torch module, ``numpy`` the little-endian numpy type that reads its raw
    bytes (BF16: its raw 16 bits), ``struct`` the `struct` code where one exists."""

    name: str
    size: int
    torch: str
    numpy: str | None = None
    struct: str | None = None


# In safetensors' Dtype enum order: `save_file` lays tensors out by descending rank (this
# order), then name, which keeps every tensor aligned to its element size.
DTYPES: dict[str, Dtype] = {d.name: d for d in (
    Dtype("BOOL", 1, "bool", "|b1"),
    Dtype("U8", 1, "uint8", "|u1"),
    Dtype("I8", 1, "int8", "|i1"),
    Dtype("F8_E5M2", 1, "float8_e5m2"),
    Dtype("F8_E4M3", 1, "float8_e4m3fn"),
    Dtype("I16", 2, "int16", "<i2"),
    Dtype("U16", 2, "uint16", "<u2"),
    Dtype("F16", 2, "float16", "<f2", "e"),
    Dtype("BF16", 2, "bfloat16", "<u2"),
    Dtype("I32", 4, "int32", "<i4"),
    Dtype("U32", 4, "uint32", "<u4"),
    Dtype("F32", 4, "float32", "<f4", "f"),
    Dtype("F64", 8, "float64", "<f8", "d"),
    Dtype("I64", 8, "int64", "<i8"),
    Dtype("U64", 8, "uint64", "<u8"),
)}  # fmt: skip
SIZES: dict[str, int] = {n: d.size for n, d in DTYPES.items()}
RANK: dict[str, int] = {n: i for i, n in enumerate(DTYPES)}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # the dtypes a fold reads and writes
INT_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")
_BY_TORCH_NAME = {d.torch: n for n, d in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of safetensors dtype ``name`` (KeyError when unknown)."""
    import torch

    return getattr(torch, DTYPES[name].torch)


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (KeyError when safetensors has no such type)."""
    return _BY_TORCH_NAME[str(dtype).removeprefix("torch.")]


def has_st_dtype(dtype: torch.dtype) -> bool:
    return str(dtype).removeprefix("torch.") in _BY_TORCH_NAME


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    import torch

    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
