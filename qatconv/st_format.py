"""The safetensors file format, read and written without torch.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data buffer.
Each header entry is ``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative
to the buffer start; ``__metadata__`` maps strings to strings. Reading only the header keeps
`inspect` independent of the file's size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from qatconv.errors import CheckpointError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# A header larger than this is not a checkpoint header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: dtype name, shape, byte range relative to the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: Path
    data_start: int  # absolute file offset of the data buffer (8 + N)
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int


def read_header(path: Path) -> Header:
    """Parse and validate the header of a safetensors file without reading its data.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is malformed or
            inconsistent with the file's size.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"file is {file_size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise _bad(path, f"header length {n} does not fit in a {file_size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate header bytes ``raw`` of a file of ``file_size`` bytes (see `read_header`)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _bad(path, "header is not a JSON object")
    metadata_raw = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        tensors[name] = _parse_entry(path, name, entry)
    data_size = file_size - 8 - len(raw)
    _check_layout(path, tensors, data_size)
    return Header(path, 8 + len(raw), tensors, dict(metadata_raw), file_size)


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.numel * DTYPE_SIZES[dtype] != info.nbytes:
        raise _bad(
            path,
            f"tensor {name!r}: shape {list(shape)} of {dtype} needs "
            f"{info.numel * DTYPE_SIZES[dtype]} bytes but its offsets span {info.nbytes}",
        )
    return info


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    # The buffer must be tiled exactly: no overlap, no hole, nothing past the end.
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            what = "overlaps the previous tensor" if info.begin < pos else "leaves a gap"
            raise _bad(path, f"tensor {name!r} at offset {info.begin} {what}")
        pos = info.end
    if pos != data_size:
        raise _bad(
            path,
            f"tensors end at byte {pos} of the data buffer but the file holds {data_size} "
            "(truncated or padded file)",
        )


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file: {why}",
        hint="re-export the checkpoint, or check that the copy is complete",
    )
