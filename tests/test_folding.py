"""fold: the arithmetic against torch's own LinearBn1d.to_float(), and the streaming writer
against the in-memory fold and safetensors' reader."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch.ao.nn.intrinsic.qat import LinearBn1d
from torch.ao.quantization import (
    FakeQuantize,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    get_default_qat_qconfig,
)

import qatconv.folding as fold_mod
from qatconv import fold_stream, st_format
from qatconv.dtypes import st_dtype
from qatconv.errors import CheckpointError, OutputError, UsageError
from qatconv.folding import FoldPair, fold_file, fold_state_dict, fold_weights
from qatconv.pair_record import PairRecord

QCONFIG = get_default_qat_qconfig("x86")
# torch's default (fused) weight fake quant gives channels whose scaled weights are all
# positive zero_point = -128: such a pair is asymmetric. This one is symmetric whatever the data.
SYMMETRIC = QConfig(
    activation=torch.nn.Identity,
    weight=FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
    ),
)  # fmt: skip
LOW = [torch.float32, torch.float16, torch.bfloat16]


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exactly equal: dtype, shape and every bit (so -0.0 != 0.0 and NaN payloads count)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert _bytes(a) == _bytes(b)


def _to_float_reference(
    w: torch.Tensor,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's own fold: a float64 LinearBn1d holding the tensors, then to_float()."""
    out_f, in_f = w.shape
    m = LinearBn1d(in_f, out_f, b is not None, eps, 0.1, qconfig=QCONFIG).double()
    with torch.no_grad():
        m.weight.copy_(w.double())
        if b is not None:
            m.bias.copy_(b.double())
        m.bn.running_mean.copy_(mean.double())
        m.bn.running_var.copy_(var.double())
        m.bn.weight.copy_(torch.ones(out_f) if gamma is None else gamma.double())
        m.bn.bias.copy_(torch.zeros(out_f) if beta is None else beta.double())
    lin = m.to_float()
    return lin.weight.detach(), lin.bias.detach()


def _stats(out_f: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    return {
        "mean": torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype),
        "var": (torch.rand(out_f, generator=gen, dtype=torch.float64) * 3 + 1e-3).to(dtype),
        "gamma": torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype),
        "beta": torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype),
    }


# ---------------------------------------------------------------------------- arithmetic
@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(1, 9),
    in_f=st.integers(1, 7),
    has_bias=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.1, 0.0]),
    dtype=st.sampled_from([torch.float64, *LOW]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fold_weights_equals_linearbn1d_to_float(
    out_f: int, in_f: int, has_bias: bool, eps: float, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype) if has_bias else None
    s = _stats(out_f, gen, dtype)
    w_ref, b_ref = _to_float_reference(w, b, s["mean"], s["var"], eps, s["gamma"], s["beta"])
    w_out, b_out = fold_weights(w, b, s["mean"], s["var"], eps, s["gamma"], s["beta"])
    # float64 sources: bit-equal to torch (atol=0); lower precision: torch's float64 result
    # cast to the source dtype.
    _same(w_out, w_ref.to(dtype))
    _same(b_out, b_ref.to(dtype))


def test_fold_weights_affine_false_equals_ones_and_zeros() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    s = _stats(6, gen)
    s["mean"][0] = 0.0  # (0 - 0) * s = 0: beta = 0 must still be added (-0.0 -> 0.0)
    w_ref, b_ref = _to_float_reference(w, None, s["mean"], s["var"], 1e-5, None, None)
    w_out, b_out = fold_weights(w, None, s["mean"], s["var"], 1e-5, None, None)
    _same(w_out, w_ref)
    _same(b_out, b_ref)


def test_fold_weights_gamma_zero_gives_zero_rows_and_beta() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 3, generator=gen)
    b = torch.randn(5, generator=gen)
    s = _stats(5, gen, torch.float32)
    s["gamma"][[1, 3]] = 0.0
    s["var"][3] = 0.0  # var 0 with eps > 0 is fine
    w_out, b_out = fold_weights(w, b, s["mean"], s["var"], 1e-5, s["gamma"], s["beta"])
    assert torch.isfinite(w_out).all() and torch.isfinite(b_out).all()
    assert (w_out[[1, 3]] == 0).all()
    _same(b_out[[1, 3]], s["beta"][[1, 3]])


def test_fold_weights_rejects_mismatched_shapes() -> None:
    with pytest.raises(CheckpointError, match="running_var has shape"):
        fold_weights(torch.ones(3, 2), None, torch.zeros(3), torch.ones(4), 1e-5, None, None)


# ---------------------------------------------------------------------------- checkpoints
def _record(lin: str, bn: str, out_f: int, in_f: int, bias: bool, **kw: Any) -> PairRecord:
    r = {"linear": lin, "bn": bn, "qat": lin, "eps": 1e-5, "momentum": 0.1,
         "in_features": in_f, "out_features": out_f, "bias": bias, "affine": True}  # fmt: skip
    r.update(kw)
    return PairRecord.from_json(r, "test")


def _passthrough(gen: torch.Generator) -> dict[str, torch.Tensor]:
    odd = torch.tensor([float("nan"), -0.0, float("inf"), 1.5])
    odd_bits = odd.view(torch.int32).clone()
    odd_bits[0] = 0x7FC00123  # a NaN payload that any float round trip could canonicalize
    return {
        "head.weight": torch.randn(3, 7, generator=gen).to(torch.bfloat16),
        "head.bias": torch.randn(3, generator=gen, dtype=torch.float64),
        "emb.ids": torch.arange(11, dtype=torch.int64),
        "mask": torch.randint(0, 2, (2, 5), generator=gen).bool(),
        "odd": odd_bits.view(torch.float32),
        "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }


def _float_checkpoint(
    dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Two pairs (one without Linear bias, one with affine=False BN) plus pass-through."""
    gen = torch.Generator().manual_seed(seed)
    t = _passthrough(gen)
    specs = [("mlp.0", "mlp.1", 13, 5, True, True), ("mlp.3", "mlp.4", 4, 13, False, False)]
    records = []
    for lin, bn, out_f, in_f, bias, affine in specs:
        t[f"{lin}.weight"] = torch.randn(out_f, in_f, generator=gen).to(dtype)
        if bias:
            t[f"{lin}.bias"] = torch.randn(out_f, generator=gen).to(dtype)
        s = _stats(out_f, gen, torch.float32)
        if affine:
            t[f"{bn}.weight"], t[f"{bn}.bias"] = s["gamma"], s["beta"]
        t[f"{bn}.running_mean"], t[f"{bn}.running_var"] = s["mean"], s["var"]
        t[f"{bn}.num_batches_tracked"] = torch.tensor(100)
        records.append(_record(lin, bn, out_f, in_f, bias, affine=affine))
    return t, records


def _qat_module(in_f: int, out_f: int, bias: bool, qconfig: Any, seed: int) -> LinearBn1d:
    torch.manual_seed(seed)
    m = LinearBn1d(in_f, out_f, bias, 1e-5, 0.1, qconfig=qconfig)
    with torch.no_grad():  # LinearBn1d leaves its bias uninitialized (torch.empty)
        if m.bias is not None:
            m.bias.normal_()
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
    m.train()
    m(torch.randn(64, in_f) * 2 + 0.5)  # BN statistics and the weight observer move
    return m


def _qat_checkpoint(
    qconfig: Any = SYMMETRIC, seed: int = 0
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, LinearBn1d]]:
    gen = torch.Generator().manual_seed(seed)
    t = _passthrough(gen)
    mods = {"blocks.0": _qat_module(6, 10, True, qconfig, seed),
            "blocks.2": _qat_module(10, 3, False, qconfig, seed + 1)}  # fmt: skip
    records = []
    for path, m in mods.items():
        for k, v in m.state_dict().items():
            t[f"{path}.{k}"] = v.detach().clone()
        bn = path[:-1] + str(int(path[-1]) + 1)
        records.append(_record(path, bn, m.out_features, m.in_features, m.bias is not None))
    return t, records, mods


def _no_fallocate(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")  # as on some network filesystems


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_fold_file_float_checkpoint_equals_fold_state_dict(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    tensors, records = _float_checkpoint(dtype)
    pairs = [FoldPair.from_float_record(r) for r in records]
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src)
    report = fold_file(src, out, pairs, metadata={})
    expected = fold_state_dict(tensors, pairs)
    # Same tensors, and byte for byte what safetensors writes for them.
    assert out.read_bytes() == save(expected, metadata={"format": "pt"})
    # Folded values: torch's float64 fold cast to the dtype.
    for r in records:
        lin, bn = r.linear, r.bn
        w_ref, b_ref = _to_float_reference(
            tensors[f"{lin}.weight"], tensors.get(f"{lin}.bias"),
            tensors[f"{bn}.running_mean"], tensors[f"{bn}.running_var"], r.eps,
            tensors.get(f"{bn}.weight"), tensors.get(f"{bn}.bias"),
        )  # fmt: skip
        _same(expected[f"{lin}.weight"], w_ref.to(dtype))
        _same(expected[f"{lin}.bias"], b_ref.to(dtype))  # created in the weight dtype if absent
    assert "mlp.3.bias" not in tensors and expected["mlp.3.bias"].dtype == dtype
    assert report.pairs == ["mlp.0", "mlp.3"]
    assert report.removed == sorted(k for k in tensors if k.startswith(("mlp.1.", "mlp.4.")))
    assert report.files == [out] and report.bytes_out == out.stat().st_size
    assert report.bytes_in == src.stat().st_size and report.qparams == {}
    # Pass-through tensors are the same objects in memory and the same bits on disk.
    for k in _passthrough(torch.Generator()):
        assert expected[k] is tensors[k]
    header = st_format.read_header(out)
    fd = os.open(out, os.O_RDONLY)
    try:
        for k in _passthrough(torch.Generator()):
            assert st_format.read_tensor_bytes(fd, header, k) == _bytes(tensors[k])
    finally:
        os.close(fd)
    assert _listing(tmp_path) == ["in.safetensors", "out.safetensors"]


def test_fold_file_qat_checkpoint(tmp_path: Path) -> None:
    tensors, records, mods = _qat_checkpoint()
    pairs = [FoldPair.from_qat_record(r) for r in records]
    src, out = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    save_file(tensors, src)
    seen: list[str] = []
    report = fold_file(src, out, pairs, metadata={"qatconv": "{}"}, on_pair=seen.append)
    folded = load_file(out)
    expected = fold_state_dict(tensors, pairs)
    assert folded.keys() == expected.keys()
    for k in folded:
        _same(folded[k], expected[k])
    for path, m in mods.items():
        lin = m.to_float()  # torch's fold (float32 arithmetic) for the key set and dtypes
        w_ref, b_ref = _to_float_reference(
            m.weight, m.bias, m.bn.running_mean, m.bn.running_var, m.bn.eps, m.bn.weight, m.bn.bias
        )
        _same(folded[f"{path}.weight"], w_ref.float())
        _same(folded[f"{path}.bias"], b_ref.float())
        assert folded[f"{path}.weight"].shape == lin.weight.shape
        assert not any(k.startswith(f"{path}.bn.") or "fake_quant" in k for k in folded)
    assert sorted(seen) == ["blocks.0", "blocks.2"] and report.pairs == ["blocks.0", "blocks.2"]
    assert report.qparams == {
        "blocks.0": {"scheme": "symmetric", "granularity": "channel"},
        "blocks.2": {"scheme": "symmetric", "granularity": "channel"},
    }
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {"qatconv": "{}", "format": "pt"}


def test_blockwise_fold_equals_whole_tensor_fold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors, records = _float_checkpoint(torch.bfloat16, seed=5)
    pairs = [FoldPair.from_float_record(r) for r in records]
    src = tmp_path / "in.safetensors"
    save_file(tensors, src)
    expected = save(fold_state_dict(tensors, pairs), metadata={"format": "pt"})
    for chunk in (1, 7, 26, 10**9):  # 1 row per block, partial last block, one block
        monkeypatch.setattr(fold_stream, "CHUNK_ELEMENTS", chunk)
        out = tmp_path / f"out{chunk}.safetensors"
        fold_file(src, out, pairs, metadata={})
        assert out.read_bytes() == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_weights_round_like_torch(tmp_path: Path, dtype: torch.dtype) -> None:
    """torch casts float64 -> float16/bfloat16 through float32 (double rounding); so must we.

    With 256K products some land where a direct float64 -> 16-bit rounding would differ."""
    gen = torch.Generator().manual_seed(11)
    out_f, in_f = 512, 512
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    s = _stats(out_f, gen, torch.float32)
    tensors = {"l.weight": w, "l.bias": torch.randn(out_f, generator=gen).to(dtype),
               "b.weight": s["gamma"], "b.bias": s["beta"],
               "b.running_mean": s["mean"], "b.running_var": s["var"]}  # fmt: skip
    pairs = [FoldPair.from_float_record(_record("l", "b", out_f, in_f, True))]
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src)
    fold_file(src, out, pairs, metadata={})
    w_ref, _ = _to_float_reference(
        w, tensors["l.bias"], s["mean"], s["var"], 1e-5, s["gamma"], s["beta"]
    )
    _same(load_file(out)["l.weight"], w_ref.to(dtype))
    if dtype == torch.float16:  # the data does exercise the difference
        direct = torch.from_numpy(w_ref.numpy().astype("float16"))
        assert not torch.equal(direct, w_ref.to(dtype))


def test_output_is_deterministic_whatever_the_source_order(tmp_path: Path) -> None:
    tensors, records = _float_checkpoint()
    pairs = [FoldPair.from_float_record(r) for r in records]
    shuffled = dict(reversed(list(tensors.items())))
    outs = []
    for i, sd in enumerate([tensors, tensors, shuffled]):
        src = tmp_path / f"in{i}.safetensors"
        # Source files with different layouts: safetensors' sorted one, and ours unsorted.
        if i < 2:
            save_file(sd, src)
        else:
            entries = [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in sd.items()]
            with st_format.StreamWriter(src, entries, {}) as w:
                for k, v in sd.items():
                    w.write(k, _bytes(v))
        fold_file(src, tmp_path / f"out{i}.safetensors", pairs, metadata={"a": "1", "b": "2"})
        outs.append((tmp_path / f"out{i}.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_sharded_input_and_output(tmp_path: Path) -> None:
    tensors, records, _ = _qat_checkpoint(seed=1)
    pairs = [FoldPair.from_qat_record(r) for r in records]
    names = sorted(tensors)
    shards = {"src-1.safetensors": names[::2], "src-2.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / fname)
    index = tmp_path / "src.safetensors.index.json"
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    expected = fold_state_dict(tensors, pairs)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    limit = 200  # bytes: the 10x6 float32 weight (240 B) gets a shard of its own
    report = fold_file(
        index, out_dir / "model.safetensors.index.json", pairs, metadata={"k": "v"},
        max_shard_size=limit,
    )  # fmt: skip
    idx = json.loads((out_dir / "model.safetensors.index.json").read_text())
    n = len(report.files) - 1
    assert n > 2 and report.files[-1] == out_dir / "model.safetensors.index.json"
    assert [p.name for p in report.files[:-1]] == [
        f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)
    ]
    assert _listing(out_dir) == sorted(p.name for p in report.files)
    merged: dict[str, torch.Tensor] = {}
    for p in report.files[:-1]:
        part = load_file(p)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= limit or len(part) == 1
        with safe_open(p, framework="pt") as f:
            assert f.metadata() == {"k": "v", "format": "pt"}
        for k, t in part.items():
            assert idx["weight_map"][k] == p.name
            merged[k] = t
    assert merged.keys() == expected.keys()
    for k, t in merged.items():
        _same(t, expected[k])
    assert idx["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in merged.values()
    )
    assert report.bytes_out == sum(p.stat().st_size for p in report.files[:-1])
    # The folder of a sharded checkpoint reads as the checkpoint.
    again = fold_file(out_dir, tmp_path / "single.safetensors", [], metadata={})
    assert again.pairs == [] and load_file(tmp_path / "single.safetensors").keys() == merged.keys()


def test_failures_write_nothing(tmp_path: Path) -> None:
    tensors, records = _float_checkpoint()
    pairs = [FoldPair.from_float_record(r) for r in records]
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"

    def fails(sd: dict[str, torch.Tensor], exc: type[Exception], match: str, **kw: Any) -> None:
        save_file(sd, src)
        with pytest.raises(exc, match=match):
            fold_file(src, out, kw.pop("pairs", pairs), metadata={}, **kw)
        assert _listing(tmp_path) == ["in.safetensors"]  # no output, no temp file

    missing = {k: v for k, v in tensors.items() if k != "mlp.4.running_var"}
    fails(missing, CheckpointError, "pair 'mlp.3': tensor 'mlp.4.running_var' is missing")
    bad = dict(tensors)
    bad["mlp.1.running_var"] = tensors["mlp.1.running_var"].clone()
    bad["mlp.1.running_var"][[2, 5, 7]] = -1.0
    fails(bad, CheckpointError, "running_var \\+ eps <= 0 in 3 of 13 channels")
    bad["mlp.1.running_var"] = tensors["mlp.1.running_var"].clone()
    bad["mlp.1.running_mean"] = tensors["mlp.1.running_mean"].clone()
    bad["mlp.1.running_mean"][0] = float("nan")
    fails(bad, CheckpointError, "running_mean has non-finite values in 1 of 13 channels")
    # float16 cannot hold the folded weight: detected while streaming, temp file removed.
    half = {k: v.half() if k == "mlp.0.weight" else v for k, v in tensors.items()}
    half["mlp.0.weight"][4, 0] = 60000.0
    half["mlp.1.running_var"] = torch.full((13,), 1e-4)
    fails(half, CheckpointError, "values of 'mlp.0.weight' are not finite in F16")
    shape = dict(tensors, **{"mlp.1.running_mean": torch.zeros(12)})
    fails(shape, CheckpointError, "expected a float vector of the weight's 13 output channels")
    fails(tensors, UsageError, "emit-qparams", emit_qparams=True)
    double = pairs + [FoldPair.from_float_record(replace(records[0], linear="mlp.3"))]
    fails(tensors, CheckpointError, "appears in two pairs", pairs=double)
    # bias=false in the record while the checkpoint has the bias: refuse, do not write it twice.
    no_bias = [FoldPair.from_float_record(replace(records[0], bias=False))]
    fails(tensors, CheckpointError, "'mlp.0.bias' twice", pairs=no_bias)


def test_failures_while_streaming_stop_the_writes_and_clean_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors, records = _float_checkpoint(seed=6)
    pairs = [FoldPair.from_float_record(r) for r in records]
    src = tmp_path / "in.safetensors"
    monkeypatch.setattr(fold_stream, "CHUNK_ELEMENTS", 5)  # one row per block: many queued writes
    # A write fails on the background thread (disk full): the error surfaces, nothing stays.
    # (Only the unmapped output has that thread: force it, as a filesystem without fallocate.)
    monkeypatch.setattr(os, "posix_fallocate", _no_fallocate)
    calls = {"n": 0}
    real = st_format.StreamWriter.write_chunk

    def flaky(self: st_format.StreamWriter, name: str, data: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OutputError("cannot write out.safetensors: No space left on device")
        real(self, name, data)

    save_file(tensors, src)
    monkeypatch.setattr(st_format.StreamWriter, "write_chunk", flaky)
    with pytest.raises(OutputError, match="No space left"):
        fold_file(src, tmp_path / "out.safetensors", pairs, metadata={})
    assert _listing(tmp_path) == ["in.safetensors"]
    monkeypatch.setattr(st_format.StreamWriter, "write_chunk", real)
    monkeypatch.undo()
    monkeypatch.setattr(fold_stream, "CHUNK_ELEMENTS", 5)
    # The main thread fails (overflow in the last row) while earlier rows are being written.
    half = {k: v.half() if k == "mlp.0.weight" else v for k, v in tensors.items()}
    half["mlp.0.weight"][12, 0] = 60000.0
    half["mlp.1.running_var"] = torch.full((13,), 1e-4)
    save_file(half, src)
    with pytest.raises(CheckpointError, match="not finite in F16"):
        fold_file(src, tmp_path / "out.safetensors", pairs, metadata={})
    assert _listing(tmp_path) == ["in.safetensors"]
    # A progress callback that raises (Ctrl-C in a UI) aborts the same way.
    save_file(tensors, src)

    def interrupt(linear: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fold_file(src, tmp_path / "out.safetensors", pairs, metadata={}, on_pair=interrupt)
    assert _listing(tmp_path) == ["in.safetensors"]


def test_output_rules(tmp_path: Path) -> None:
    tensors, records = _float_checkpoint()
    pairs = [FoldPair.from_float_record(r) for r in records]
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src)
    with pytest.raises(OutputError, match="is one of the inputs"):
        fold_file(src, src, pairs, metadata={}, force=True)
    os.link(src, tmp_path / "alias.safetensors")
    with pytest.raises(OutputError, match="is one of the inputs"):
        fold_file(src, tmp_path / "alias.safetensors", pairs, metadata={}, force=True)
    os.unlink(tmp_path / "alias.safetensors")
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        fold_file(src, out, pairs, metadata={})
    assert out.read_bytes() == b"keep"
    fold_file(src, out, pairs, metadata={}, force=True)
    assert load_file(out).keys() == fold_state_dict(tensors, pairs).keys()
    with pytest.raises(UsageError, match="max-shard-size"):
        fold_file(src, tmp_path / "x.safetensors.index.json", pairs, metadata={})
    with pytest.raises(OutputError, match="cannot write"):
        fold_file(src, tmp_path / "missing" / "o.safetensors", pairs, metadata={})
    assert _listing(tmp_path) == ["in.safetensors", "out.safetensors"]


def test_metadata_callable_sees_the_report_before_writing(tmp_path: Path) -> None:
    tensors, records, _ = _qat_checkpoint()
    pairs = [FoldPair.from_qat_record(r, quant_range=(-128, 127)) for r in records]
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src)

    def meta(report: fold_mod.FoldReport) -> dict[str, str]:
        assert not out.exists() and report.files == []
        return {"qatconv": json.dumps({"removed": report.removed, "q": report.qparams})}

    report = fold_file(src, out, pairs, metadata=meta)
    stored = json.loads(st_format.read_header(out).metadata["qatconv"])
    assert stored == {"removed": report.removed, "q": report.qparams}
    assert report.qparams["blocks.0"] == {"scheme": "symmetric", "granularity": "channel",
                                          "quant_min": -128, "quant_max": 127, "bits": 8}  # fmt: skip


# ---------------------------------------------------------------------------- quant params
def _asymmetric_qconfig() -> QConfig:
    weight = FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-8, quant_max=7, dtype=torch.qint8, qscheme=torch.per_channel_affine,
    )  # fmt: skip
    return QConfig(activation=torch.nn.Identity, weight=weight)


@pytest.mark.parametrize("kind", ["symmetric", "affine-4bit", "x86-default"])
def test_emit_qparams_reproduce_the_fake_quantized_weight(tmp_path: Path, kind: str) -> None:
    qconfig = {"symmetric": SYMMETRIC, "affine-4bit": _asymmetric_qconfig(), "x86-default": QCONFIG}
    tensors, records, mods = _qat_checkpoint(qconfig[kind], seed=2)
    qmin, qmax = (-8, 7) if kind == "affine-4bit" else (-128, 127)
    pairs = [FoldPair.from_qat_record(r, quant_range=(qmin, qmax)) for r in records]
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src)
    report = fold_file(src, out, pairs, metadata={}, emit_qparams=True)
    folded = load_file(out)
    expected = fold_state_dict(tensors, pairs, emit_qparams=True)
    assert folded.keys() == expected.keys()
    for k in folded:
        _same(folded[k], expected[k])
    for path, m in mods.items():
        out_f = m.out_features
        fq = m.weight_fake_quant
        scale = folded[f"{path}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (out_f, 1)
        _same(scale.flatten(), fq.scale)
        asymmetric = bool((fq.zero_point != 0).any())
        assert asymmetric == (kind == "affine-4bit") or kind == "x86-default"
        if asymmetric:
            zp = folded[f"{path}.weight_zero_point"]
            assert zp.dtype == torch.int8 and zp.shape == (out_f, 1)
            assert torch.equal(zp.flatten().int(), fq.zero_point)
        else:
            assert f"{path}.weight_zero_point" not in folded
            zp = torch.zeros(out_f, 1, dtype=torch.int8)
        w = folded[f"{path}.weight"]
        emitted = torch.fake_quantize_per_channel_affine(
            w, scale.flatten(), zp.flatten().int(), 0, qmin, qmax
        )
        fq.disable_observer()  # the QAT module's own fake quant, with its own params
        _same(emitted, fq(w))
        # and by hand: round to the integer grid, clamp, dequantize
        q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax)
        assert torch.equal(emitted, (q - zp) * scale)
        info = report.qparams[path]
        assert info["scheme"] == ("asymmetric" if asymmetric else "symmetric")
        assert info["bits"] == (4 if kind == "affine-4bit" else 8)


def test_pair_records() -> None:
    rec = _record("a.lin", "a.bn", 4, 3, False, affine=False, eps=0.001)
    p = FoldPair.from_float_record(rec)
    assert (p.weight_key, p.bias_key, p.gamma_key, p.beta_key) == ("a.lin.weight", None, None, None)
    assert (p.mean_key, p.var_key, p.drop_prefixes, p.eps) == (
        "a.bn.running_mean", "a.bn.running_var", ("a.bn.",), 0.001,
    )  # fmt: skip
    q = FoldPair.from_qat_record(rec)
    assert q.gamma_key == "a.lin.bn.weight" and q.scale_key == "a.lin.weight_fake_quant.scale"
    assert "a.lin.weight_fake_quant." in q.drop_prefixes and q.bias_key is None
    with pytest.raises(CheckpointError, match="'eps'"):
        PairRecord.from_json(rec.to_json() | {"eps": "1e-5"}, "f")
    with pytest.raises(CheckpointError, match="'bias'"):
        PairRecord.from_json({k: v for k, v in rec.to_json().items() if k != "bias"}, "f")


# ------------------------------------------------------------------ mapped output vs writes
_WAYS = ["mapped", "no fallocate", "no mmap"]


def _fold_one_way(way: str, src: Path, out: Path, pairs: list[FoldPair],
                  monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[Any, int]:
    """fold_file with the output mapped, or forced onto the os.write path (a filesystem
    without fallocate, or one that refuses shared mappings); returns the report and the
    number of blocks computed straight into a mapping."""
    import mmap

    views = {"n": 0}
    real_view = st_format.StreamWriter.chunk_view

    def counting(self: st_format.StreamWriter, name: str, nbytes: int) -> memoryview:
        views["n"] += 1
        return real_view(self, name, nbytes)

    def no_mmap(*a: object, **k: object) -> None:
        raise OSError(errno.ENODEV, "No such device")

    with monkeypatch.context() as m:
        m.setattr(st_format.StreamWriter, "chunk_view", counting)
        if way == "no fallocate":
            m.setattr(os, "posix_fallocate", _no_fallocate)
        elif way == "no mmap":
            m.setattr(mmap, "mmap", no_mmap)
        report = fold_file(src, out, pairs, metadata={}, **kw)
    return report, views["n"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fsync", [True, False])
def test_mapped_output_equals_the_write_path_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, fsync: bool
) -> None:
    """Each way gives the same file (pass-through, zero-size and folded tensors, many blocks,
    windows dropped from the mapping on the way), equal to safetensors' save of the in-memory
    fold and, for the weights, to torch's float64 fold cast to the source dtype."""
    import mmap

    tensors, records = _float_checkpoint(dtype, seed=9)
    gen = torch.Generator().manual_seed(10)
    # A weight of many pages, so that windows of the mapping are dropped while it is folded.
    tensors["big.0.weight"] = torch.randn(257, 61, generator=gen).to(dtype)
    s = _stats(257, gen, torch.float32)
    tensors.update({"big.1.weight": s["gamma"], "big.1.bias": s["beta"],
                    "big.1.running_mean": s["mean"], "big.1.running_var": s["var"]})  # fmt: skip
    records.append(_record("big.0", "big.1", 257, 61, False))
    pairs = [FoldPair.from_float_record(r) for r in records]
    src = tmp_path / "in.safetensors"
    save_file(tensors, src)
    monkeypatch.setattr(fold_stream, "CHUNK_ELEMENTS", 7)  # one-row blocks
    monkeypatch.setattr(st_format, "_WRITEBACK_WINDOW", mmap.PAGESIZE)  # drop as soon as can
    monkeypatch.setattr(st_format, "_MAP_WINDOW", mmap.PAGESIZE)
    outs = {}
    for way in _WAYS:
        out = tmp_path / f"{way.replace(' ', '-')}.safetensors"
        _, views = _fold_one_way(way, src, out, pairs, monkeypatch, fsync=fsync)
        assert (views > 0) == (way == "mapped")
        outs[way] = out.read_bytes()
    assert outs["mapped"] == outs["no fallocate"] == outs["no mmap"]
    assert outs["mapped"] == save(fold_state_dict(tensors, pairs), metadata={"format": "pt"})
    folded = load_file(tmp_path / "mapped.safetensors")
    s = {k: tensors[f"mlp.1.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
    w_ref, b_ref = _to_float_reference(tensors["mlp.0.weight"], tensors["mlp.0.bias"],
                                       s["running_mean"], s["running_var"], 1e-5, s["weight"],
                                       s["bias"])  # fmt: skip
    _same(folded["mlp.0.weight"], w_ref.to(dtype))
    _same(folded["mlp.0.bias"], b_ref.to(dtype))
    assert folded["empty"].shape == (0, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.safetensors", *(f"{w.replace(' ', '-')}.safetensors" for w in _WAYS)]
    )  # no temp file left


def test_sharded_mapped_output_equals_the_write_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors, records, _ = _qat_checkpoint(seed=4)
    pairs = [FoldPair.from_qat_record(r) for r in records]
    src = tmp_path / "in.safetensors"
    save_file(tensors, src)
    monkeypatch.setattr(fold_stream, "CHUNK_ELEMENTS", 6)
    files = {}
    for way in _WAYS:
        out_dir = tmp_path / way.replace(" ", "-")
        out_dir.mkdir()
        report, views = _fold_one_way(way, src, out_dir / "model.safetensors.index.json",
                                      pairs, monkeypatch, max_shard_size=200)  # fmt: skip
        assert len(report.files) > 3 and (views > 0) == (way == "mapped")
        assert _listing(out_dir) == sorted(p.name for p in report.files)
        files[way] = {p.name: p.read_bytes() for p in report.files}
    assert files["mapped"] == files["no fallocate"] == files["no mmap"]
    merged = {k: v for p in (tmp_path / "mapped").glob("*.safetensors")
              for k, v in load_file(p).items()}  # fmt: skip
    expected = fold_state_dict(tensors, pairs)
    assert merged.keys() == expected.keys()
    for k, t in expected.items():
        _same(merged[k], t)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
@pytest.mark.parametrize("failing_shard", [1, 2])
def test_space_not_reserved_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, failing_shard: int
) -> None:
    """A full disk (or a file size limit, or a quota) is an OutputError when the shard's space is
    reserved, before any of its data is read or scaled; no output and no temp file remain."""
    tensors, records = _float_checkpoint(seed=2)
    pairs = [FoldPair.from_float_record(r) for r in records]
    src = tmp_path / "in.safetensors"
    save_file(tensors, src)
    real = os.posix_fallocate
    calls: list[str] = []
    scaled: list[int] = []

    def reserve(fd: int, offset: int, length: int) -> None:
        calls.append("fallocate")
        if len(calls) == failing_shard:
            raise OSError(err, os.strerror(err))
        real(fd, offset, length)

    real_scale = fold_stream._scale_rows
    monkeypatch.setattr(os, "posix_fallocate", reserve)
    monkeypatch.setattr(fold_stream, "_scale_rows",
                        lambda *a: (scaled.append(len(calls)), real_scale(*a))[1])  # fmt: skip
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # The first shard holds the 13x5 weight (260 B), the second the rest.
    shard = {"max_shard_size": 260} if failing_shard == 2 else {}
    with pytest.raises(OutputError, match=os.strerror(err)):
        fold_file(src, out_dir / ("model.safetensors.index.json" if shard else "o.safetensors"),
                  pairs, metadata={}, **shard)  # fmt: skip
    assert len(calls) == failing_shard
    assert all(n < failing_shard for n in scaled)  # nothing scaled for the shard that failed
    assert _listing(out_dir) == []
    assert _listing(tmp_path) == ["in.safetensors", "out"]
