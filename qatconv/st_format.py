"""The safetensors file format, read and written without torch.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data buffer.
Each header entry is ``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative
to the buffer start; ``__metadata__`` maps strings to strings. Reading only the header keeps
`inspect` independent of the file's size.

Writing is sequential (`StreamWriter`): the header is computed from the declared tensor list,
then each tensor's bytes are appended in that order, either from memory or copied file to file
inside the kernel (`os.copy_file_range`), so tensors that pass through never enter Python's
memory. With ``map_output`` the writer reserves the whole file up front and maps it, so that a
caller can compute a tensor straight into the output (`StreamWriter.chunk_view`) instead of
into a buffer that ``os.write`` then copies; finished windows of the mapping are dropped as the
writer moves on, so memory stays bounded. Only the output is ever mapped: reading stays
``pread``. Data is little-endian, as the format requires (like safetensors, we assume a
little-endian host).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import final

from qatconv.atomic import AtomicFile, copy_fd_chunk
from qatconv.dtypes import RANK, SIZES
from qatconv.errors import CheckpointError, first_line

logger = logging.getLogger(__name__)

# A header larger than this is not a checkpoint header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
# torch tensors have at most 64 dimensions; each dimension must fit an int64.
MAX_DIMS = 64


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
    fd = open_file(path)
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def open_file(path: Path) -> int:
    """``os.open`` a file for reading; every failure is a `CheckpointError` saying why."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist", hint="check the path (and the current folder)"
        ) from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a file", hint="pass the file itself") from None
    except PermissionError:
        raise CheckpointError(
            f"cannot read {path}: permission denied", hint="check the file's permissions"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(
                f"{path} is not a regular file", hint="pass a checkpoint file, not a device or pipe"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_header_fd(fd: int, path: Path) -> Header:
    """`read_header` on an open file: header and data then come from one and the same file,
    even if ``path`` is replaced meanwhile."""
    try:
        file_size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise _bad(path, f"file is {file_size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > file_size:
            raise _bad(path, f"header length {n} does not fit in a {file_size}-byte file")
        raw = b""
        while len(raw) < n:
            more = os.pread(fd, n - len(raw), 8 + len(raw))
            if not more:
                raise _bad(path, "file ended inside the header (truncated while reading?)")
            raw += more
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate header bytes ``raw`` of a file of ``file_size`` bytes (see `read_header`)."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise _bad(path, f"{e.key!r} is declared twice in the header") from None
    except RecursionError:
        raise _bad(path, "header is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limits
        raise _bad(path, f"header is not valid JSON ({first_line(e, type(e).__name__)})") from None
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


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Plain json keeps the last of two equal keys: a header naming a tensor twice is ambiguous.
    obj: dict[str, object] = {}
    for k, v in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = v
    return obj


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SIZES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)
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
    if info.numel * SIZES[dtype] != info.nbytes:
        raise _bad(
            path,
            f"tensor {name!r}: shape {list(shape)} of {dtype} needs "
            f"{info.numel * SIZES[dtype]} bytes but its offsets span {info.nbytes}",
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


def read_index(path: Path) -> dict[str, Path]:
    """Read a Hugging Face ``*.safetensors.index.json``: tensor name -> shard path.

    Raises:
        CheckpointError: the file is missing, not JSON, or has no ``weight_map`` of strings.
    """
    _, weight_map = read_index_full(path)
    return {name: Path(path).parent / shard for name, shard in weight_map.items()}


def read_index_full(path: Path) -> tuple[dict[str, object], dict[str, str]]:
    """An index's ``metadata`` object and its ``weight_map`` (tensor name -> shard file name).

    Shard names must be plain file names beside the index (no path traversal).

    Raises:
        CheckpointError: unreadable, not JSON (or nested too deeply), no ``weight_map`` of
            strings, a shard outside the index's folder, or ``metadata`` not an object.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, digit limits, deep nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else first_line(e, type(e).__name__)
        raise CheckpointError(
            f"{path} is not valid JSON ({why})", hint="re-export the sharded checkpoint"
        ) from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{path} has no 'weight_map' object mapping tensor names to shard files",
            hint="a sharded checkpoint index looks like "
            '{"metadata": {...}, "weight_map": {"name": "model-00001-of-00002.safetensors"}}',
        )
    for name, shard in weight_map.items():
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{path}: shard {shard!r} of tensor {name!r} is not a file name in the index's "
                "folder",
                hint="weight_map values must be plain file names beside the index",
            )
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: 'metadata' is not a JSON object")
    return metadata, weight_map


def canonical_order(
    entries: Sequence[tuple[str, str, Sequence[int]]],
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Sort ``(name, dtype, shape)`` entries the way ``safetensors.save_file`` lays them out."""
    return sorted(
        ((name, dtype, tuple(shape)) for name, dtype, shape in entries),
        key=lambda e: (-RANK.get(e[1], -1), e[0]),
    )


def build_header(
    entries: Sequence[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Serialize a safetensors header for tensors laid out in the given order.

    ``metadata`` always gains ``format: pt``. The header is padded with spaces to a multiple of
    8 bytes, as safetensors does, so the data buffer starts 8-byte aligned. With entries in
    `canonical_order` and metadata ``{"format": "pt"}`` the bytes equal ``safetensors``' own.

    Returns:
        The bytes to write before the data buffer (length prefix included), and each tensor's
        ``(begin, end)`` offsets relative to the data buffer.

    Raises:
        ValueError: unknown dtype, bad shape, duplicate or reserved name, non-string metadata.
    """
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    meta["format"] = "pt"
    obj: dict[str, object] = {"__metadata__": {k: meta[k] for k in sorted(meta)}}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in entries:
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in offsets:
            raise ValueError(f"tensor {name!r} is declared twice")
        if dtype not in SIZES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims):
            raise ValueError(f"tensor {name!r}: negative dimension in {dims}")
        end = pos + math.prod(dims) * SIZES[dtype]
        obj[name] = {"dtype": dtype, "shape": dims, "data_offsets": [pos, end]}
        offsets[name] = (pos, end)
        pos = end
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def read_tensor_bytes(
    fd: int,
    header: Header,
    name: str,
    row_start: int | None = None,
    row_end: int | None = None,
    *,
    out: bytearray | memoryview | None = None,
) -> bytes | memoryview:
    """Read a tensor's bytes, or rows ``[row_start, row_end)`` of its first dimension, with pread.

    No mmap: the pages read stay in the page cache, not in this process's memory. With ``out``
    the bytes land in that buffer (reused across calls) and a memoryview of the filled prefix
    is returned.

    Raises:
        KeyError: ``name`` is not in the header.
        ValueError: rows out of range, or rows of a scalar; ``out`` too small.
        CheckpointError: the file ends early or cannot be read.
    """
    info = header.tensors[name]
    begin, end = info.begin, info.end
    if row_start is not None or row_end is not None:
        if not info.shape:
            raise ValueError(f"tensor {name!r} is a scalar: it has no rows")
        rows = info.shape[0]
        lo = 0 if row_start is None else row_start
        hi = rows if row_end is None else row_end
        if not 0 <= lo <= hi <= rows:
            raise ValueError(f"rows [{lo}, {hi}) out of range for {name!r} with {rows} rows")
        row_bytes = info.nbytes // rows if rows else 0
        begin, end = info.begin + lo * row_bytes, info.begin + hi * row_bytes
    n = end - begin
    offset = header.data_start + begin
    try:
        if out is None:
            data = os.pread(fd, n, offset)
            while len(data) < n:
                more = os.pread(fd, n - len(data), offset + len(data))
                if not more:
                    raise _short(header.path, name)
                data += more
            return data
        view = memoryview(out).cast("B")
        if len(view) < n:
            raise ValueError(f"buffer of {len(view)} bytes cannot hold {n} bytes of {name!r}")
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:n]], offset + got)
            if k == 0:
                raise _short(header.path, name)
            got += k
        return view[:n]
    except OSError as e:
        raise CheckpointError(
            f"cannot read {name!r} from {header.path}: {e.strerror or e}"
        ) from None


def read_tensors(
    path: Path, names: Sequence[str] | None = None
) -> tuple[Header, dict[str, bytearray]]:
    """Read the header and the bytes of tensors ``names`` (default: all) through one descriptor.

    No mmap: a file truncated or rewritten while it is read gives a `CheckpointError`, never
    a SIGBUS; a file replaced by rename is read whole from its old version.

    Raises:
        CheckpointError: as `read_header`; a name the header lacks; the file ends early.
    """
    path = Path(path)
    fd = open_file(path)
    try:
        header = read_header_fd(fd, path)
        out: dict[str, bytearray] = {}
        for name in sorted(header.tensors) if names is None else names:
            if name not in header.tensors:
                raise CheckpointError(
                    f"{path} does not hold tensor {name!r} (was it changed while being read?)"
                )
            buf = bytearray(header.tensors[name].nbytes)
            if buf:
                read_tensor_bytes(fd, header, name, out=buf)
            out[name] = buf
        return header, out
    finally:
        os.close(fd)


def _short(path: Path, name: str) -> CheckpointError:
    return CheckpointError(
        f"{path} ended while reading {name!r}: the file was truncated or changed during the read"
    )


_COPY_STEP = 32 << 20  # bytes per copy syscall
# With fsync on, data is pushed to disk while it is written and dropped from the page cache
# one window behind the write position: the final fsync then has one window left to flush,
# and the file never holds more than two windows of dirty page cache.
_WRITEBACK_WINDOW = 32 << 20
# A mapped output is dropped from the process's mapping (MADV_DONTNEED; the pages stay in the
# page cache) one such window behind the write position, fsync or not: the process then never
# has more than two of these windows of the output resident (peak RSS is what users see).
_MAP_WINDOW = 8 << 20


@final
class StreamWriter:
    """Write one safetensors file sequentially, atomically, without holding it in memory.

    ``entries`` (name, dtype, shape) fix the header and the data order up front. Inside the
    ``with`` block each tensor's bytes must arrive in that order and in exactly the declared
    amount: `write` (whole tensor), `write_chunk` (pieces, accumulated), `copy_range` (bytes
    copied from another file inside the kernel) and, when `mapped`, `chunk_view` (the next
    piece as a writable view of the output, for the caller to fill). ``map_output`` asks for
    the mapping (`AtomicFile.map`: space reserved first); where the filesystem cannot reserve
    space `mapped` stays False and the same calls write with ``os.write``, byte for byte the
    same file. Bytes go to ``.<name>.tmp-<pid>`` beside ``final_path``; a clean exit checks
    that every tensor is complete, fsyncs and renames the file onto ``final_path``
    (``commit=False`` leaves the rename to `commit`, to publish several files together). An
    exception, or an incomplete tensor, removes the temporary file.

    Raises:
        OutputError: the temporary file cannot be created, reserved or written (folder
            missing, disk full, permissions).
        ValueError: bytes out of the declared order or size (a bug in the caller).
    """

    def __init__(
        self,
        final_path: Path,
        entries: Sequence[tuple[str, str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
        *,
        fsync: bool = True,
        commit: bool = True,
        map_output: bool = False,
    ) -> None:
        self._file = AtomicFile(final_path, fsync=fsync, commit=commit)
        self._map_output = map_output
        self._view: memoryview | None = None  # of the mapping, while mapped
        self.header_bytes, self.offsets = build_header(entries, metadata)
        self.size = len(self.header_bytes) + sum(e - b for b, e in self.offsets.values())
        self._names = [e[0] for e in entries]
        self._sizes = [self.offsets[n][1] - self.offsets[n][0] for n in self._names]
        self._pos = 0  # bytes written to the temp file
        self._flushed = 0  # bytes handed to writeback and dropped from the page cache
        self._unmapped = 0  # bytes of a mapped output dropped from the mapping
        self._i = 0  # index of the tensor being filled
        self._filled = 0  # bytes of it written so far
        self.copy_method = "copy_file_range"  # then "sendfile", then "pread"

    @property
    def final_path(self) -> Path:
        return self._file.final_path

    @property
    def temp_path(self) -> Path:
        return self._file.temp_path

    @property
    def mapped(self) -> bool:
        """True while the output is written through a mapping (inside the ``with`` block)."""
        return self._view is not None

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> StreamWriter:
        self._file.open()
        try:
            mapping = self._file.map(self.size) if self._map_output else None
        except BaseException:
            self._file.discard()
            raise
        if mapping is not None:
            self._view = memoryview(mapping)
        self._write_all(self.header_bytes)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            try:
                self._check_complete()
            except BaseException:
                self._release_view()
                self._file.discard()
                raise
        self._release_view()
        self._file.__exit__(exc_type, exc, tb)

    def commit(self) -> None:
        """Rename the finished temporary file onto ``final_path`` (after a clean exit)."""
        if not self._file.finished:
            raise ValueError("commit() before the writer finished")
        self._file.commit()

    def discard(self) -> None:
        """Close and remove the temporary file; safe to call more than once."""
        self._release_view()
        self._file.discard()

    # -- data ------------------------------------------------------------------------------
    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Write the whole of tensor ``name`` (exactly its declared byte count)."""
        view = memoryview(data).cast("B")
        self._claim(name, len(view))
        if self._filled != 0 or len(view) != self._sizes[self._i]:
            raise ValueError(
                f"tensor {name!r} needs {self._sizes[self._i]} bytes in one write(), got "
                f"{len(view)} (use write_chunk for pieces)"
            )
        self._write_all(view)
        self._advance(len(view))

    def write_chunk(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append a piece of tensor ``name``; pieces must add up to its declared byte count."""
        view = memoryview(data).cast("B")
        self._claim(name, len(view))
        self._write_all(view)
        self._advance(len(view))

    def chunk_view(self, name: str, nbytes: int) -> memoryview:
        """The next ``nbytes`` of tensor ``name`` as a writable view of the mapped output.

        The bytes count as written: the caller fills the view before its next call to the
        writer (what the view holds then is what the file holds). Only while `mapped`.
        """
        if self._view is None:
            raise ValueError("chunk_view() needs a mapped output (map_output=True, inside `with`)")
        self._claim(name, nbytes)
        self._writeback()  # drops windows before this view, never the view itself
        start = self._pos
        self._pos += nbytes
        self._advance(nbytes)
        return self._view[start : start + nbytes]

    def copy_range(self, src_fd: int, offset: int, nbytes: int, name: str | None = None) -> None:
        """Append ``nbytes`` read from ``src_fd`` at ``offset`` to the tensor being written.

        The copy stays in the kernel where it can (`atomic.copy_fd_chunk`). ``name``, when
        given, is checked against the declared order.
        """
        target = self._claim(name, nbytes)
        fd = self._file.require_fd()
        left = nbytes
        try:
            if self._view is not None:  # the copy writes at the file position, not the view's
                os.lseek(fd, self._pos, os.SEEK_SET)
            while left > 0:
                k, self.copy_method = copy_fd_chunk(
                    src_fd, fd, offset, min(left, _COPY_STEP), self.copy_method
                )
                if k == 0:
                    raise CheckpointError(
                        f"source of {target!r} ended {left} bytes early: the input file was "
                        "truncated or changed while folding"
                    )
                offset += k
                left -= k
                self._advance(k)
                self._pos += k
                self._writeback()
        except OSError as e:
            raise self._file.error(e) from None

    # -- internals -------------------------------------------------------------------------
    def _claim(self, name: str | None, nbytes: int) -> str:
        """Check that ``nbytes`` of ``name`` (default: the current tensor) may come next."""
        if name is not None:
            # Tensors of zero bytes need no write(); step over them to reach ``name``.
            while (
                self._i < len(self._names)
                and self._names[self._i] != name
                and self._sizes[self._i] == 0
            ):
                self._i += 1
        elif nbytes > 0:
            while self._i < len(self._names) and self._sizes[self._i] == 0:
                self._i += 1
        if self._i >= len(self._names):
            raise ValueError(f"all declared tensors are complete; got {nbytes} more bytes")
        current = self._names[self._i]
        if name is not None and name != current:
            raise ValueError(f"tensor {current!r} comes next in the declared order, not {name!r}")
        if self._filled + nbytes > self._sizes[self._i]:
            raise ValueError(
                f"tensor {current!r} is declared with {self._sizes[self._i]} bytes; "
                f"{self._filled + nbytes} were given"
            )
        return current

    def _advance(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled == self._sizes[self._i]:
            self._i += 1
            self._filled = 0

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._view is None:
            self._pos += self._file.write_all(data)
        else:
            view = memoryview(data).cast("B")
            self._view[self._pos : self._pos + len(view)] = view
            self._pos += len(view)
        self._writeback()

    def _writeback(self) -> None:
        # MADV_DONTNEED unmaps a finished window of a mapped output (its dirty pages stay in
        # the page cache). FADV_DONTNEED starts writeback of the dirty pages in its range
        # without waiting and drops the pages already clean: called on the window before the
        # last one, it keeps the disk busy during the fold and recycles page cache instead of
        # growing it.
        mapping = self._file.mapping if self._view is not None else None
        while mapping is not None and self._pos - self._unmapped >= 2 * _MAP_WINDOW:
            mapping.madvise(mmap.MADV_DONTNEED, self._unmapped, _MAP_WINDOW)
            self._unmapped += _MAP_WINDOW
        if not self._file.fsync or not _HAS_FADVISE:
            return
        while self._pos - self._flushed >= 2 * _WRITEBACK_WINDOW:
            fd = self._file.require_fd()
            os.posix_fadvise(fd, self._flushed, _WRITEBACK_WINDOW, os.POSIX_FADV_DONTNEED)
            self._flushed += _WRITEBACK_WINDOW

    def _release_view(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None

    def _check_complete(self) -> None:
        while self._i < len(self._names) and self._sizes[self._i] == 0 and self._filled == 0:
            self._i += 1
        if self._i < len(self._names):
            raise ValueError(
                f"tensor {self._names[self._i]!r} is incomplete: {self._filled} of "
                f"{self._sizes[self._i]} bytes written"
            )
        try:
            end = self._pos if self._view is not None else os.lseek(
                self._file.require_fd(), 0, os.SEEK_CUR)
        except OSError as e:
            raise self._file.error(e) from None
        if end != self.size:
            raise ValueError(f"wrote {end} bytes, expected {self.size}")


_HAS_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")

