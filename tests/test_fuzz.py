"""Fuzzing the readers: a mutated checkpoint either loads correctly or raises a QatconvError.

Never another exception, never a crash. "Correctly" means: every tensor has the dtype and shape
its header declares and exactly the bytes its offsets point at, checked against a reference
reader written here with plain `json` and byte slicing (independent of `qatconv.st_format`).

Examples per test: 40 by default (CI); set ``QATCONV_FUZZ_EXAMPLES=5000`` for a longer run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from qatconv import checkpoint as ck
from qatconv import data as data_mod
from qatconv import inspection, validate
from qatconv.errors import QatconvError

EXAMPLES = int(os.environ.get("QATCONV_FUZZ_EXAMPLES", "40"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_GEN = torch.Generator().manual_seed(0)
BASE_TENSORS: dict[str, torch.Tensor] = {
    "a.weight": torch.randn(3, 4, generator=_GEN),
    "a.bias": torch.randn(3, generator=_GEN, dtype=torch.float64),
    "n": torch.tensor(7, dtype=torch.int64),
    "h": torch.randn(5, generator=_GEN).to(torch.bfloat16),
    "m": torch.tensor([[True, False], [False, True]]),
    "e": torch.zeros(0, 3, dtype=torch.float16),
    "u": torch.arange(7, dtype=torch.uint8),
}
BASE_ST = save(BASE_TENSORS, metadata={"format": "pt"})
_n = struct.unpack("<Q", BASE_ST[:8])[0]
BASE_HEADER: dict[str, Any] = json.loads(BASE_ST[8 : 8 + _n])
BASE_DATA = BASE_ST[8 + _n :]
NAMES = sorted(k for k in BASE_HEADER if k != "__metadata__")

ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16",
             "U32", "U64", "F8_E4M3", "F8_E5M2"]  # fmt: skip
_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}  # fmt: skip
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


# ----------------------------------------------------------------------------- strategies

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6,
)
ints = st.integers(-3, 2**64 + 3) | st.integers(0, len(BASE_DATA) + 16)
dtype_values = st.sampled_from([*ST_DTYPES, "F128", "f32", "", "Q4"]) | junk
shape_values = st.lists(st.integers(-2, 9) | st.integers(0, 2**70), max_size=5) | junk
offset_values = st.lists(ints, min_size=2, max_size=2) | st.lists(ints, max_size=3) | junk


@st.composite
def header_edit(draw: st.DrawFn) -> tuple[str, ...] | tuple[Any, ...]:
    name = draw(st.sampled_from(NAMES))
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop_field", "drop_entry",
                                 "add_entry", "entry_junk", "metadata", "shift"]))
    if kind == "dtype":
        return (kind, name, draw(dtype_values))
    if kind == "shape":
        return (kind, name, draw(shape_values))
    if kind == "offsets":
        return (kind, name, draw(offset_values))
    if kind == "drop_field":
        return (kind, name, draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    if kind == "add_entry":
        entry = {"dtype": draw(dtype_values), "shape": draw(shape_values),
                 "data_offsets": draw(offset_values)}
        return (kind, draw(st.text(max_size=5)), entry)
    if kind == "entry_junk":
        return (kind, name, draw(junk))
    if kind == "metadata":
        return (kind, name, draw(junk))
    if kind == "shift":  # move a tensor's window: overlaps, gaps, out of range
        return (kind, name, draw(st.integers(-16, 16)))
    return (kind, name)


def apply_edits(edits: list[tuple[Any, ...]]) -> dict[str, Any]:
    h = json.loads(json.dumps(BASE_HEADER))
    for edit in edits:
        kind, name = edit[0], edit[1]
        entry = h.get(name)
        if kind == "dtype" and isinstance(entry, dict):
            entry["dtype"] = edit[2]
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = edit[2]
        elif kind == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = edit[2]
        elif kind == "drop_field" and isinstance(entry, dict):
            entry.pop(edit[2], None)
        elif kind == "drop_entry":
            h.pop(name, None)
        elif kind == "add_entry" or kind == "entry_junk":
            h[name] = edit[2]
        elif kind == "metadata":
            h["__metadata__"] = edit[2]
        elif kind == "shift" and isinstance(entry, dict):
            offs = entry.get("data_offsets")
            if isinstance(offs, list) and all(isinstance(o, int) for o in offs):
                entry["data_offsets"] = [o + edit[2] for o in offs]
    return h


# -------------------------------------------------------------------------------- oracle


def reference_read(blob: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    """What a correct load must give: name -> (dtype, shape, bytes at its offsets)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], data[begin:end])
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_load_or_refuse(path: Path) -> None:
    """The checkpoint loader, `inspect` and the QAT validator: a correct load or QatconvError."""
    blob = path.read_bytes()
    try:
        loaded = ck.load_checkpoint(path)
    except QatconvError:
        loaded = None
    if loaded is not None:
        ref = reference_read(blob)
        assert sorted(loaded.tensors) == sorted(ref)
        for name, t in loaded.tensors.items():
            dtype, shape, raw = ref[name]
            assert t.dtype == _TORCH[dtype] and list(t.shape) == shape, name
            assert tensor_bytes(t) == raw, name
            assert len(raw) == _SIZES[dtype] * t.numel()
    for action in (
        lambda: inspection.inspect_file(path),
        lambda: validate.check_qat_tensors(path, []),
        lambda: ck.read_metadata(path),
    ):
        try:
            action()
        except QatconvError:
            pass


def write(tmp: Path, blob: bytes, name: str = "x.safetensors") -> Path:
    path = tmp / name
    path.write_bytes(blob)
    return path


# ----------------------------------------------------------------------------- safetensors


def test_base_file_loads(tmp_path: Path) -> None:
    loaded = ck.load_checkpoint(write(tmp_path, BASE_ST))
    assert loaded.tensors.keys() == BASE_TENSORS.keys()
    for k, t in BASE_TENSORS.items():
        assert loaded.tensors[k].dtype == t.dtype
        assert tensor_bytes(loaded.tensors[k]) == tensor_bytes(t)


@fuzz
@given(edits=st.lists(header_edit(), min_size=1, max_size=4),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, -8, 8, 2**40]),
       pad=st.sampled_from([b"", b" ", b"   \n", b"\x00"]),
       data_delta=st.integers(-9, 9))
def test_mutated_header(edits: list[tuple[Any, ...]], length_delta: int, pad: bytes,
                        data_delta: int, tmp_path: Path) -> None:
    raw = json.dumps(apply_edits(edits)).encode() + pad
    data = BASE_DATA[: len(BASE_DATA) + data_delta] if data_delta < 0 else (
        BASE_DATA + b"\x00" * data_delta
    )
    blob = struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data
    assert_load_or_refuse(write(tmp_path, blob))


@fuzz
@given(flips=st.lists(st.tuples(st.integers(0, len(BASE_ST) - 1), st.integers(1, 255)),
                      min_size=1, max_size=6),
       cut=st.none() | st.integers(0, len(BASE_ST)))
def test_mutated_bytes(flips: list[tuple[int, int]], cut: int | None, tmp_path: Path) -> None:
    blob = bytearray(BASE_ST)
    for pos, x in flips:
        blob[pos] ^= x
    assert_load_or_refuse(write(tmp_path, bytes(blob[:cut] if cut is not None else blob)))


@fuzz
@given(header=st.binary(max_size=200) | st.text(max_size=120).map(str.encode))
def test_random_header_bytes(header: bytes, tmp_path: Path) -> None:
    blob = struct.pack("<Q", len(header)) + header + BASE_DATA
    assert_load_or_refuse(write(tmp_path, blob))


@fuzz
@given(edits=st.lists(header_edit(), max_size=3), cut=st.integers(0, 64))
def test_mutated_data_file(edits: list[tuple[Any, ...]], cut: int, tmp_path: Path) -> None:
    """`--data` reads safetensors through the same checks: a DataError or a Dataset."""
    header = apply_edits(edits)
    header["inputs"] = header.pop("a.weight", header.get("inputs"))
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + BASE_DATA
    path = write(tmp_path, blob[: len(blob) - cut], "d.safetensors")
    try:
        ds = data_mod.load_data(path)
    except QatconvError:
        return
    inputs = ds.inputs[:]  # .safetensors data is read per batch: read every row
    assert inputs.dtype == torch.float32 and bool(torch.isfinite(inputs).all())


# ---------------------------------------------------------------------------------- pickles


def _pt_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": BASE_TENSORS["a.weight"], "b": BASE_TENSORS["a.bias"], "n": torch.tensor(3),
                "h": BASE_TENSORS["h"]}, buf)
    return buf.getvalue()


BASE_PT = _pt_bytes()


def _members(blob: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return [(i, z.read(i)) for i in z.infolist()]


BASE_MEMBERS = _members(BASE_PT)
PKL_INDEX = next(i for i, (info, _) in enumerate(BASE_MEMBERS) if info.filename.endswith(".pkl"))


def _rezip(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info, body in members:
            z.writestr(info, body)
    return out.getvalue()


def assert_pt_load_or_refuse(path: Path) -> None:
    for trust in (False,):  # never --trust-pickle here: fuzzed pickles could do anything
        try:
            loaded = ck.load_checkpoint(path, trust_pickle=trust)
        except QatconvError:
            continue
        assert loaded.module is None
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor)
                   for k, v in loaded.tensors.items())
        assert loaded.tensors


def test_base_pt_loads(tmp_path: Path) -> None:
    loaded = ck.load_checkpoint(write(tmp_path, _rezip(BASE_MEMBERS), "x.pt"))
    assert torch.equal(loaded.tensors["w"], BASE_TENSORS["a.weight"])


@fuzz
@given(flips=st.lists(st.tuples(st.integers(0, len(BASE_PT) - 1), st.integers(1, 255)),
                      min_size=1, max_size=4),
       cut=st.none() | st.integers(0, len(BASE_PT)))
def test_mutated_pt_bytes(flips: list[tuple[int, int]], cut: int | None, tmp_path: Path) -> None:
    blob = bytearray(BASE_PT)
    for pos, x in flips:
        blob[pos] ^= x
    assert_pt_load_or_refuse(write(tmp_path, bytes(blob[:cut] if cut is not None else blob),
                                   "x.pt"))


@fuzz
@given(data=st.data())
def test_mutated_pt_pickle(data: st.DataObject, tmp_path: Path) -> None:
    """Valid zip (CRCs right) around a damaged data.pkl or storage: the unpickler sees it."""
    members = list(BASE_MEMBERS)
    index = data.draw(st.sampled_from([PKL_INDEX, PKL_INDEX, *range(len(members))]))
    info, body = members[index]
    body = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(body) - 1)))
        if op == "flip" and body:
            body[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del body[pos : pos + data.draw(st.integers(1, 16))]
        else:
            body[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    members[index] = (info, bytes(body))
    assert_pt_load_or_refuse(write(tmp_path, _rezip(members), "x.pt"))


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3)
    | st.tuples(inner, inner),
    max_leaves=8,
)


@fuzz
@given(obj=plain, protocol=st.sampled_from([2, 4]), legacy=st.booleans())
def test_arbitrary_pickles(obj: Any, protocol: int, legacy: bool, tmp_path: Path) -> None:
    """Plain Python objects pickled in place of a state dict (zip or legacy raw pickle)."""
    raw = pickle.dumps(obj, protocol=protocol)
    if legacy:
        blob = raw
    else:
        members = list(BASE_MEMBERS)
        members[PKL_INDEX] = (members[PKL_INDEX][0], raw)
        blob = _rezip(members)
    path = write(tmp_path, blob, "x.pth")
    with pytest.raises(QatconvError):  # none of them is a dict holding tensors
        ck.load_checkpoint(path)


@fuzz
@given(meta=junk | st.fixed_dictionaries({"pairs": st.lists(
    st.dictionaries(st.sampled_from(["linear", "bn", "qat", "eps", "momentum", "in_features",
                                     "out_features", "bias", "affine"]), junk), max_size=3)}))
def test_qat_metadata_validation(meta: Any) -> None:
    """Damaged `qatconv` metadata: validated records or a CheckpointError."""
    if not isinstance(meta, dict):
        return
    try:
        records = validate.qat_records(meta, "f")
    except QatconvError:
        return
    for r in records:
        assert isinstance(r["linear"], str) and isinstance(r["bias"], bool)
        assert isinstance(r["eps"], (int, float)) and r["eps"] >= 0
