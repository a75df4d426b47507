"""`.npy` / `.safetensors` data read per batch (`qatconv.data.Rows`) against whole-file reads.

The reference for every value is the file read whole by numpy or the safetensors library and
cast the way `_finish` casts (native byte order, then float32 inputs / int64 or float32
targets): the lazy rows must equal it exactly (atol=0), for any index order.

Such files up to `qatconv.data.WHOLE_MAX_BYTES` are read whole; this module sets it to 0 so its small
files take the per-batch path, except the tests of the limit itself at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qatconv import api, qat
from qatconv import data as data_mod
from qatconv.config import Loss, Mode, ModelConfig, TrainConfig
from qatconv.data import Rows, load_data
from qatconv.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
# Unsorted, repeated and negative rows: a shuffled batch reads like this.
INDEX = [5, 0, 7, 7, -1, 3, 2, 6]


@pytest.fixture(autouse=True)
def read_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file here, however small, is read per batch (unless a test sets the limit)."""
    monkeypatch.setattr(data_mod, "WHOLE_MAX_BYTES", 0)


def eager_npy(path: Path) -> torch.Tensor:
    x = np.load(path)
    return torch.from_numpy(x.astype(x.dtype.newbyteorder("="))).to(torch.float32)


def assert_rows_equal(rows: Rows, expect: torch.Tensor) -> None:
    assert isinstance(rows, Rows)
    assert rows.shape == expect.shape and rows.dtype == expect.dtype
    assert torch.equal(rows[:], expect)
    assert torch.equal(rows[2:5], expect[2:5])
    assert torch.equal(rows[1:8:3], expect[1:8:3])
    assert torch.equal(rows[-2], expect[-2])
    assert torch.equal(rows[torch.tensor(INDEX)], expect[torch.tensor(INDEX)])
    assert torch.equal(rows[[]], expect[torch.tensor([], dtype=torch.long)])
    assert torch.equal(torch.cat([c for _, c in rows.chunks(3)]), expect)
    assert torch.equal(rows.to(torch.float64)[INDEX], expect[INDEX].to(torch.float64))


@pytest.mark.parametrize(
    "dtype", ["<f4", ">f4", "<f8", "<f2", "|u1", "<i4", ">i8", "|b1"],
)
def test_npy_rows_equal_the_whole_array(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((9, 2, 3)) * 50).astype(dtype)
    path = tmp_path / "d.npy"
    np.save(path, x)
    ds = load_data(path)
    assert ds.lazy and ds.targets is None
    assert_rows_equal(ds.inputs, eager_npy(path))


def test_fortran_npy_is_read_whole(tmp_path: Path) -> None:
    x = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    path = tmp_path / "d.npy"
    np.save(path, x)
    ds = load_data(path)
    assert not ds.lazy
    assert torch.equal(ds.inputs, torch.from_numpy(np.ascontiguousarray(x)))


@pytest.mark.parametrize(
    ("x_dtype", "y"),
    [
        (torch.float32, torch.arange(9) % 4),
        (torch.bfloat16, torch.linspace(0, 1, 9, dtype=torch.float64)),
        (torch.float16, (torch.arange(9) % 3).to(torch.int32)),
        (torch.int16, None),
    ],
)
def test_safetensors_rows_equal_the_whole_tensors(
    tmp_path: Path, x_dtype: torch.dtype, y: torch.Tensor | None
) -> None:
    x = (torch.randn(9, 5, generator=torch.Generator().manual_seed(2)) * 40).to(x_dtype)
    path = tmp_path / "d.safetensors"
    # An unrelated tensor first in the file: rows are found by the header's offsets.
    save_file({"aaa": torch.ones(3), "inputs": x, **({"targets": y} if y is not None else {})},
              str(path))
    ds = load_data(path)
    whole = load_file(str(path))
    assert ds.lazy
    assert_rows_equal(ds.inputs, whole["inputs"].to(torch.float32))
    if y is None:
        assert ds.targets is None
        return
    assert ds.targets is not None
    base = torch.float32 if y.is_floating_point() else torch.int64
    assert_rows_equal(ds.targets, whole["targets"].to(base))


def test_rows_are_read_from_the_file_on_each_access(tmp_path: Path) -> None:
    """Nothing is held in memory: rows written into the file after loading are what is read."""
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((1000, 4), dtype=np.float32))
    ds = load_data(path)
    raw = bytearray(path.read_bytes())
    offset = len(raw) - 1000 * 16
    raw[offset + 999 * 16 : offset + 999 * 16 + 4] = np.float32(7).tobytes()
    with open(path, "r+b") as f:  # in place: the open descriptor sees it
        f.write(raw)
    assert float(ds.inputs[999][0]) == 7.0
    with open(path, "r+b") as f:
        f.truncate(offset + 10 * 16)
    with pytest.raises(DataError, match="ended early"):
        ds.inputs[[3, 500]]


def test_lazy_validation_matches_the_eager_messages(tmp_path: Path) -> None:
    x = np.ones((5000, 4))
    x[[1234, 4321], 1] = [np.nan, 1e39]  # 1e39 is inf once cast to float32
    path = tmp_path / "d.npy"
    np.save(path, x)
    with pytest.raises(DataError, match=r"2 of 5000 samples have NaN or inf inputs \(first: "
                       r"sample 1234\)"):
        load_data(path)
    st = tmp_path / "d.safetensors"
    save_file({"inputs": torch.ones(4, 2), "targets": torch.zeros(3)}, str(st))
    with pytest.raises(DataError, match="4 input samples but 3 targets"):
        load_data(st)
    save_file({"inputs": torch.ones(4, 2), "targets": torch.tensor([0, 1, float("inf"), 2])},
              str(st))
    with pytest.raises(DataError, match="targets contain NaN or inf"):
        load_data(st)
    save_file({"inputs": torch.tensor(3.0)}, str(st))
    with pytest.raises(DataError, match="single number"):
        load_data(st)
    save_file({"features": torch.ones(4, 2)}, str(st))
    with pytest.raises(DataError, match="no 'inputs'"):
        load_data(st)
    np.save(path, np.array([1 + 2j, 3j]))
    with pytest.raises(DataError, match="not numbers"):
        load_data(path)


def test_sha256_is_the_files(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "d.npy"
    np.save(path, np.arange(300, dtype=np.float32).reshape(100, 3))
    assert load_data(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------- prepare on lazy vs eager data


def digits(tmp_path: Path) -> tuple[Path, Path]:
    with np.load(SAMPLES / "digits_calib.npz") as z:
        x, y = z["inputs"].astype(np.float32), z["targets"].astype(np.int64)
    st = tmp_path / "d.safetensors"
    save_file({"inputs": torch.from_numpy(x), "targets": torch.from_numpy(y)}, str(st))
    npz = tmp_path / "d.npz"
    np.savez(npz, inputs=x, targets=y)
    return st, npz


@pytest.mark.parametrize(
    "train",
    [
        TrainConfig(),
        TrainConfig(Mode.finetune, steps=6, batch_size=32),
        TrainConfig(Mode.finetune, steps=6, batch_size=32, loss=Loss.cross_entropy,
                    recalibrate_bn=True),
    ],
    ids=["calibrate", "distill", "cross-entropy+recalibrate"],
)
def test_prepare_on_lazy_data_writes_the_same_file(tmp_path: Path, train: TrainConfig) -> None:
    """The same samples as .safetensors (read per batch) and .npz (loaded whole): same bytes
    apart from the data file's sha256 in the metadata."""
    st, npz = digits(tmp_path)
    cfg = ModelConfig(f"{SAMPLES / 'digits_mlp.py'}:DigitsMLP",
                      weights=SAMPLES / "digits_mlp.safetensors")
    outs = []
    for data in (st, npz):
        out = tmp_path / f"{data.suffix[1:]}.safetensors"
        api.prepare(cfg, data, out, train=train)
        outs.append(out)
    lazy, eager = (load_file(str(o)) for o in outs)
    assert lazy.keys() == eager.keys()
    for k in lazy:
        assert torch.equal(lazy[k], eager[k]), k
    from qatconv.checkpoint import read_metadata

    meta = [read_metadata(o) for o in outs]
    assert meta[0].pop("data_sha256") != meta[1].pop("data_sha256")
    assert json.dumps(meta[0], sort_keys=True) == json.dumps(meta[1], sort_keys=True)


def test_metrics_stream_beyond_the_memory_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past METRICS_IN_MEMORY_BYTES the metrics come from float64 sums per batch: equal to the
    whole-output formulas (computed here from both models' outputs) up to summation order, for
    one output and for several."""
    from sample_models.digits_mlp import DigitsMLP
    from tests.models import structured as st

    torch.manual_seed(0)
    for model, x in ((DigitsMLP().eval(), torch.randn(300, 64)),
                     (st.randomize_bn_(st.SimSiamHead()).eval(), torch.randn(300, 12))):
        noisy = qat.deepcopy_model(model)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        whole = qat.simulated_metrics(noisy, model, x, batch_size=64)
        monkeypatch.setattr(qat, "METRICS_IN_MEMORY_BYTES", 0)
        streamed = qat.simulated_metrics(noisy, model, x, batch_size=64)
        monkeypatch.undo()
        with torch.no_grad():
            q, f = noisy(x), model(x)
        leaves = list(zip(q, f)) if isinstance(q, tuple) else [(q, f)]
        d2 = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in leaves)
        f2 = sum(float((b.double() ** 2).sum()) for _, b in leaves)
        for got in (whole, streamed):
            assert got["relative_mse"] == pytest.approx(d2 / f2, rel=1e-12)
        if len(leaves) == 1:
            agree = float((q.argmax(1) == f.argmax(1)).double().mean())
            assert streamed["top1_agreement"] == whole["top1_agreement"] == agree
        else:
            assert streamed["outputs"].keys() == whole["outputs"].keys() == {"[0]", "[1]"}
            for name, (a, b) in zip(["[0]", "[1]"], leaves):
                rel = float(((a.double() - b.double()) ** 2).sum() / (b.double() ** 2).sum())
                assert streamed["outputs"][name]["relative_mse"] == pytest.approx(rel, rel=1e-12)


# ------------------------------------------------------------- small files are read whole


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "|u1", "<i2", "|b1"])
def test_small_npy_loads_as_the_array_numpy_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  dtype: str) -> None:
    monkeypatch.setattr(data_mod, "WHOLE_MAX_BYTES", 64 << 20)  # the shipped limit
    x = (np.random.default_rng(3).standard_normal((40, 3, 2)) * 50).astype(dtype)
    path = tmp_path / "d.npy"
    np.save(path, x)
    ds = load_data(path)
    assert not ds.lazy and isinstance(ds.inputs, torch.Tensor)
    expect = torch.from_numpy(np.load(path).astype(np.float32))
    assert ds.inputs.dtype == torch.float32 and torch.equal(ds.inputs, expect)


def test_small_safetensors_loads_as_the_tensors_safetensors_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(data_mod, "WHOLE_MAX_BYTES", 64 << 20)
    g = torch.Generator().manual_seed(4)
    path = tmp_path / "d.safetensors"
    save_file({"aaa": torch.ones(3), "inputs": torch.randn(30, 5, generator=g).half(),
               "targets": torch.randint(0, 9, (30,), generator=g).to(torch.int32)}, str(path))
    ds = load_data(path)
    whole = load_file(str(path))
    assert not ds.lazy and isinstance(ds.targets, torch.Tensor)
    assert torch.equal(ds.inputs, whole["inputs"].float())
    assert ds.targets.dtype == torch.int64 and torch.equal(ds.targets, whole["targets"].long())


def test_the_limit_counts_inputs_and_targets_as_held_in_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """uint8 pixels become float32 (4 bytes each) and int32 labels int64: that is what counts."""
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.zeros(10, 4, dtype=torch.uint8),
               "targets": torch.zeros(10, dtype=torch.int32)}, str(path))
    held = 10 * 4 * 4 + 10 * 8
    for limit, lazy in ((held, False), (held - 1, True)):
        monkeypatch.setattr(data_mod, "WHOLE_MAX_BYTES", limit)
        assert load_data(path).lazy is lazy
