"""Tests for qatconv.checkpoint: every reader, container, prefix, refusal and the atomic writer.

The reference for every read is the tensor that was saved (compared with ``torch.equal``, exact);
the reference for every write is the safetensors library's own reader.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qatconv import checkpoint as ck
from qatconv.checkpoint import (
    align_state_dict,
    check_output_path,
    checkpoint_files,
    load_checkpoint,
    load_into,
    read_metadata,
    write_safetensors,
)
from qatconv.errors import CheckpointError, OutputError


class TinyNet(nn.Module):
    """Linear -> BatchNorm1d -> Linear: the smallest model with a foldable pair."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc(x)))

    @staticmethod
    def example_inputs() -> tuple[torch.Tensor]:
        return (torch.randn(5, 3, generator=torch.Generator().manual_seed(0)),)


class Wrapper(nn.Module):
    """A model whose own keys start with ``model.``: stripping that prefix must not happen."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k, value in a.items():
        assert value.dtype == b[k].dtype, k
        assert torch.equal(value, b[k]), k


# ------------------------------------------------------------------------------ safetensors


def test_safetensors_roundtrip_all_dtypes(tmp_path: Path) -> None:
    tensors = {
        "f64": torch.randn(2, 3, dtype=torch.float64),
        "f32": torch.randn(4),
        "f16": torch.randn(3).half(),
        "bf16": torch.randn(5).bfloat16(),
        "i64": torch.arange(3),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([255], dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6)[:, ::2],  # non-contiguous
    }
    out = tmp_path / "x.safetensors"
    write_safetensors(tensors, out, {"qatconv": json.dumps({"stage": "qat"})})
    reference = load_file(str(out))
    assert_same(reference, {k: v.contiguous() for k, v in tensors.items()})
    loaded = load_checkpoint(out)
    assert loaded.format == "safetensors"
    assert loaded.files == [out]
    assert loaded.module is None
    assert_same(loaded.tensors, reference)
    assert loaded.metadata == {"format": "pt", "qatconv": '{"stage": "qat"}'}


def test_written_header_is_sorted_and_aligned(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    tensors = {"b": torch.ones(3, dtype=torch.int8), "a": torch.ones(2, dtype=torch.float64),
               "c": torch.ones(1, dtype=torch.float16)}  # fmt: skip
    write_safetensors(tensors, out, {"z": "1", "a": "2"})
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert list(header["__metadata__"]) == ["a", "format", "z"]
    offsets = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    # largest elements first, so each tensor starts at a multiple of its element size
    assert offsets == {"a": 0, "c": 16, "b": 18}


def test_written_bytes_match_safetensors_library(tmp_path: Path) -> None:
    # With only the "format" metadata key (no ordering question) the bytes are the library's.
    tensors = {
        "w": torch.randn(3, 2),
        "idx": torch.arange(4),
        "half": torch.randn(3).half(),
        "bf": torch.randn(2).bfloat16(),
        "flag": torch.tensor([True]),
        "n": torch.tensor(5, dtype=torch.int32),
        "q": torch.tensor([-3], dtype=torch.int8),
    }
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(tensors, ours, {})
    save_file(tensors, str(theirs), metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_write_is_deterministic(tmp_path: Path) -> None:
    tensors = trained_state()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(tensors, a, {"x": "1", "y": "2", "qatconv": "{}"})
    reordered = dict(reversed(list(tensors.items())))
    write_safetensors(reordered, b, {"qatconv": "{}", "y": "2", "x": "1"})
    assert a.read_bytes() == b.read_bytes()


def test_format_pt_always_set(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    write_safetensors({"w": torch.ones(1)}, out, {"format": "np"})
    assert read_metadata(out) == {}
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_write_tied_tensors(tmp_path: Path) -> None:
    shared = torch.randn(3, 3)
    out = tmp_path / "x.safetensors"
    write_safetensors({"a": shared, "b": shared, "c": shared[0]}, out, {})
    ref = load_file(str(out))
    assert torch.equal(ref["a"], shared) and torch.equal(ref["b"], shared)
    assert torch.equal(ref["c"], shared[0])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda raw: raw[:-3],  # truncated data
        lambda raw: raw[:5],  # truncated length prefix
        lambda raw: struct.pack("<Q", 10**12) + raw[8:],  # header length beyond the file
        lambda raw: raw[:8] + b"{not json" + raw[17:],
        lambda raw: b"",
    ],
    ids=["truncated", "short", "huge-header", "bad-json", "empty"],
)
def test_corrupt_safetensors_is_checkpoint_error(tmp_path: Path, mutate: object) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mutate(good.read_bytes()))  # type: ignore[operator]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert info.value.exit_code == 3


def test_empty_safetensors_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    write_safetensors({}, out, {})
    with pytest.raises(CheckpointError, match="no tensors"):
        load_checkpoint(out)


# ---------------------------------------------------------------------------------- sharded


def write_shards(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    names = sorted(state)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half],
             "model-00002-of-00002.safetensors": names[half:]}  # fmt: skip
    weight_map = {}
    for shard, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))
    return index


def test_sharded_index_and_folder(tmp_path: Path) -> None:
    state = trained_state()
    index = write_shards(tmp_path, state)
    for target in (index, tmp_path):
        loaded = load_checkpoint(target)
        assert loaded.format == "safetensors-sharded"
        assert_same(loaded.tensors, state)
        assert loaded.files == [
            index,
            tmp_path / "model-00001-of-00002.safetensors",
            tmp_path / "model-00002-of-00002.safetensors",
        ]
        assert loaded.metadata["total_size"] == "123"
        assert loaded.metadata["format"] == "pt"
    assert checkpoint_files(tmp_path) == loaded.files


def test_sharded_missing_shard(tmp_path: Path) -> None:
    index = write_shards(tmp_path, trained_state())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(index)


def test_sharded_index_names_absent_tensor(tmp_path: Path) -> None:
    index = write_shards(tmp_path, trained_state())
    obj = json.loads(index.read_text())
    obj["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(obj))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        load_checkpoint(index)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"metadata": {}}),
        json.dumps({"weight_map": {"a": "../x.safetensors"}}),
    ],
    ids=["bad-json", "no-weight-map", "escaping-path"],
)
def test_bad_index(tmp_path: Path, text: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError):
        load_checkpoint(index)


def test_folder_with_one_safetensors(tmp_path: Path) -> None:
    state = trained_state()
    save_file(state, str(tmp_path / "weights.safetensors"))
    assert_same(load_checkpoint(tmp_path).tensors, state)


def test_folder_ambiguous_or_empty(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_checkpoint(tmp_path)
    save_file({"a": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"a": torch.ones(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="2 .safetensors files"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------ torch


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_plain_state_dict(tmp_path: Path, suffix: str) -> None:
    state = trained_state()
    path = tmp_path / f"w{suffix}"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert loaded.format == "torch" and loaded.module is None and loaded.notes == []
    assert loaded.files == [path]
    assert_same(loaded.tensors, state)


def test_torch_legacy_serialization(tmp_path: Path) -> None:
    state = trained_state()
    path = tmp_path / "w.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_same(load_checkpoint(path).tensors, state)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "module"])
def test_container_keys(tmp_path: Path, key: str) -> None:
    state = trained_state()
    opt = torch.optim.SGD(TinyNet().parameters(), lr=0.1).state_dict()
    path = tmp_path / "w.ckpt"
    torch.save({"epoch": 3, key: state, "optimizer_state_dict": opt, "note": "hi"}, path)
    loaded = load_checkpoint(path)
    assert_same(loaded.tensors, state)
    assert loaded.notes[0].startswith(f"unwrapped container key {key!r}")
    assert "epoch" in loaded.notes[0] and "optimizer_state_dict" in loaded.notes[0]


def test_nested_containers(tmp_path: Path) -> None:
    state = trained_state()
    path = tmp_path / "w.pt"
    torch.save({"model": {"state_dict": state}}, path)
    loaded = load_checkpoint(path)
    assert_same(loaded.tensors, state)
    assert loaded.notes == [
        "unwrapped container key 'model'",
        "unwrapped container key 'state_dict'",
    ]


def test_state_dict_with_tensor_named_like_container(tmp_path: Path) -> None:
    # A plain state dict whose keys happen to be "model"/"module": tensors, not containers.
    state = {"model": torch.ones(2), "module": torch.zeros(1)}
    path = tmp_path / "w.pt"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert_same(loaded.tensors, state)
    assert loaded.notes == []


def test_non_tensor_entries_dropped_with_note(tmp_path: Path) -> None:
    state = trained_state()
    path = tmp_path / "w.pt"
    torch.save({**state, "step": 10, "name": "run1"}, path)
    loaded = load_checkpoint(path)
    assert_same(loaded.tensors, state)
    assert loaded.notes == ["dropped 2 non-tensor entries: name, step"]


@pytest.mark.parametrize(
    "payload", [[1, 2], torch.ones(3), {"a": 1}], ids=["list", "tensor", "no-tensors"]
)
def test_torch_not_a_state_dict(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "w.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert info.value.exit_code == 3


def test_pickled_module_refused_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(TinyNet(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert info.value.exit_code == 3
    assert "TinyNet" in info.value.message
    assert info.value.hint is not None and "--trust-pickle" in info.value.hint


def test_pickled_module_with_trust(tmp_path: Path) -> None:
    net = TinyNet()
    net.load_state_dict(trained_state())
    net.train()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert isinstance(loaded.module, TinyNet)
    assert not loaded.module.training
    assert_same(loaded.tensors, trained_state())
    assert any("TinyNet" in n for n in loaded.notes)
    x = TinyNet.example_inputs()[0]
    assert torch.equal(loaded.module(x), net.eval()(x))


def test_pickled_module_inside_container_with_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.ckpt"
    torch.save({"model": TinyNet(), "epoch": 1}, path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert isinstance(loaded.module, TinyNet)
    assert sorted(loaded.tensors) == sorted(TinyNet().state_dict())


def test_trust_pickle_on_safe_file_changes_nothing(tmp_path: Path) -> None:
    state = trained_state()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert loaded.notes == []
    assert_same(loaded.tensors, state)


def test_pickle_with_numpy_refused(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "w.pt"
    torch.save({"w": np.ones(3)}, path)
    with pytest.raises(CheckpointError, match="needs code to unpickle"):
        load_checkpoint(path)


def test_unimportable_class_with_trust(tmp_path: Path) -> None:
    # The pickle names a class that cannot be found when loading: clear error, not AttributeError.
    path = tmp_path / "whole.pt"
    torch.save(TinyNet(), path)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"TinyNet", b"GoneNet"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, trust_pickle=True)
    assert info.value.hint is not None and "state_dict" in info.value.hint


def test_torchscript_archive(tmp_path: Path) -> None:
    path = tmp_path / "ts.pt"
    scripted = torch.jit.script(nn.Linear(2, 2))
    torch.jit.save(scripted, str(path))
    with pytest.raises(CheckpointError, match="TorchScript") as info:
        load_checkpoint(path)
    assert "--trust-pickle" in (info.value.hint or "")
    loaded = load_checkpoint(path, trust_pickle=True)
    assert torch.equal(loaded.tensors["weight"], scripted.weight)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world, not a pickle", b"PK\x03\x04garbage", b"\x80\x02}q\x00(X\x01\x00\x00\x00a"],
    ids=["empty", "text", "bad-zip", "cut-pickle"],
)
@pytest.mark.parametrize("trust", [False, True])
def test_garbage_torch_file(tmp_path: Path, content: bytes, trust: bool) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, trust_pickle=trust)
    assert info.value.exit_code == 3
    assert "\n" not in info.value.message


def test_truncated_torch_zip(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(trained_state(), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    other = tmp_path / "w.onnx"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint extension"):
        load_checkpoint(other)


# ------------------------------------------------------------------------- prefixes, load_into


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod.", "_orig_mod.module.",
               "model.module."],
)  # fmt: skip
def test_align_strips_prefixes(prefix: str) -> None:
    state = trained_state()
    wrapped = {prefix + k: v for k, v in state.items()}
    aligned, notes = align_state_dict(wrapped, state.keys())
    assert_same(aligned, state)
    stripped = [p + "." for p in prefix.rstrip(".").split(".")]
    assert notes == [f"stripped key prefix {p!r} from {len(state)} keys" for p in stripped]


def test_align_keeps_prefix_the_model_has() -> None:
    model_keys = Wrapper().state_dict().keys()
    state = {"model." + k: v for k, v in trained_state().items()}
    aligned, notes = align_state_dict(state, model_keys)
    assert aligned.keys() == state.keys() and notes == []
    # DDP around the wrapper: only "module." goes.
    aligned, notes = align_state_dict({"module." + k: v for k, v in state.items()}, model_keys)
    assert sorted(aligned) == sorted(model_keys)
    assert notes == [f"stripped key prefix 'module.' from {len(state)} keys"]


def test_align_partial_prefix_and_collision() -> None:
    state = trained_state()
    mixed = {("model." + k if k.startswith("fc") else k): v for k, v in state.items()}
    aligned, notes = align_state_dict(mixed, state.keys())
    assert_same(aligned, state)
    assert notes == ["stripped key prefix 'model.' from 2 keys"]
    # stripping would make "model.fc.weight" collide with "fc.weight": left alone
    collide = {**state, "model.fc.weight": state["fc.weight"]}
    aligned, notes = align_state_dict(collide, state.keys())
    assert aligned.keys() == collide.keys() and notes == []


def test_load_into_success() -> None:
    state = trained_state()
    net = TinyNet()
    load_into(net, state, "w.pt")
    assert_same({k: v for k, v in net.state_dict().items()}, state)


def test_load_into_tolerates_missing_num_batches_tracked() -> None:
    state = {k: v for k, v in trained_state().items() if not k.endswith("num_batches_tracked")}
    net = TinyNet()
    load_into(net, state, "old.pt")
    assert torch.equal(net.fc.weight, state["fc.weight"])


def test_load_into_mismatch_lists_keys() -> None:
    state = trained_state()
    del state["fc.bias"]
    state["fc.weight"] = torch.zeros(5, 3)
    for i in range(7):
        state[f"extra{i}.w"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_into(TinyNet(), state, "w.pt")
    msg = info.value.message
    assert info.value.exit_code == 3 and "\n" not in msg
    assert msg.startswith("w.pt does not fit the model")
    assert "1 missing key(s): fc.bias" in msg
    assert "7 unexpected key(s): extra0.w, extra1.w, extra2.w, extra3.w, extra4.w, ..." in msg
    assert "extra5.w" not in msg
    assert "1 mis-shaped key(s): fc.weight (checkpoint [5, 3], model [4, 3])" in msg
    assert "--model" in (info.value.hint or "")


# ------------------------------------------------------------------------- output refusals


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists") as info:
        write_safetensors({"w": torch.ones(1)}, out, {})
    assert info.value.exit_code == 3 and "--force" in (info.value.hint or "")
    assert out.read_bytes() == b"keep me"
    write_safetensors({"w": torch.ones(1)}, out, {}, force=True)
    assert torch.equal(load_file(str(out))["w"], torch.ones(1))


def test_output_that_is_an_input_is_refused_even_with_force(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    save_file({"w": torch.ones(2)}, str(src))
    before = src.read_bytes()
    link = tmp_path / "alias.safetensors"
    os.link(src, link)
    for target in (src, link, tmp_path / "." / "in.safetensors"):
        with pytest.raises(OutputError, match="is the input"):
            write_safetensors({"w": torch.zeros(2)}, target, {}, force=True, inputs=[src])
    assert src.read_bytes() == before


def test_output_folder_missing_or_file(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "no" / "o.safetensors", force=False, inputs=())
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_path(tmp_path / "f" / "o.safetensors", force=False, inputs=())
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path / "d", force=True, inputs=())


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_output_folder_not_writable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            write_safetensors({"w": torch.ones(1)}, ro / "o.safetensors", {})
    finally:
        ro.chmod(0o755)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")

    def fail_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "replace", fail_replace)
    with pytest.raises(OutputError, match="No space left"):
        write_safetensors({"w": torch.ones(3)}, out, {}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]
    assert out.read_bytes() == b"old"


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors({"w": torch.ones(3)}, tmp_path / "o.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_unsupported_dtype_and_bad_metadata(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="complex"):
        write_safetensors(
            {"c": torch.ones(2, dtype=torch.complex64)}, tmp_path / "o.safetensors", {}
        )
    with pytest.raises(OutputError, match="strings"):
        write_safetensors({"w": torch.ones(1)}, tmp_path / "o.safetensors", {"n": 1})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_output_permissions_follow_umask(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    old = os.umask(0o022)
    try:
        write_safetensors({"w": torch.ones(1)}, out, {})
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


# -------------------------------------------------------------------------------- metadata


def test_read_metadata(tmp_path: Path) -> None:
    meta = {"stage": "folded", "pairs": [{"linear": "fc", "bn": "bn"}], "bits": 8}
    out = tmp_path / "m.safetensors"
    write_safetensors({"w": torch.ones(1)}, out, {"qatconv": json.dumps(meta)})
    assert read_metadata(out) == meta
    plain = tmp_path / "p.safetensors"
    save_file({"w": torch.ones(1)}, str(plain))
    assert read_metadata(plain) == {}


@pytest.mark.parametrize("raw", ["{broken", "[1, 2]"], ids=["bad-json", "not-object"])
def test_read_metadata_malformed(tmp_path: Path, raw: str) -> None:
    out = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1)}, str(out), metadata={"qatconv": raw})
    with pytest.raises(CheckpointError, match="qatconv"):
        read_metadata(out)


def test_read_metadata_sharded(tmp_path: Path) -> None:
    index = write_shards(tmp_path, trained_state())
    assert read_metadata(index) == {}
    obj = json.loads(index.read_text())
    obj["metadata"]["qatconv"] = json.dumps({"stage": "folded"})
    index.write_text(json.dumps(obj))
    assert read_metadata(tmp_path) == {"stage": "folded"}


def test_read_metadata_does_not_import_torch(tmp_path: Path) -> None:
    # read_metadata is what `inspect` calls: the module must be importable without torch.
    import subprocess
    import sys

    out = tmp_path / "m.safetensors"
    write_safetensors({"w": torch.ones(1)}, out, {"qatconv": '{"stage": "qat"}'})
    code = (
        "import sys; from qatconv.checkpoint import read_metadata; "
        f"m = read_metadata({str(out)!r}); assert m == {{'stage': 'qat'}}, m; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
