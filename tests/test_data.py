"""Tests for qatconv.data: every format, the CSV rules, and each DataError."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qatconv.data import Dataset, check_features, load_data
from qatconv.errors import DataError, UsageError

REPO = Path(__file__).resolve().parents[1]


def sample() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((6, 3)), rng.integers(0, 4, size=6)


def check(ds: Dataset, path: Path, x: np.ndarray, y: np.ndarray | None) -> None:
    assert ds.path == path
    assert len(ds) == x.shape[0]
    assert ds.inputs.dtype == torch.float32
    assert not ds.lazy  # small files are read whole (tests/test_data_lazy.py: per batch)
    assert torch.equal(ds.inputs[:], torch.from_numpy(x.astype(np.float32)))
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    if y is None:
        assert ds.targets is None
    else:
        assert ds.targets is not None
        expect = torch.from_numpy(y)
        expect = expect.float() if expect.is_floating_point() else expect.long()
        assert ds.targets.dtype == expect.dtype
        assert torch.equal(ds.targets[:], expect)


def data_error(path: Path, **kwargs: str) -> DataError:
    with pytest.raises(DataError) as info:
        load_data(path, **kwargs)
    assert info.value.exit_code == 3
    assert "\n" not in info.value.message
    return info.value


# ------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("names", [("inputs", "targets"), ("x", "y")])
def test_npz(tmp_path: Path, names: tuple[str, str]) -> None:
    x, y = sample()
    path = tmp_path / "d.npz"
    np.savez(path, **{names[0]: x, names[1]: y})
    check(load_data(path), path, x, y)


def test_npz_inputs_only_and_float_targets(tmp_path: Path) -> None:
    x, _ = sample()
    path = tmp_path / "d.npz"
    np.savez(path, inputs=x)
    check(load_data(path), path, x, None)
    soft = np.linspace(0, 1, 6)
    np.savez(path, inputs=x, targets=soft)
    check(load_data(path), path, x, soft)


def test_npy(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.uint8).reshape(4, 2, 3)  # integer pixels become float32
    path = tmp_path / "d.npy"
    np.save(path, x)
    check(load_data(path), path, x, None)


def test_safetensors(tmp_path: Path) -> None:
    x, y = sample()
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.from_numpy(x), "targets": torch.from_numpy(y)}, str(path))
    check(load_data(path), path, x, y)


def test_pt_dict_and_bare_tensor(tmp_path: Path) -> None:
    x, y = sample()
    path = tmp_path / "d.pt"
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    check(load_data(path), path, x, y)
    torch.save(torch.from_numpy(x), path)
    check(load_data(path), path, x, None)


def test_pt_needing_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    torch.save({"inputs": np.ones((2, 2))}, path)
    data_error(path)


def test_shipped_calibration_data() -> None:
    path = REPO / "sample_models" / "digits_calib.npz"
    ds = load_data(path)
    with np.load(path) as raw:
        check(ds, path, raw["inputs"], raw["targets"])


# ------------------------------------------------------------------------------------------ CSV


def test_csv_with_integer_target(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label,b\n1,0,2.5\n-3, 2 ,4e1\n\n0.5,1,-1\n")
    ds = load_data(path, target_column="label")
    x = np.array([[1, 2.5], [-3, 40], [0.5, -1]])
    check(ds, path, x, np.array([0, 2, 1], dtype=np.int64))


def test_csv_with_float_target_and_no_target(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,price\r\n1,2,0.5\r\n3,4,1\r\n")
    check(load_data(path, target_column="price"), path, np.array([[1, 2], [3, 4.0]]),
          np.array([0.5, 1.0]))  # fmt: skip
    check(load_data(path), path, np.array([[1, 2, 0.5], [3, 4, 1.0]]), None)


def test_csv_utf8_bom_header(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffa,y\n1,0\n".encode())
    ds = load_data(path, target_column="y")
    assert ds.targets is not None and ds.targets.tolist() == [0]


def test_csv_text_cell_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("age,city,y\n31,7,1\n40,paris,0\n")
    err = data_error(path, target_column="y")
    assert "line 3, column 'city'" in err.message and "'paris' is not a number" in err.message


def test_csv_text_in_target_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,y\n1,cat\n")
    assert "column 'y'" in data_error(path, target_column="y").message


def test_csv_empty_cell(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n3,\n")
    assert "line 3, column 'b': is empty" in data_error(path).message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1,2\n3,4\n", "looks like data"),
        ("a,b\n", "zero samples"),
        ("a,b\n1,2,3\n", "line 2: 3 cells"),
        ("a,a\n1,2\n", "more than once"),
        ("\n\n", "is empty"),
    ],
    ids=["no-header", "header-only", "ragged", "dup-columns", "blank"],
)
def test_csv_structure_errors(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(text)
    assert words in data_error(path).message


def test_csv_target_column_problems(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    assert "no column 'label'" in data_error(path, target_column="label").message
    only = tmp_path / "only.csv"
    only.write_text("y\n1\n")
    assert "no input columns" in data_error(only, target_column="y").message


def test_target_column_only_for_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.ones((2, 2)))
    with pytest.raises(UsageError):
        load_data(path, target_column="y")


# ---------------------------------------------------------------------------------------- errors


def test_missing_empty_unknown(tmp_path: Path) -> None:
    assert "does not exist" in data_error(tmp_path / "nope.npz").message
    empty = tmp_path / "d.npz"
    empty.write_bytes(b"")
    assert "is empty" in data_error(empty).message
    other = tmp_path / "d.parquet"
    other.write_bytes(b"PAR1")
    assert "unknown data extension" in data_error(other).message
    assert "not a file" in data_error(tmp_path).message


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".pt", ".safetensors"])
def test_corrupt_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\x93NUMPY garbage that is not a real file" * 3)
    data_error(path)


def test_missing_inputs_key(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, features=np.ones((2, 2)), targets=np.zeros(2))
    err = data_error(path)
    assert "no 'inputs'" in err.message and "features" in err.message


def test_zero_samples_and_scalar(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.ones((0, 3)))
    assert "zero samples" in data_error(path).message
    np.save(path, np.float32(3))
    assert "single number" in data_error(path).message


def test_mismatched_lengths(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.ones((4, 2)), targets=np.zeros(3))
    assert "4 input samples but 3 targets" in data_error(path).message


@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, -np.inf, 1e39], ids=["nan", "inf", "-inf", "overflow"]
)
def test_non_finite_inputs(tmp_path: Path, bad: float) -> None:
    x = np.ones((5, 2))
    x[3, 1] = bad
    path = tmp_path / "d.npy"
    np.save(path, x)
    err = data_error(path)
    assert "1 of 5 samples" in err.message and "sample 3" in err.message


def test_non_numeric_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.array([["a", "b"]]))
    assert "not numbers" in data_error(path).message


# --------------------------------------------------------------------------------- check_features


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_check_features(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.ones((4, 3)))
    model = Tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_features(load_data(path), model)
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN statistics untouched
    np.save(path, np.ones((4, 5)))
    with pytest.raises(DataError, match=r"shape \[5\]") as info:
        check_features(load_data(path), model, "expected [N, 3]")
    assert "expected [N, 3]" in (info.value.hint or "")


def test_big_endian_and_fortran_arrays(tmp_path: Path) -> None:
    x = np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3))
    path = tmp_path / "d.npz"
    np.savez(path, inputs=x, targets=np.array([1, 0], dtype=">i4"))
    check(load_data(path), path, x.astype(np.float64), np.array([1, 0]))
