"""The whole job through the command line (in-process `qatconv.cli.main`), on models qatconv has
never seen: written here into a temporary `.py` file and passed as `--model FILE.py:NAME`.

References are computed here: the unfused float model (this test's own import of the file,
with the checkpoint this test saved) and the float64 eval-mode BN fold of its raw tensors.
Tolerances: folded tensors within one float32 ulp of the float64 fold (``1 / sqrt`` here vs
``rsqrt`` in the library may round the last float64 bit differently); model outputs within
``1e-5 * max|ref|`` (reference.REL: float32 rounding moves around when BN is folded, and an element-wise
relative error means nothing for outputs near zero).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reference import assert_rel_close, bn_scale64, fold_state64
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qatconv import api
from qatconv.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
ULP32 = 2.0**-23

UNSEEN = '''
"""Models written by tests/test_end_to_end.py. PAIRS: the (linear, bn) paths that must fold;
BIAS_ADDED: Linears without a bias that folding gives one."""

from __future__ import annotations

import torch
from torch import nn


def init_(model: nn.Module, seed: int) -> None:
    """Seeded weights and BN statistics far from the defaults, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 2.0)
                m.running_var.copy_(torch.rand(n, generator=g) * 4.0 + 0.05)
                m.num_batches_tracked.fill_(50)
                if m.affine:
                    m.weight.copy_(1.0 + 0.5 * torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))


class Residual(nn.Module):
    """Hand-written forward: two pairs, a residual add, tanh and a scale on the way out."""

    PAIRS = [("inp", "inp_bn"), ("body", "body_bn")]
    BIAS_ADDED: list[str] = []

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.inp = nn.Linear(10, width)
        self.inp_bn = nn.BatchNorm1d(width)
        self.body = nn.Linear(width, width)
        self.body_bn = nn.BatchNorm1d(width)
        self.out = nn.Linear(width, 4)
        init_(self, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp_bn(self.inp(x)))
        h = h + torch.relu(self.body_bn(self.body(h)))
        return 0.5 * self.out(h)


class NoBias(nn.Module):
    """A Linear without bias before its BN: folding creates the bias."""

    PAIRS = [("fc", "bn")]
    BIAS_ADDED = ["fc"]

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 9, bias=False)
        self.bn = nn.BatchNorm1d(9)
        self.head = nn.Linear(9, 3)
        init_(self, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class AffineFalse(nn.Module):
    """BatchNorm1d(affine=False): gamma = 1, beta = 0, no tensors for them."""

    PAIRS = [("fc", "bn")]
    BIAS_ADDED: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 7)
        self.bn = nn.BatchNorm1d(7, affine=False)
        self.head = nn.Linear(7, 2)
        init_(self, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.bn(self.fc(x))))


class MomentumNone(nn.Module):
    """BatchNorm1d(momentum=None) (cumulative averages), in a Sequential."""

    PAIRS = [("net.0", "net.1")]
    BIAS_ADDED: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 3)
        )
        init_(self, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ZeroGamma(nn.Module):
    """Channels with gamma == 0 (their BN output is beta), and one channel whose scaled weights
    are all positive (an asymmetric weight range)."""

    PAIRS = [("fc", "bn")]
    BIAS_ADDED: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 12)
        self.bn = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 3)
        init_(self, 5)
        with torch.no_grad():
            self.bn.weight[::3] = 0.0
            self.fc.weight[1] = self.fc.weight[1].abs() + 0.01
            self.bn.weight[1] = self.bn.weight[1].abs() + 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


class TokenWise(nn.Module):
    """Token-wise Linear -> flatten(0, 1) -> BN -> reshape, on (batch, tokens, dim) inputs."""

    PAIRS = [("fc", "bn")]
    BIAS_ADDED: list[str] = []

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.proj = nn.Linear(hidden, dim)
        init_(self, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.bn(self.fc(x).flatten(0, 1)).reshape(b, t, -1)
        return x + self.proj(torch.relu(h))


class Mixed(nn.Module):
    """All of it at once: no-bias Linear into an affine=False BN, a momentum=None BN with
    gamma == 0 channels in a residual branch, and an untouched Linear between."""

    PAIRS = [("a", "a_bn"), ("b", "b_bn")]
    BIAS_ADDED = ["a"]

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 10, bias=False)
        self.a_bn = nn.BatchNorm1d(10, affine=False)
        self.mid = nn.Linear(10, 10)
        self.b = nn.Linear(10, 10)
        self.b_bn = nn.BatchNorm1d(10, momentum=None)
        self.head = nn.Linear(10, 5)
        init_(self, 7)
        with torch.no_grad():
            self.b_bn.weight[[0, 4]] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a_bn(self.a(x)))
        h = self.mid(h)
        h = h + torch.relu(self.b_bn(self.b(h)))
        return self.head(h)
'''

INPUT_SHAPES = {"TokenWise": (48, 5, 8)}
NAMES = ["Residual", "NoBias", "AffineFalse", "MomentumNone", "ZeroGamma", "TokenWise", "Mixed"]


# ------------------------------------------------------------------------------------ helpers


def cli(*args: object) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def ok(*args: object) -> None:
    code = cli(*args, "--quiet")
    assert code == 0, f"qatconv {' '.join(map(str, args))} exited {code}"


def import_file(path: Path) -> Any:
    """This test's own import of the model file (independent of qatconv.modelspec)."""
    name = f"_e2e_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta.get("format") == "pt"
    return json.loads(meta["qatconv"])


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def by_hand_folded(cls: type[nn.Module], path: Path) -> nn.Module:
    """The architecture with its known BNs replaced by Identity and biases added, loaded
    strictly from the folded file with safetensors only."""
    m = cls()
    for _, bn in cls.PAIRS:  # type: ignore[attr-defined]
        parent, _, name = bn.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, name, nn.Identity())
    for lin in cls.BIAS_ADDED:  # type: ignore[attr-defined]
        linear = m.get_submodule(lin)
        linear.bias = nn.Parameter(torch.zeros(linear.out_features))
    m.load_state_dict(load_file(path), strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model file, and per model: a float checkpoint and a data file."""
    d = tmp_path_factory.mktemp("unseen")
    (d / "unseen_models.py").write_text(UNSEEN)
    module = import_file(d / "unseen_models.py")
    rng = np.random.default_rng(0)
    files: dict[str, Any] = {"dir": d, "module": module}
    for name in NAMES:
        model = getattr(module, name)()
        save_file(model.state_dict(), d / f"{name}.safetensors", metadata={"format": "pt"})
        shape = INPUT_SHAPES.get(name, (64, 10))
        x = (rng.standard_normal(shape) * 1.5 + 0.3).astype(np.float32)
        np.savez(d / f"{name}.npz", inputs=x)
    return files


# ------------------------------------------------------------------------------- unseen models


@pytest.mark.parametrize("name", NAMES)
def test_unseen_model_prepare_fold_equals_the_float_model(
    name: str, unseen: dict[str, Any], tmp_path: Path
) -> None:
    d: Path = unseen["dir"]
    cls = getattr(unseen["module"], name)
    spec, weights, data = f"{d / 'unseen_models.py'}:{name}", d / f"{name}.safetensors", d / f"{name}.npz"
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    ok("prepare", "--model", spec, "--weights", weights, "--data", data, "-o", qat_path)
    meta = metadata(qat_path)
    assert [(p["linear"], p["bn"]) for p in meta["pairs"]] == cls.PAIRS
    ok("fold", qat_path, "-o", folded, "--check", data)

    src, got = load_file(weights), load_file(folded)
    fmeta = metadata(folded)
    assert sorted(fmeta["removed_bn"]) == sorted(bn for _, bn in cls.PAIRS)
    eps = {p["linear"]: p["eps"] for p in fmeta["pairs"]}
    bn_keys = {k for _, bn in cls.PAIRS for k in src if k.startswith(f"{bn}.")}
    added = {f"{lin}.bias" for lin in cls.BIAS_ADDED}
    assert set(got) == (set(src) - bn_keys) | added
    for lin, bn in cls.PAIRS:
        w, b = fold_state64(src, lin, bn, eps[lin])
        torch.testing.assert_close(got[f"{lin}.weight"], w, atol=0.0, rtol=ULP32)
        torch.testing.assert_close(got[f"{lin}.bias"], b, atol=0.0, rtol=ULP32)

    x = torch.from_numpy(np.load(data)["inputs"])
    float_model = cls()
    float_model.load_state_dict(src, strict=True)
    ref = run(float_model, x)
    assert_rel_close(run(by_hand_folded(cls, folded), x), ref)
    assert_rel_close(run(api.load_folded(cls(), folded), x), ref)

    # The plain fold of the float checkpoint writes the same tensors.
    plain = tmp_path / "plain.safetensors"
    ok("fold", "--model", spec, "--weights", weights, "-o", plain, "--check", data)
    other = load_file(plain)
    assert other.keys() == got.keys()
    assert all(torch.equal(other[k], got[k]) for k in got)


def test_emit_qparams_on_zero_gamma_and_all_positive_channels(
    unseen: dict[str, Any], tmp_path: Path
) -> None:
    d: Path = unseen["dir"]
    spec, weights = f"{d / 'unseen_models.py'}:ZeroGamma", d / "ZeroGamma.safetensors"
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    ok("prepare", "--model", spec, "--weights", weights, "--data", d / "ZeroGamma.npz", "-o",
       qat_path)
    ok("fold", qat_path, "-o", folded, "--emit-qparams")
    meta, got, q = metadata(folded), load_file(folded), load_file(qat_path)
    qmin, qmax = meta["quant_min"], meta["quant_max"]
    scale = got["fc.weight_scale"]
    assert scale.shape == (12, 1)
    zp = got.get("fc.weight_zero_point", torch.zeros(12, 1, dtype=torch.int32))
    assert zp.shape == (12, 1)
    deployed = torch.fake_quantize_per_channel_affine(
        got["fc.weight"], scale.flatten(), zp.flatten().to(torch.int32), 0, qmin, qmax)
    gamma = q["fc.bn.weight"].double()
    s = bn_scale64(q["fc.bn.running_var"], meta["pairs"][0]["eps"], gamma)
    scaled = (q["fc.weight"].double() * s[:, None]).float()
    qat_model = api.load_qat(qat_path)
    fq = qat_model.get_submodule("fc").weight_fake_quant
    with torch.no_grad():
        expected = fq(scaled)
    keep = gamma != 0
    assert int((~keep).sum()) == 4
    assert torch.equal(deployed[keep], expected[keep])
    # Zero-gamma rows fold to zero weights; whatever their scale, they stay zero.
    assert torch.equal(got["fc.weight"][~keep], torch.zeros_like(got["fc.weight"][~keep]))
    assert torch.equal(deployed[~keep], torch.zeros_like(deployed[~keep]))


def test_per_channel_symmetric_weights_have_zero_zero_points(
    unseen: dict[str, Any], tmp_path: Path
) -> None:
    d: Path = unseen["dir"]
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    ok("prepare", "--model", f"{d / 'unseen_models.py'}:ZeroGamma", "--weights",
       d / "ZeroGamma.safetensors", "--data", d / "ZeroGamma.npz", "-o", qat_path)
    assert metadata(qat_path)["scheme"] == "per_channel_symmetric"
    q = load_file(qat_path)
    assert bool((q["fc.weight"][1] > 0).all())  # the all-positive channel
    assert torch.equal(q["fc.weight_fake_quant.zero_point"],
                       torch.zeros_like(q["fc.weight_fake_quant.zero_point"]))
    ok("fold", qat_path, "-o", folded, "--emit-qparams")
    assert "fc.weight_zero_point" not in load_file(folded)


def test_fold_check_works_from_another_folder(
    unseen: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d: Path = unseen["dir"]
    monkeypatch.chdir(d)
    qat_path = tmp_path / "qat.safetensors"
    ok("prepare", "--model", "unseen_models.py:NoBias", "--weights", "NoBias.safetensors",
       "--data", "NoBias.npz", "-o", qat_path)
    monkeypatch.chdir(tmp_path)
    ok("fold", qat_path, "-o", tmp_path / "f.safetensors", "--check", d / "NoBias.npz")


def test_prepare_keeps_a_float16_checkpoint_float16(tmp_path: Path) -> None:
    half = tmp_path / "half.safetensors"
    state = load_file(SAMPLES / "digits_mlp.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, half,
              metadata={"format": "pt"})
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    spec = str(SAMPLES / "digits_mlp.py:DigitsMLP")
    plain = tmp_path / "plain.safetensors"
    ok("fold", "--model", spec, "--weights", half, "-o", plain)
    assert load_file(plain)["fc1.weight"].dtype == torch.float16
    ok("prepare", "--model", spec, "--weights", half, "--data",
       SAMPLES / "digits_calib.npz", "-o", qat_path)
    ok("fold", qat_path, "-o", folded)
    assert load_file(folded)["fc1.weight"].dtype == torch.float16


# ---------------------------------------------------------------------------- determinism


TAB = [
    "--model", str(SAMPLES / "tabular_resnet.py:TabularResNet"),
    "--weights", str(SAMPLES / "tabular_resnet.safetensors"),
    "--data", str(SAMPLES / "tabular_calib.npz"),
]


@pytest.mark.parametrize("mode", ["calibrate", "finetune"])
def test_prepare_is_byte_identical_for_the_same_inputs_and_seed(
    mode: str, tmp_path: Path
) -> None:
    extra = ["--mode", mode] + (["--steps", "20", "--batch-size", "32"] if mode == "finetune"
                                else [])
    outs = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for out in outs:
        ok("prepare", *TAB, *extra, "--seed", "3", "-o", out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    folds = [tmp_path / f"folded{i}.safetensors" for i in range(2)]
    for src, out in zip(outs, folds, strict=True):
        ok("fold", src, "-o", out, "--emit-qparams")
    assert folds[0].read_bytes() == folds[1].read_bytes()
    if mode == "finetune":
        other = tmp_path / "seed4.safetensors"
        ok("prepare", *TAB, *extra, "--seed", "4", "-o", other)
        a, b = load_file(outs[0]), load_file(other)
        assert a.keys() == b.keys()
        assert not torch.equal(a["stem.weight"], b["stem.weight"])


# ------------------------------------------------------------------------ sharded output


def test_sharded_fold_from_the_cli_loads_back(tmp_path: Path) -> None:
    qat_path = tmp_path / "qat.safetensors"
    ok("prepare", *TAB, "-o", qat_path)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.parent.mkdir()
    ok("fold", qat_path, "-o", index, "--max-shard-size", "4KB")
    shards = sorted(index.parent.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{k:05d}-of-{n:05d}.safetensors"
                                        for k in range(1, n + 1)]
    weight_map = json.loads(index.read_text())["weight_map"]
    assert set(weight_map.values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata().get("format") == "pt"
            assert set(f.keys()) == {k for k, v in weight_map.items() if v == shard.name}
    from sample_models.tabular_resnet import TabularResNet, load_calib

    x, _ = load_calib()
    ref_model = TabularResNet()
    ref_model.load_state_dict(load_file(SAMPLES / "tabular_resnet.safetensors"))
    assert_rel_close(run(api.load_folded(TabularResNet(), index), x), run(ref_model, x))
