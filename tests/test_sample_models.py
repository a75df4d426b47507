"""The shipped sample models and data: strict loading, accuracy, data layout, split integrity."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sample_models import make_samples
from sample_models.digits_mlp import DigitsMLP, load_split, split_path
from sample_models.tabular_resnet import TabularResNet, load_calib

SAMPLES = Path(make_samples.__file__).resolve().parent
DIGITS_DATA = ["digits_train.npz", "digits_calib.npz", "digits_heldout.npz"]
BN_EPS = 1e-5  # nn.BatchNorm1d default, used by both sample models


def _load(model: torch.nn.Module, name: str) -> torch.nn.Module:
    result = model.load_state_dict(load_file(SAMPLES / name), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def _np_state(name: str) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(SAMPLES / name).items()}


def _ref_linear_bn_relu(x: np.ndarray, sd: dict[str, np.ndarray], lin: str, bn: str) -> np.ndarray:
    """Eval-mode Linear -> BatchNorm1d -> ReLU in float64, written out by hand."""
    h = x @ sd[f"{lin}.weight"].T + sd[f"{lin}.bias"]
    h = (h - sd[f"{bn}.running_mean"]) / np.sqrt(sd[f"{bn}.running_var"] + BN_EPS)
    return np.maximum(h * sd[f"{bn}.weight"] + sd[f"{bn}.bias"], 0.0)


def _digits_ref(x: np.ndarray) -> np.ndarray:
    sd = _np_state("digits_mlp.safetensors")
    h = _ref_linear_bn_relu(x, sd, "fc1", "bn1")
    h = _ref_linear_bn_relu(h, sd, "fc2", "bn2")
    return h @ sd["head.weight"].T + sd["head.bias"]


def _tabular_ref(x: np.ndarray, blocks: int = 2) -> np.ndarray:
    sd = _np_state("tabular_resnet.safetensors")
    h = _ref_linear_bn_relu(x, sd, "stem", "stem_bn")
    for i in range(blocks):
        p = f"blocks.{i}"
        inner = _ref_linear_bn_relu(h, sd, f"{p}.lin1", f"{p}.bn1")
        h = h + _ref_linear_bn_relu(inner, sd, f"{p}.lin2", f"{p}.bn2")
    return h @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize(
    ("model", "name"),
    [(DigitsMLP(), "digits_mlp.safetensors"), (TabularResNet(), "tabular_resnet.safetensors")],
)
def test_checkpoint_loads_strictly_with_pt_metadata(model: torch.nn.Module, name: str) -> None:
    _load(model, name)
    with safe_open(str(SAMPLES / name), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(model.state_dict())


def test_digits_heldout_accuracy_and_forward_match_float64_reference() -> None:
    with np.load(SAMPLES / "digits_heldout.npz") as data:
        inputs, targets = data["inputs"], data["targets"]
    model = _load(DigitsMLP(), "digits_mlp.safetensors")
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs)).double().numpy()
    ref = _digits_ref(inputs.astype(np.float64))
    # float32 forward vs float64 reference: logits are O(10), float32 rounding stays far below 1e-3
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=0)
    accuracy = float((ref.argmax(axis=1) == targets).mean())
    assert accuracy >= 0.93
    assert float((logits.argmax(axis=1) == targets).mean()) == accuracy


def test_tabular_forward_matches_float64_reference_and_beats_chance() -> None:
    inputs, targets = load_calib()
    model = _load(TabularResNet(), "tabular_resnet.safetensors")
    with torch.no_grad():
        logits = model(inputs).double().numpy()
    ref = _tabular_ref(inputs.double().numpy())
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=0)
    # 3 balanced-ish classes: chance is about 1/3
    assert float((ref.argmax(axis=1) == targets.numpy()).mean()) >= 0.75


@pytest.mark.parametrize("name", ["digits_mlp.safetensors", "tabular_resnet.safetensors"])
def test_bn_running_stats_were_trained(name: str) -> None:
    sd = load_file(SAMPLES / name)
    bns = sorted(k.removesuffix(".running_mean") for k in sd if k.endswith(".running_mean"))
    assert len(bns) == (2 if name.startswith("digits") else 5)
    for bn in bns:
        mean, var = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
        assert int(sd[f"{bn}.num_batches_tracked"]) > 0
        assert float(mean.abs().max()) > 0.05, f"{bn}.running_mean still at its init (0)"
        assert float((var - 1).abs().max()) > 0.05, f"{bn}.running_var still at its init (1)"
        assert bool((var > 0).all()) and bool(torch.isfinite(mean).all())


@pytest.mark.parametrize("name", [*DIGITS_DATA, "tabular_calib.npz"])
def test_data_files_have_design_layout(name: str) -> None:
    with np.load(SAMPLES / name) as data:
        assert sorted(data.files) == ["inputs", "targets"]
        inputs, targets = data["inputs"], data["targets"]
    assert inputs.dtype == np.float32 and targets.dtype == np.int64
    assert inputs.ndim == 2 and targets.ndim == 1 and inputs.shape[0] == targets.shape[0] > 0
    assert np.isfinite(inputs).all()
    if name.startswith("digits"):
        assert inputs.shape[1] == 64
        assert inputs.min() >= 0.0 and inputs.max() <= 1.0
        np.testing.assert_array_equal(inputs * 16, np.round(inputs * 16))  # pixel / 16 exactly
        assert set(np.unique(targets)) == set(range(10))
    else:
        assert inputs.shape == (256, 16)
        assert set(np.unique(targets)) == {0, 1, 2}


def test_digits_splits_are_disjoint_and_cover_all_samples() -> None:
    with np.load(SAMPLES / "digits.npz") as data:
        pixels, labels = data["pixels"], data["labels"]
        index = {s: data[f"{s}_index"] for s in ("train", "calib", "heldout")}
    assert pixels.shape == (1797, 64) and pixels.dtype == np.uint8 and pixels.max() == 16
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert {s: len(i) for s, i in index.items()} == {"train": 1197, "calib": 200, "heldout": 400}
    everything = np.concatenate(list(index.values()))
    assert len(np.unique(everything)) == 1797 == len(everything)
    np.testing.assert_array_equal(np.sort(everything), np.arange(1797))
    for split, idx in index.items():
        inputs, targets = load_split(split)
        np.testing.assert_array_equal(inputs.numpy(), pixels[idx].astype(np.float32) / 16)
        np.testing.assert_array_equal(targets.numpy(), labels[idx].astype(np.int64))
        assert inputs.dtype == torch.float32 and targets.dtype == torch.int64
        with np.load(split_path(split)) as shipped:
            np.testing.assert_array_equal(shipped["inputs"], inputs.numpy())
            np.testing.assert_array_equal(shipped["targets"], targets.numpy())


def test_load_split_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="heldout"):
        load_split("test")


@pytest.mark.parametrize(("model", "width"), [(DigitsMLP(), 64), (TabularResNet(), 16)])
def test_example_inputs_run(model: torch.nn.Module, width: int) -> None:
    (x,) = model.example_inputs()
    assert x.shape == (8, width) and x.dtype == torch.float32
    assert model.eval()(x).shape[0] == 8


def test_tabular_resnet_constructor_args() -> None:
    model = TabularResNet(in_features=5, width=7, blocks=3, out_features=2).eval()
    assert len(model.blocks) == 3
    assert model(torch.zeros(4, 5)).shape == (4, 2)


def test_save_npz_is_reproducible(tmp_path: Path) -> None:
    arrays = {"inputs": np.arange(12, dtype=np.float32).reshape(3, 4), "targets": np.arange(3)}
    make_samples.save_npz(tmp_path / "a.npz", arrays)
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert {i.date_time for i in zf.infolist()} == {make_samples.ZIP_EPOCH}
    with np.load(tmp_path / "a.npz") as data:
        for key, value in arrays.items():
            np.testing.assert_array_equal(data[key], value)
            assert data[key].dtype == value.dtype


def test_shipped_npz_members_have_fixed_timestamps_and_total_size_is_small() -> None:
    for name in make_samples.OUTPUTS:
        if name.endswith(".npz"):
            with zipfile.ZipFile(SAMPLES / name) as zf:
                assert {i.date_time for i in zf.infolist()} == {make_samples.ZIP_EPOCH}
    assert sum((SAMPLES / n).stat().st_size for n in make_samples.OUTPUTS) < 1_000_000
