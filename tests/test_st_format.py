"""st_format: our header reader and streaming writer against safetensors' own reader/writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from qatconv import st_format
from qatconv.errors import CheckpointError, OutputError

DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
SHAPES = [(), (0,), (3, 0), (1,), (7,), (2, 3), (4, 1, 5)]


def _random_tensor(
    dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator
) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return torch.randint(0, 200, shape, generator=gen).to(dtype)


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _entries(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    rev = {v: k for k, v in DTYPES.items()}
    return [(k, rev[t.dtype], tuple(t.shape)) for k, t in tensors.items()]


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    entries = st_format.canonical_order(_entries(tensors))
    with st_format.StreamWriter(path, entries, metadata) as w:
        for name, _, _ in entries:
            w.write(name, _bytes(tensors[name]))


tensor_dicts = st.dictionaries(
    st.text("abcxyz._", min_size=1, max_size=6).filter(lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(sorted(DTYPES)), st.sampled_from(SHAPES)),
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(spec=tensor_dicts, seed=st.integers(0, 2**31 - 1))
def test_writer_output_equals_safetensors_bytes_and_loads(
    spec: dict[str, tuple[str, tuple[int, ...]]],
    seed: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: _random_tensor(DTYPES[d], s, gen) for k, (d, s) in spec.items()}
    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    _write(path, tensors, {})
    # With only format=pt as metadata the layout is fully determined: same bytes as safetensors.
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert _bytes(loaded[k]) == _bytes(t)


def test_writer_metadata_read_by_safe_open(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{d}": _random_tensor(t, (3, 2), gen) for d, t in DTYPES.items()}
    meta = {"qatconv": json.dumps({"stage": "folded", "ü": [1, 2]}), "format": "np", "z": ""}
    path = tmp_path / "m.safetensors"
    _write(path, tensors, meta)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {**meta, "format": "pt"}  # format is always pt
        for k, t in tensors.items():
            assert _bytes(f.get_tensor(k)) == _bytes(t)
    assert st_format.read_header(path).metadata == {**meta, "format": "pt"}


def test_header_is_padded_to_8_bytes(tmp_path: Path) -> None:
    for name in ["a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg", "abcdefgh"]:
        raw, offsets = st_format.build_header([(name, "U8", (3,))], {})
        (n,) = struct.unpack("<Q", raw[:8])
        assert len(raw) == 8 + n and n % 8 == 0
        assert raw[8:].rstrip(b" ") == raw[8:].strip()  # only trailing spaces pad
        assert offsets == {name: (0, 3)}


def test_read_header_agrees_with_safetensors(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"n{i}": _random_tensor(t, s, gen) for i, (t, s) in
               enumerate((t, s) for t in DTYPES.values() for s in SHAPES)}  # fmt: skip
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path, metadata={"a": "b"})
    header = st_format.read_header(path)
    rev = {v: k for k, v in DTYPES.items()}
    fd = os.open(path, os.O_RDONLY)
    try:
        with safe_open(path, framework="pt") as f:
            assert set(f.keys()) == set(header.tensors)
            assert f.metadata() == header.metadata
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(k)
                info = header.tensors[k]
                assert info.dtype == sl.get_dtype() == rev[tensors[k].dtype]
                assert list(info.shape) == sl.get_shape()
                assert st_format.read_tensor_bytes(fd, header, k) == _bytes(f.get_tensor(k))
    finally:
        os.close(fd)


def test_read_tensor_bytes_rows_and_reused_buffer(tmp_path: Path) -> None:
    t = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    path = tmp_path / "r.safetensors"
    save_file({"pad": torch.ones(3, dtype=torch.uint8), "t": t}, path)
    header = st_format.read_header(path)
    buf = bytearray(1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert st_format.read_tensor_bytes(fd, header, "t", 2, 5) == _bytes(t[2:5])
        assert st_format.read_tensor_bytes(fd, header, "t", row_start=8) == _bytes(t[8:])
        view = st_format.read_tensor_bytes(fd, header, "t", 0, 4, out=buf)
        assert isinstance(view, memoryview) and bytes(view) == _bytes(t[:4])
        assert bytes(st_format.read_tensor_bytes(fd, header, "t", 3, 3, out=buf)) == b""
        with pytest.raises(ValueError, match="out of range"):
            st_format.read_tensor_bytes(fd, header, "t", 4, 11)
        with pytest.raises(ValueError, match="cannot hold"):
            st_format.read_tensor_bytes(fd, header, "t", out=bytearray(8))
    finally:
        os.close(fd)


def test_read_tensor_bytes_reports_truncation(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.ones(100)}, path)
    header = st_format.read_header(path)
    os.truncate(path, header.file_size - 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError, match="ended while reading"):
            st_format.read_tensor_bytes(fd, header, "t")
    finally:
        os.close(fd)


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("method", ["copy_file_range", "sendfile", "pread"])
def test_copy_range_is_bit_identical(tmp_path: Path, method: str, mapped: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    src = {"a": _random_tensor(torch.bfloat16, (33, 17), gen),
           "b": _random_tensor(torch.int64, (5,), gen), "e": torch.zeros(0)}  # fmt: skip
    src_path = tmp_path / "src.safetensors"
    save_file(src, src_path)
    header = st_format.read_header(src_path)
    out = tmp_path / "out.safetensors"
    entries = st_format.canonical_order(_entries({**src, "new": torch.ones(4, dtype=torch.uint8)}))
    fd = os.open(src_path, os.O_RDONLY)
    try:
        with st_format.StreamWriter(out, entries, {}, map_output=mapped) as w:
            assert w.mapped == mapped
            w.copy_method = method
            for name, _, _ in entries:
                if name == "new":
                    w.write_chunk("new", b"\x01\x01")
                    if mapped:  # filled through the mapping, between copies
                        w.chunk_view("new", 2)[:] = b"\x01\x01"
                    else:
                        w.write_chunk("new", b"\x01\x01")
                    continue
                info = header.tensors[name]
                half = info.nbytes // 2  # two pieces: the tensor accumulates
                w.copy_range(fd, header.data_start + info.begin, half, name)
                w.copy_range(fd, header.data_start + info.begin + half, info.nbytes - half)
            assert w.copy_method == method
    finally:
        os.close(fd)
    loaded = load_file(out)
    for k, t in src.items():
        assert _bytes(loaded[k]) == _bytes(t)
    assert torch.equal(loaded["new"], torch.ones(4, dtype=torch.uint8))


def test_chunk_view_needs_a_mapped_output(tmp_path: Path) -> None:
    with st_format.StreamWriter(tmp_path / "o.safetensors", [("a", "U8", (2,))], {}) as w:
        assert not w.mapped
        with pytest.raises(ValueError, match="mapped output"):
            w.chunk_view("a", 2)
        w.write("a", b"xy")
    assert load_file(tmp_path / "o.safetensors")["a"].tolist() == [ord("x"), ord("y")]


def test_copy_range_falls_back_when_copy_file_range_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src_path = tmp_path / "src.safetensors"
    t = torch.arange(1000, dtype=torch.float32)
    save_file({"t": t}, src_path)
    header = st_format.read_header(src_path)
    out = tmp_path / "out.safetensors"
    fd = os.open(src_path, os.O_RDONLY)
    try:
        with st_format.StreamWriter(out, [("t", "F32", (1000,))], {}) as w:
            w.copy_range(fd, header.data_start, 4000, "t")
            assert w.copy_method == "sendfile"
    finally:
        os.close(fd)
    assert torch.equal(load_file(out)["t"], t)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writer_rejects_out_of_order_and_wrong_sizes(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    entries = [("a", "F32", (2,)), ("b", "U8", (3,))]
    with (
        pytest.raises(ValueError, match="'a' comes next"),
        st_format.StreamWriter(out, entries, {}) as w,
    ):
        w.write("b", b"abc")
    with (
        pytest.raises(ValueError, match="declared with 8 bytes"),
        st_format.StreamWriter(out, entries, {}) as w,
    ):
        w.write_chunk("a", b"x" * 9)
    with (
        pytest.raises(ValueError, match="one write"),
        st_format.StreamWriter(out, entries, {}) as w,
    ):
        w.write("a", b"x" * 4)
    with (
        pytest.raises(ValueError, match="'b' is incomplete: 1 of 3"),
        st_format.StreamWriter(out, entries, {}) as w,
    ):
        w.write("a", b"x" * 8)
        w.write_chunk("b", b"y")
    assert _leftovers(tmp_path) == []


def test_writer_failure_leaves_no_file_and_keeps_existing(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), st_format.StreamWriter(out, [("a", "U8", (2,))], {}) as w:
        w.write("a", b"zz")
        assert w.temp_path.exists() and w.temp_path.name == f".o.safetensors.tmp-{os.getpid()}"
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == ["o.safetensors"]
    with st_format.StreamWriter(out, [("a", "U8", (2,))], {}) as w:
        w.write("a", b"zz")
    assert bytes(load_file(out)["a"].numpy()) == b"zz"
    assert _leftovers(tmp_path) == ["o.safetensors"]


def test_writer_deferred_commit(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    w = st_format.StreamWriter(out, [("e", "F32", (0, 2))], {"k": "v"}, commit=False)
    with w:
        pass  # a zero-byte tensor needs no write
    assert not out.exists() and w.temp_path.exists()
    w.commit()
    assert load_file(out)["e"].shape == (0, 2) and not w.temp_path.exists()


def test_writer_missing_folder_is_output_error(tmp_path: Path) -> None:
    with (
        pytest.raises(OutputError, match="cannot write"),
        st_format.StreamWriter(tmp_path / "no" / "o.safetensors", [], {}),
    ):
        pass


def test_build_header_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="twice"):
        st_format.build_header([("a", "F32", (1,)), ("a", "F32", (1,))], {})
    with pytest.raises(ValueError, match="unknown dtype"):
        st_format.build_header([("a", "F128", (1,))], {})
    with pytest.raises(ValueError, match="strings"):
        st_format.build_header([], {"a": 1})  # type: ignore[dict-item]


def test_read_header_rejects_gaps_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="leaves a gap"):
        st_format.read_header(path)
    save_file({"t": torch.ones(4)}, path)
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(CheckpointError, match="truncated"):
        st_format.read_header(path)


def test_read_index(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 8}, "weight_map": {"a": "s1.safetensors"}})
    )
    assert st_format.read_index(tmp_path / "m.safetensors.index.json") == {
        "a": tmp_path / "s1.safetensors"
    }
    (tmp_path / "bad.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file name"):
        st_format.read_index(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        st_format.read_index(tmp_path / "bad2.json")


@pytest.mark.parametrize("fsync", [True, False])
def test_writeback_window_keeps_data_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    # A tiny window so that writes and in-kernel copies both cross many window boundaries.
    monkeypatch.setattr(st_format, "_WRITEBACK_WINDOW", 4096)
    gen = torch.Generator().manual_seed(9)
    src = {"a": _random_tensor(torch.float32, (300, 70), gen),
           "b": _random_tensor(torch.int64, (5000,), gen)}  # fmt: skip
    src_path = tmp_path / "src.safetensors"
    save_file(src, src_path)
    header = st_format.read_header(src_path)
    out = tmp_path / "out.safetensors"
    entries = st_format.canonical_order(_entries(src))
    fd = os.open(src_path, os.O_RDONLY)
    try:
        with st_format.StreamWriter(out, entries, {}, fsync=fsync) as w:
            info = header.tensors["b"]
            w.copy_range(fd, header.data_start + info.begin, info.nbytes, "b")
            data = _bytes(src["a"])
            for i in range(0, len(data), 1000):
                w.write_chunk("a", data[i : i + 1000])
            flushed = w._flushed
    finally:
        os.close(fd)
    assert (flushed > 100_000) == fsync  # the window only runs when the file is fsynced
    assert out.read_bytes() == save(src, metadata={"format": "pt"})
