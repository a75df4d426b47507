"""Calibration / check data files -> a `Dataset` of float32 inputs and optional targets.

Formats (the first dimension is always the sample axis):
``.safetensors`` / ``.pt`` (a tensor dict, ``weights_only``) / ``.npz`` with ``inputs`` (or ``x``)
and optionally ``targets`` (or ``y``); ``.npy`` (inputs only); ``.csv`` with a header row and
numeric cells, ``--target-column NAME`` split off as targets. Every problem is a `DataError`
(exit 3) with one line saying where.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qatconv.errors import CheckpointError, DataError, UsageError

log = logging.getLogger(__name__)

INPUT_KEYS = ("inputs", "x")
TARGET_KEYS = ("targets", "y")
SUFFIXES = (".safetensors", ".pt", ".npz", ".npy", ".csv")
_CHUNK = 1 << 20


@dataclass
class Dataset:
    """Samples along the first dimension of ``inputs`` (float32) and ``targets`` (if any).

    Attributes:
        inputs: float32, finite, shape ``(N, ...)``.
        targets: ``(N, ...)`` int64 (class labels) or float32; None when the file has none.
        sha256: hex digest of the file's bytes (recorded in checkpoint metadata).
        path: the file read.
    """

    inputs: torch.Tensor
    targets: torch.Tensor | None
    sha256: str
    path: Path

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


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
    if suffix == ".csv":
        inputs, targets = _read_csv(path, target_column)
    elif suffix == ".npy":
        inputs, targets = _read_npy(path), None
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
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
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


def _read_tensor_dict(path: Path, suffix: str) -> Mapping[str, Any]:
    if suffix == ".safetensors":
        from qatconv import checkpoint

        try:
            return checkpoint._read_st_tensors(path)[1]
        except CheckpointError as e:
            raise DataError(e.message, hint=e.hint) from None
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


def _unreadable(path: Path, e: BaseException) -> DataError:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return DataError(
        f"cannot read data file {path}: {first}",
        hint="the file is corrupt or not in the format its extension says",
    )
