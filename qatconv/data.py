"""Calibration / check data files -> a `Dataset` of float32 inputs and optional targets.

Formats (the first dimension is always the sample axis):
``.safetensors`` / ``.pt`` (a tensor dict, ``weights_only``) / ``.npz`` with ``inputs`` (or ``x``)
and optionally ``targets`` (or ``y``); ``.npy`` (inputs only); ``.csv`` with a header row and
numeric cells, ``--target-column NAME`` split off as targets. Every problem is a `DataError`
(exit 3) with one line saying where.

``.npy`` and ``.safetensors`` data above `WHOLE_MAX_BYTES` (64 MiB of inputs and targets in
memory) are never loaded whole: their inputs and targets are `Rows`, read with ``pread`` per batch
(the header is validated first, the values are checked in one streaming pass). ``pread`` rather
than a memory map: mapped pages a run has touched count in the process's resident memory, so
sampling a 2 GiB map would grow the process by 2 GiB; pages read with ``pread`` stay in the
kernel's page cache. Smaller ones are read whole through the same `Rows` (one read, the same
decoding), then checked as the other formats are. ``.pt``, ``.npz`` and ``.csv`` are always
loaded whole (their formats are compressed or pickled and cannot be read by row offset).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import pickle
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qatconv.errors import CheckpointError, DataError, UsageError, first_line

log = logging.getLogger(__name__)

INPUT_KEYS = ("inputs", "x")
TARGET_KEYS = ("targets", "y")
SUFFIXES = (".safetensors", ".pt", ".npz", ".npy", ".csv")
_CHUNK = 1 << 20
# Bytes of rows decoded at once by the validation pass over lazily read data.
_SCAN_BYTES = 8 << 20
# `.npy` / `.safetensors` data whose inputs and targets take at most this many bytes once decoded
# (float32 inputs; int64 or float32 targets) are read whole. Read per batch, small data pays for
# what only big data needs: a pread of random rows per batch, and distillation running the float
# model on every batch instead of once (qat.py `_distill_goal`): 2.8 s of 200 fine-tune steps on
# bench/prepare_process.py's 8 MiB of 4096 x 512 rows. 64 MiB reads in a fraction of a second
# and is small next to what a prepare process holds anyway (importing torch: ~220 MiB resident);
# data for which one more copy in memory matters is far larger (a 2 GiB file stays `Rows`).
WHOLE_MAX_BYTES = 64 << 20
_CPU = torch.device("cpu")


class _OpenFile:
    """One read-only descriptor shared by the `Rows` views of a file; closed when unused."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        self._close = weakref.finalize(self, os.close, self.fd)

    def read_into(self, view: memoryview, offset: int) -> None:
        got = 0
        try:
            while got < len(view):
                k = os.preadv(self.fd, [view[got:]], offset + got)
                if k == 0:
                    raise DataError(
                        f"{self.path} ended early: the file was truncated or changed during the run",
                        hint="do not modify the data file while qatconv reads it",
                    )
                got += k
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Rows:
    """Rows of one array stored in a file, read with ``pread`` on every access.

    Indexing it like a tensor (``rows[i]``, ``rows[a:b]``, ``rows[index_tensor]``) reads just
    those rows and returns a tensor of ``dtype`` on ``device``: the values are decoded exactly
    as the whole-file readers decode them (the file's dtype -> ``base_dtype`` -> ``dtype``).

    Attributes:
        file: the open file.
        offset: file offset of row 0.
        row_shape: shape of one row, in elements.
        np_dtype: the stored element type (``.npy``, any byte order); None for safetensors.
        st_dtype: the stored torch dtype (``.safetensors``); None for ``.npy``.
        rows: number of rows.
        base_dtype: the dtype a whole-file read casts to (float32 inputs, int64/float32 targets).
        dtype: the dtype returned (``to(dtype)`` changes it).
        device: where returned tensors live.
    """

    file: _OpenFile
    offset: int
    row_shape: tuple[int, ...]
    np_dtype: np.dtype | None
    st_dtype: torch.dtype | None
    rows: int
    base_dtype: torch.dtype
    dtype: torch.dtype
    device: torch.device = _CPU

    @property
    def itemsize(self) -> int:
        if self.np_dtype is not None:
            return int(self.np_dtype.itemsize)
        assert self.st_dtype is not None
        return torch.empty((), dtype=self.st_dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.itemsize

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, *self.row_shape))

    def __len__(self) -> int:
        return self.rows

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def to(self, *args: Any, **kwargs: Any) -> Rows:
        """Like `torch.Tensor.to` with a device and/or a dtype: a view that converts on read."""
        device, dtype = self.device, self.dtype
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = torch.device(a)
            else:
                raise TypeError(f"Rows.to takes a device and/or a dtype, not {a!r}")
        return replace(self, device=device, dtype=dtype)

    def float(self) -> Rows:
        return self.to(torch.float32)

    def narrow(self, dim: int, start: int, length: int) -> Rows:
        """Rows ``[start, start + length)`` as `Rows` (like `torch.Tensor.narrow` on dim 0)."""
        if dim != 0 or not 0 <= start <= start + length <= self.rows:
            raise IndexError(f"cannot narrow {self.rows} rows to [{start}, {start + length})")
        return replace(self, offset=self.offset + start * self.row_bytes, rows=length)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.rows)
            if step == 1:
                return self._read_run(start, max(start, stop))
            key = range(start, stop, step)
        if isinstance(key, int):
            if not -self.rows <= key < self.rows:
                raise IndexError(f"row {key} out of range for {self.rows} rows")
            return self._read_run(key % self.rows, key % self.rows + 1)[0]
        if isinstance(key, torch.Tensor):
            key = key.detach().cpu().numpy()
        return self._read_rows(np.asarray(key, dtype=np.int64).reshape(-1))

    def chunks(self, rows_per_chunk: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, tensor)`` for consecutive runs of rows covering the whole array."""
        step = rows_per_chunk or max(1, _SCAN_BYTES // max(1, self.row_bytes))
        for start in range(0, self.rows, step):
            yield start, self._read_run(start, min(self.rows, start + step))

    def _read_run(self, start: int, stop: int) -> torch.Tensor:
        buf = np.empty((stop - start, self.row_bytes), dtype=np.uint8)
        if buf.size:
            self.file.read_into(memoryview(buf).cast("B"), self.offset + start * self.row_bytes)
        return self._decode(buf)

    def _read_rows(self, index: np.ndarray) -> torch.Tensor:
        index = np.where(index < 0, index + self.rows, index)
        if index.size and (index.min() < 0 or index.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        wanted, inverse = np.unique(index, return_inverse=True)
        buf = np.empty((len(wanted), self.row_bytes), dtype=np.uint8)
        # One pread per run of consecutive rows: a sequential pass is one read per batch.
        cuts = np.flatnonzero(np.diff(wanted) != 1) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(wanted)]):
            if hi > lo and self.row_bytes:
                view = memoryview(buf[lo:hi]).cast("B")
                self.file.read_into(view, self.offset + int(wanted[lo]) * self.row_bytes)
        return self._decode(buf[inverse.reshape(-1)])

    def _decode(self, buf: np.ndarray) -> torch.Tensor:
        n = buf.shape[0]
        if self.np_dtype is not None:
            values = np.frombuffer(buf, dtype=self.np_dtype).reshape(n, *self.row_shape)
            values = np.require(values, dtype=self.np_dtype.newbyteorder("="),
                                requirements=["C", "W"])
            t = torch.from_numpy(values)
        else:
            assert self.st_dtype is not None
            t = torch.from_numpy(buf.reshape(-1)).view(self.st_dtype).reshape(n, *self.row_shape)
        t = t.to(self.base_dtype).to(self.dtype)
        return t.to(self.device) if self.device.type != "cpu" else t


@dataclass
class Dataset:
    """Samples along the first dimension of ``inputs`` (float32) and ``targets`` (if any).

    Attributes:
        inputs: float32, finite, shape ``(N, ...)``: a tensor, or `Rows` read per batch
            (``.npy`` and ``.safetensors`` above `WHOLE_MAX_BYTES`).
        targets: ``(N, ...)`` int64 (class labels) or float32, a tensor or `Rows`; None when
            the file has none.
        sha256: hex digest of the file's bytes (recorded in checkpoint metadata).
        path: the file read.
    """

    inputs: torch.Tensor | Rows
    targets: torch.Tensor | Rows | None
    sha256: str
    path: Path

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def lazy(self) -> bool:
        """True when the rows are read from the file per batch (never held whole)."""
        return isinstance(self.inputs, Rows)


def load_data(path: Path, *, target_column: str | None = None) -> Dataset:
    """Read a data file (see the module docstring for the formats).

    Args:
        path: the data file.
        target_column: for ``.csv`` only, the column holding the targets.

    Raises:
        DataError: missing/empty/unreadable file, unknown extension, no ``inputs``, zero
            samples, non-numeric CSV cells (row and column named), NaN/inf inputs, targets
            whose length differs from the inputs'.
        UsageError: ``target_column`` given for a format other than ``.csv``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist", hint="check the --data path")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file", hint="pass one data file to --data")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{path}: unknown data extension {path.suffix or '(none)'!r}",
            hint="use .safetensors, .pt, .npz, .npy or .csv",
        )
    if target_column is not None and suffix != ".csv":
        raise UsageError(
            f"--target-column only applies to .csv data, not {suffix}",
            hint="name the targets tensor 'targets' (or 'y') inside the file instead",
        )
    digest = _sha256(path)
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty", hint="re-export the data")
    if suffix == ".npy":
        rows = _npy_rows(path)
        if rows is not None:
            return _finish_stored(path, rows, None, digest)
        inputs, targets = _read_npy(path), None
    elif suffix == ".safetensors":
        return _finish_stored(path, *_st_rows(path), digest)
    elif suffix == ".csv":
        inputs, targets = _read_csv(path, target_column)
    else:
        arrays = _read_tensor_dict(path, suffix)
        inputs, targets = _pick(path, arrays)
    return _finish(path, inputs, targets, digest)


def check_features(
    dataset: Dataset, model: nn.Module, example_shape_hint: str | None = None
) -> None:
    """Run ``model`` on the first two samples to prove the data fits it.

    The model's train/eval mode is restored afterwards and no gradient or BN statistic changes
    (it runs in eval mode under ``torch.no_grad``).

    Args:
        dataset: the loaded data.
        model: the float model.
        example_shape_hint: an extra sentence for the error hint (e.g. the expected shape).

    Raises:
        DataError: the forward pass raises on the data's shape or dtype.
    """
    batch = dataset.inputs[: min(2, len(dataset))]
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch.to(device))
    except KeyboardInterrupt:
        raise
    except Exception as e:
        first = first_line(e, type(e).__name__)
        hint = "the data's features must match the model's input"
        if example_shape_hint:
            hint += f" ({example_shape_hint})"
        raise DataError(
            f"{dataset.path}: the model rejects samples of shape {list(batch.shape[1:])}: {first}",
            hint=hint,
        ) from e
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------- readers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def _npy_rows(path: Path) -> Rows | None:
    """The array of a ``.npy`` file as `Rows` (header validated by numpy; nothing read yet).

    None for a Fortran-ordered array of two or more dimensions: its rows are not contiguous in
    the file, so it is read whole (and said so in the log).
    """
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise _unreadable(path, e) from e
    try:
        if not isinstance(mapped, np.memmap) or mapped.ndim == 0:  # not mapped, or a scalar
            return None
        if mapped.dtype.kind not in "biuf":
            raise DataError(f"{path}: inputs has dtype {mapped.dtype}, not numbers")
        if mapped.ndim > 1 and not mapped.flags.c_contiguous:
            log.info("%s is Fortran-ordered: reading it whole", path)
            return None
        dtype = mapped.dtype
        rows = Rows(_OpenFile(path), int(mapped.offset), tuple(int(d) for d in mapped.shape[1:]),
                    dtype, None, int(mapped.shape[0]), torch.float32, torch.float32)
    finally:
        mm = getattr(mapped, "_mmap", None)
        if mm is not None:
            mm.close()
    return rows


def _st_rows(path: Path) -> tuple[Rows, Rows | None]:
    """Inputs and targets of a ``.safetensors`` data file as `Rows` (only the header is read)."""
    from qatconv import st_format
    from qatconv.dtypes import DTYPES

    try:
        header = st_format.read_header(path)
    except CheckpointError as e:
        raise DataError(e.message, hint=e.hint) from None
    inputs_key = next((k for k in INPUT_KEYS if k in header.tensors), None)
    targets_key = next((k for k in TARGET_KEYS if k in header.tensors), None)
    _pick(path, {k: None for k in header.tensors})  # the "no inputs" error, worded once
    file = _OpenFile(path)

    def rows(key: str, base: torch.dtype | None) -> Rows:
        info = header.tensors[key]
        dtype = getattr(torch, DTYPES[info.dtype].torch, None)
        if dtype is None:
            raise DataError(f"{path}: {key!r} has dtype {info.dtype}, which this torch "
                            f"{torch.__version__} cannot hold")
        if not info.shape:
            what = "inputs" if key == inputs_key else "targets"
            raise DataError(f"{path}: {what} are a single number, not samples",
                            hint="the first dimension of inputs is the sample axis")
        base = base or (torch.float32 if dtype.is_floating_point else torch.int64)
        return Rows(file, header.data_start + info.begin, tuple(info.shape[1:]), None, dtype,
                    int(info.shape[0]), base, base)

    assert inputs_key is not None
    return rows(inputs_key, torch.float32), rows(targets_key, None) if targets_key else None


def _read_tensor_dict(path: Path, suffix: str) -> Mapping[str, Any]:
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except Exception as e:
            raise _unreadable(path, e) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes; failures are reported below
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not str(e).startswith("Weights only load failed"):
            raise _unreadable(path, e) from e
        raise DataError(
            f"refusing to unpickle data file {path}: it needs code to load (data files are "
            "only read with torch.load(weights_only=True), never with code execution)",
            hint="save plain tensors: torch.save({'inputs': x, 'targets': y}, path), or use .npz",
        ) from None
    except Exception as e:
        raise _unreadable(path, e) from e
    if isinstance(obj, torch.Tensor):
        return {"inputs": obj}
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors",
            hint="torch.save({'inputs': x, 'targets': y}, path)",
        )
    return {str(k): v for k, v in obj.items()}


def _read_npy(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise _unreadable(path, e) from e


def _pick(path: Path, arrays: Mapping[str, Any]) -> tuple[Any, Any]:
    inputs_key = next((k for k in INPUT_KEYS if k in arrays), None)
    if inputs_key is None:
        found = ", ".join(sorted(arrays)[:8]) or "nothing"
        raise DataError(
            f"{path} has no 'inputs' (or 'x') entry; it holds {found}",
            hint="store the model inputs under the name 'inputs' (and labels under 'targets')",
        )
    targets_key = next((k for k in TARGET_KEYS if k in arrays), None)
    return arrays[inputs_key], arrays[targets_key] if targets_key else None


def _read_csv(path: Path, target_column: str | None) -> tuple[Any, Any]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _unreadable(path, e) from None
    if not rows:
        raise DataError(f"data file {path} is empty", hint="re-export the data")
    _, header = rows[0]
    header = [h.strip() for h in header]
    if all(_is_number(h) for h in header):
        raise DataError(
            f"{path}: the first row ({', '.join(header[:4])}) looks like data, not a header",
            hint="add a header row with the column names",
        )
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{path}: column name(s) {', '.join(dupes)} appear more than once")
    body = rows[1:]
    if not body:
        raise DataError(f"{path} has a header but zero samples", hint="add data rows")
    for line, row in body:
        if len(row) != len(header):
            raise DataError(
                f"{path}, line {line}: {len(row)} cells but the header has {len(header)} columns"
            )
    target_index: int | None = None
    if target_column is not None:
        if target_column not in header:
            raise DataError(
                f"{path} has no column {target_column!r}; columns: {', '.join(header[:10])}",
                hint="check --target-column",
            )
        target_index = header.index(target_column)
    columns = [i for i in range(len(header)) if i != target_index]
    if not columns:
        raise DataError(f"{path}: no input columns besides the target {target_column!r}")
    inputs = np.stack([_column(path, header, body, i) for i in columns], axis=1)
    targets = None
    if target_index is not None:
        raw = [row[target_index].strip() for _, row in body]
        if all(_is_int(c) for c in raw):
            targets = np.array([int(c) for c in raw], dtype=np.int64)
        else:
            targets = _column(path, header, body, target_index).astype(np.float32)
    return inputs, targets


def _column(path: Path, header: list[str], body: list[tuple[int, list[str]]], i: int) -> Any:
    values = np.empty(len(body), dtype=np.float64)
    for j, (line, row) in enumerate(body):
        cell = row[i].strip()
        try:
            values[j] = float(cell)
        except ValueError:
            what = "is empty" if not cell else f"{cell!r} is not a number"
            raise DataError(
                f"{path}, line {line}, column {header[i]!r}: {what}",
                hint="CSV data must be numeric; drop or encode text columns first",
            ) from None
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------- validation


def _as_tensor(path: Path, what: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(f"{path}: {what} has dtype {value.dtype}, not numbers")
        # native byte order and C layout; np.ascontiguousarray would turn a 0-d array into 1-d
        value = np.require(value, dtype=value.dtype.newbyteorder("="), requirements=["C", "W"])
        return torch.from_numpy(value)
    raise DataError(f"{path}: {what} is a {type(value).__name__}, not an array")


def _finish(path: Path, inputs_raw: Any, targets_raw: Any, digest: str) -> Dataset:
    inputs = _as_tensor(path, "inputs", inputs_raw)
    if inputs.is_complex():
        raise DataError(f"{path}: inputs have dtype {inputs.dtype}, not real numbers")
    if inputs.dim() == 0:
        raise DataError(
            f"{path}: inputs are a single number, not samples",
            hint="the first dimension of inputs is the sample axis",
        )
    n = int(inputs.shape[0])
    if n == 0:
        raise DataError(f"{path} holds zero samples", hint="the first dimension is the sample axis")
    inputs = inputs.to(torch.float32).contiguous()
    finite = torch.isfinite(inputs.reshape(n, -1)).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise DataError(
            f"{path}: {bad.numel()} of {n} samples have NaN or inf inputs "
            f"(first: sample {int(bad[0])})",
            hint="clean the data (a float32 cast turns values beyond 3.4e38 into inf)",
        )
    targets: torch.Tensor | None = None
    if targets_raw is not None:
        targets = _as_tensor(path, "targets", targets_raw)
        if targets.is_complex():
            raise DataError(f"{path}: targets have dtype {targets.dtype}, not real numbers")
        if targets.dim() == 0 or int(targets.shape[0]) != n:
            got = "a single number" if targets.dim() == 0 else f"{int(targets.shape[0])}"
            raise DataError(
                f"{path}: {n} input samples but {got} targets",
                hint="inputs and targets must have the same first dimension",
            )
        if targets.is_floating_point():
            targets = targets.to(torch.float32)
            if not bool(torch.isfinite(targets).all()):
                raise DataError(f"{path}: targets contain NaN or inf", hint="clean the data")
        else:
            targets = targets.to(torch.int64)
        targets = targets.contiguous()
    log.debug("loaded %d samples of shape %s from %s", n, list(inputs.shape[1:]), path)
    return Dataset(inputs, targets, digest, path)


def _finish_stored(path: Path, inputs: Rows, targets: Rows | None, digest: str) -> Dataset:
    """Data stored by row offset: read whole up to `WHOLE_MAX_BYTES`, else per batch."""
    held = sum(len(r) * math.prod(r.row_shape) * r.base_dtype.itemsize
               for r in (inputs, targets) if r is not None)
    if held > WHOLE_MAX_BYTES:
        return _finish_rows(path, inputs, targets, digest)
    return _finish(path, inputs[:], None if targets is None else targets[:], digest)


def _finish_rows(path: Path, inputs: Rows, targets: Rows | None, digest: str) -> Dataset:
    """`_finish` for lazily read data: the same checks, in one streaming pass over the rows."""
    n = len(inputs)
    if n == 0:
        raise DataError(f"{path} holds zero samples", hint="the first dimension is the sample axis")
    _check_finite_rows(path, inputs)
    if targets is not None:
        if len(targets) != n:
            raise DataError(
                f"{path}: {n} input samples but {len(targets)} targets",
                hint="inputs and targets must have the same first dimension",
            )
        if targets.dtype.is_floating_point and not all(
            bool(torch.isfinite(chunk).all()) for _, chunk in targets.chunks()
        ):
            raise DataError(f"{path}: targets contain NaN or inf", hint="clean the data")
    log.debug("reading %d samples of shape %s from %s per batch", n, list(inputs.row_shape), path)
    return Dataset(inputs, targets, digest, path)


def _check_finite_rows(path: Path, inputs: Rows) -> None:
    if inputs.np_dtype is not None:
        floating = inputs.np_dtype.kind == "f"
    else:
        floating = inputs.st_dtype is not None and inputs.st_dtype.is_floating_point
    if not floating:
        return  # integers and booleans always cast to finite float32
    bad_count, first = 0, -1
    for start, chunk in inputs.chunks():
        finite = torch.isfinite(chunk.reshape(len(chunk), -1)).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten()
            bad_count += bad.numel()
            first = start + int(bad[0]) if first < 0 else first
    if bad_count:
        raise DataError(
            f"{path}: {bad_count} of {len(inputs)} samples have NaN or inf inputs "
            f"(first: sample {first})",
            hint="clean the data (a float32 cast turns values beyond 3.4e38 into inf)",
        )


def _unreadable(path: Path, e: BaseException) -> DataError:
    first = first_line(e, type(e).__name__)
    return DataError(
        f"cannot read data file {path}: {first}",
        hint="the file is corrupt or not in the format its extension says",
    )
