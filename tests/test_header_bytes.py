"""Every file qatconv writes has the header bytes the safetensors library itself writes.

The library (serde_json) writes tensor names and metadata as raw UTF-8, never ``\\uXXXX``
escapes; qatconv once had two header builders that disagreed on exactly that. A model whose
module names are not ASCII goes through each writing command, and each output's header is
compared with `safetensors.torch.save` of the same tensors and metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save, save_file

from qatconv import checkpoint, st_format

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module("lïn", nn.Linear(4, 3))
        self.add_module("bñ", nn.BatchNorm1d(3))
        self.add_module("頭", nn.Linear(3, 2))

    def forward(self, x):
        h = getattr(self, "bñ")(getattr(self, "lïn")(x))
        return getattr(self, "頭")(torch.relu(h))
'''


def _header(raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    return raw[8 : 8 + n]


def _split_metadata(header: bytes) -> tuple[dict[str, str], bytes]:
    """The ``__metadata__`` object and the header bytes after it (both writers put it first).

    Inside a JSON string every quote is escaped, so the first ``"},"`` ends the metadata.
    """
    assert header.startswith(b'{"__metadata__":{')
    end = header.index(b'"},"') + 2
    return json.loads(header[len(b'{"__metadata__":') : end]), header[end:]


def assert_library_header(path: Path) -> None:
    """``path``'s header equals the library's for the same tensors and metadata.

    The library writes its metadata in hash order (it changes from run to run), so the
    metadata object is compared parsed, and everything after it byte for byte.
    """
    raw = path.read_bytes()
    metadata = st_format.read_header(path).metadata
    ours = _header(raw)
    lib = _header(save(load_file(path), metadata=metadata))
    assert len(ours) == len(lib)  # an escaped name or value would make ours longer
    (ours_meta, ours_rest), (lib_meta, lib_rest) = _split_metadata(ours), _split_metadata(lib)
    assert ours_meta == lib_meta
    assert ours_rest == lib_rest


NAMES = {"lïn.weight": torch.float32, "bñ.running_var": torch.float64, "頭.bias": torch.float16,
         "ascii": torch.int8}  # fmt: skip


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: (torch.randn(3, generator=g) * 10).to(d) for n, d in NAMES.items()}


def test_write_safetensors_is_byte_identical_to_the_library(tmp_path: Path) -> None:
    checkpoint.write_safetensors(_tensors(), tmp_path / "a.safetensors", {})
    save_file(_tensors(), tmp_path / "b.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert "lïn.weight".encode() in _header((tmp_path / "a.safetensors").read_bytes())


def test_stream_writer_is_byte_identical_to_the_library(tmp_path: Path) -> None:
    tensors = _tensors()
    entries = st_format.canonical_order([(n, d, t.shape) for (n, t), d in zip(
        tensors.items(), ("F32", "F64", "F16", "I8"), strict=True)])  # fmt: skip
    with st_format.StreamWriter(tmp_path / "a.safetensors", entries) as w:
        for name, _, _ in entries:
            w.write(name, tensors[name].numpy().tobytes())
    save_file(tensors, tmp_path / "b.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.fixture
def non_ascii_model(tmp_path: Path) -> tuple[str, Path, Path]:
    (tmp_path / "net.py").write_text(MODEL, encoding="utf-8")
    import importlib.util

    spec = importlib.util.spec_from_file_location("net_non_ascii", tmp_path / "net.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(1)
    model = mod.Net().eval()
    bn = model.get_submodule("bñ")
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, generator=g))
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
    save_file(model.state_dict(), tmp_path / "w.safetensors", metadata={"format": "pt"})
    np.savez(tmp_path / "x.npz", inputs=torch.randn(32, 4, generator=g).numpy())
    return f"{tmp_path / 'net.py'}:Net", tmp_path / "w.safetensors", tmp_path / "x.npz"


def test_every_command_writes_the_library_header(
    cli: Any, tmp_path: Path, non_ascii_model: tuple[str, Path, Path]
) -> None:
    spec, weights, data = non_ascii_model
    qat, folded, plain = (tmp_path / f"{n}.safetensors" for n in ("qat", "folded", "plain"))
    shards = tmp_path / "shards"
    shards.mkdir()
    runs = [
        ("prepare", "--model", spec, "--weights", weights, "--data", data, "-o", qat),
        ("fold", qat, "-o", folded, "--emit-qparams"),
        ("fold", "--model", spec, "--weights", weights, "-o", plain),
        ("fold", qat, "-o", shards / "model.safetensors.index.json", "--max-shard-size", "40"),
    ]
    for args in runs:
        r = cli(*args, "--quiet")
        assert r.code == 0, r.err
    written = [qat, folded, plain, *sorted(shards.glob("*.safetensors"))]
    assert len(written) > 4
    for path in written:
        assert_library_header(path)
    assert "lïn.bn.running_var" in load_file(qat)  # the names really are not ASCII
    assert "lïn.weight" in load_file(folded) and "lïn.weight_scale" in load_file(folded)
