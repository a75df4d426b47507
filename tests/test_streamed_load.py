"""`load_model(..., keep_tensors=False)` (what `prepare` uses): a safetensors checkpoint read module
by module into the built model must give exactly the model the whole-file load gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qatconv import api, checkpoint
from qatconv.config import ModelConfig
from qatconv.errors import CheckpointError

MODEL = """
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.bn1(self.fc1(x)).relu())
"""


def _trained_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict unlike any fresh initialization (so a skipped load would show)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "fc1.weight": torch.randn(5, 6, generator=g), "fc1.bias": torch.randn(5, generator=g),
        "bn1.weight": torch.randn(5, generator=g), "bn1.bias": torch.randn(5, generator=g),
        "bn1.running_mean": torch.randn(5, generator=g),
        "bn1.running_var": torch.rand(5, generator=g) + 0.5,
        "bn1.num_batches_tracked": torch.tensor(11),
        "fc2.weight": torch.randn(3, 5, generator=g), "fc2.bias": torch.randn(3, generator=g),
    }  # fmt: skip
    return sd


@pytest.fixture
def spec(tmp_path: Path) -> str:
    (tmp_path / "net.py").write_text(MODEL)
    return f"{tmp_path / 'net.py'}:Net"


def _both(spec: str, weights: Path) -> tuple[api.LoadedModel, api.LoadedModel]:
    cfg = ModelConfig(spec=spec, weights=weights)
    return api.load_model(cfg), api.load_model(cfg, keep_tensors=False)


def _assert_same_model(whole: nn.Module, streamed: nn.Module) -> None:
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_single_file_loads_the_same_model(spec: str, tmp_path: Path) -> None:
    sd = _trained_state()
    save_file(sd, tmp_path / "w.safetensors")
    whole, streamed = _both(spec, tmp_path / "w.safetensors")
    _assert_same_model(whole.model, streamed.model)
    for k, v in sd.items():  # and both hold the checkpoint, not an initialization
        assert torch.equal(streamed.model.state_dict()[k], v), k
    assert streamed.tensors == {}
    assert streamed.source_dtypes == {torch.float32}
    assert not streamed.model.training


def test_sharded_index_and_stripped_prefix(spec: str, tmp_path: Path) -> None:
    sd = {f"module.{k}": v for k, v in _trained_state(1).items()}
    names = sorted(sd)
    shards = {"a.safetensors": names[:4], "b.safetensors": names[4:]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / file)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        k: file for file, keys in shards.items() for k in keys}}))
    whole, streamed = _both(spec, index)
    _assert_same_model(whole.model, streamed.model)
    assert streamed.notes == whole.notes  # the shard count and the prefix stripped, said once
    assert any("module." in n for n in streamed.notes)


def test_half_precision_checkpoint_reports_its_dtype(spec: str, tmp_path: Path) -> None:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in _trained_state(2).items()}
    save_file(sd, tmp_path / "w16.safetensors")
    whole, streamed = _both(spec, tmp_path / "w16.safetensors")
    _assert_same_model(whole.model, streamed.model)
    assert streamed.source_dtypes == {torch.float16}
    assert {t.dtype for t in whole.tensors.values() if t.is_floating_point()} == {torch.float16}


def test_each_tensor_is_read_once_module_by_module(spec: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    save_file(_trained_state(), tmp_path / "w.safetensors")
    reads: list[str] = []
    original = checkpoint.LazyCheckpoint.read

    def read(self: checkpoint.LazyCheckpoint, name: str) -> torch.Tensor:
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(checkpoint.LazyCheckpoint, "read", read)
    api.load_model(ModelConfig(spec=spec, weights=tmp_path / "w.safetensors"), keep_tensors=False)
    assert sorted(reads) == sorted(_trained_state())
    # grouped by module: once a module's tensors are read, none of its keys comes back later
    modules = [name.rpartition(".")[0] for name in reads]
    assert modules == sorted(modules, key=modules.index)


def test_wrong_checkpoint_fails_as_the_whole_load_does(spec: str, tmp_path: Path) -> None:
    sd = _trained_state()
    sd["fc2.weight"] = torch.zeros(4, 5)
    del sd["fc1.bias"]
    save_file(sd, tmp_path / "bad.safetensors")
    cfg = ModelConfig(spec=spec, weights=tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as whole:
        api.load_model(cfg)
    with pytest.raises(CheckpointError) as streamed:
        api.load_model(cfg, keep_tensors=False)
    assert streamed.value.message == whole.value.message
    assert "fc1.bias" in streamed.value.message and "mis-shaped" in streamed.value.message


def test_truncated_checkpoint_is_a_checkpoint_error(spec: str, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(_trained_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16])
    with pytest.raises(CheckpointError):
        api.load_model(ModelConfig(spec=spec, weights=path), keep_tensors=False)
