"""Static W8A8 through prepare -> fold -> check, against references built from the files alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qatconv import api, qat
from qatconv.config import Activations, Backend, ModelConfig, QuantConfig, TrainConfig
from qatconv.pair_record import PairRecord
from qatconv.qat import QatLinearBn1d

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SPEC = f"{SAMPLES / 'digits_mlp.py'}:DigitsMLP"
WEIGHTS = SAMPLES / "digits_mlp.safetensors"
CALIB, HELDOUT = SAMPLES / "digits_calib.npz", SAMPLES / "digits_heldout.npz"


def _meta(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["qatconv"])


def _heldout() -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(HELDOUT)
    return torch.from_numpy(d["inputs"]).float(), torch.from_numpy(d["targets"])


def _prepare(out: Path, *, weights: Path = WEIGHTS, backend: Backend = Backend.x86,
             acts: Activations = Activations.int8, **kw: Any) -> api.PrepareReport:
    return api.prepare(ModelConfig(spec=SPEC, weights=weights), CALIB, out,
                       quant=QuantConfig(backend, 8, acts), **kw)


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("w8a8")
    report = _prepare(d / "qat.safetensors", backend=Backend.qnnpack)  # int8: zp != 0
    fold = api.fold(d / "folded.safetensors", qat_checkpoint=d / "qat.safetensors",
                    check=HELDOUT, emit_qparams=True)
    return {"dir": d, "report": report, "fold": fold, "qat": d / "qat.safetensors",
            "folded": d / "folded.safetensors"}


def test_qat_checkpoint_records_both_schemes_and_is_reproducible(
    w8a8: dict[str, Any], tmp_path: Path
) -> None:
    meta = _meta(w8a8["qat"])
    assert meta["activations"]["dtype"] == "qint8"
    assert (meta["activations"]["quant_min"], meta["activations"]["quant_max"]) == (-128, 127)
    assert meta["activations"]["granularity"] == "tensor" and not meta["activations"]["symmetric"]
    assert meta["weight_scheme"] == {"dtype": "qint8", "quant_min": -127, "quant_max": 127,
                                     "symmetric": True, "granularity": "channel", "bits": 8}
    tensors = load_file(w8a8["qat"])
    assert tensors["fc1.input_fake_quant.scale"].dtype == torch.float32
    again = tmp_path / "again.safetensors"
    _prepare(again, backend=Backend.qnnpack)
    assert again.read_bytes() == w8a8["qat"].read_bytes()


def test_calibrated_input_ranges_are_the_data_min_max(w8a8: dict[str, Any]) -> None:
    model = api.load_qat(w8a8["qat"])
    x = torch.from_numpy(np.load(CALIB)["inputs"]).float()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, mod in qat.qat_modules(model):
        mod.input_fake_quant.disable_fake_quant()
        mod.register_forward_pre_hook(
            lambda _m, a, n=name: seen.setdefault(n, []).append(a[0].detach()))
    with torch.no_grad():
        model(x)
    tensors = load_file(w8a8["qat"])
    for name, xs in seen.items():
        allx = torch.cat(xs)
        assert float(tensors[f"{name}.input_fake_quant.activation_post_process.min_val"]) == float(
            allx.min())
        assert float(tensors[f"{name}.input_fake_quant.activation_post_process.max_val"]) == float(
            allx.max())


def test_fold_writes_the_input_qparams(w8a8: dict[str, Any]) -> None:
    meta, got, q = _meta(w8a8["folded"]), load_file(w8a8["folded"]), load_file(w8a8["qat"])
    for lin in ("fc1", "fc2"):
        inp = meta["qparams"][lin]["input"]
        scale, zp = q[f"{lin}.input_fake_quant.scale"], q[f"{lin}.input_fake_quant.zero_point"]
        assert inp == {"scale": float(scale), "zero_point": int(zp), "qmin": -128, "qmax": 127,
                       "dtype": "qint8"}
        assert got[f"{lin}.input_scale"].shape == (1,)
        assert got[f"{lin}.input_scale"].dtype == torch.float32
        assert torch.equal(got[f"{lin}.input_scale"], scale)
        if int(zp) != 0:
            assert got[f"{lin}.input_zero_point"].dtype == torch.int32
            assert int(got[f"{lin}.input_zero_point"]) == int(zp)
        else:
            assert f"{lin}.input_zero_point" not in got
    assert meta["qparams"]["fc1"]["input"]["zero_point"] == -128  # inputs in [0, 1]
    cfg = meta["quantization_config"]
    group = cfg["config_groups"]["group_0"]
    assert group["targets"] == ["fc1", "fc2"] and cfg["ignore"] == []
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"]
    assert group["input_activations"]["strategy"] == "tensor"
    assert not group["input_activations"]["dynamic"] and group["input_activations"]["num_bits"] == 8


def _independent_emulation(folded: Path, x: torch.Tensor) -> np.ndarray:
    """DigitsMLP run from the folded file's tensors and metadata only, in numpy and Python
    ints: quantize (scale, zero point, range from the metadata), int64 matmul, rescale."""
    t = {k: v.double().numpy() for k, v in load_file(folded).items() if v.is_floating_point()}
    meta = _meta(folded)

    def qlinear(h: np.ndarray, name: str) -> np.ndarray:
        qp, inp = meta["qparams"][name], meta["qparams"][name]["input"]
        s_w = np.asarray(qp["scale"], np.float32)[:, None]
        w = t[f"{name}.weight"].astype(np.float32)
        wq = np.clip(np.rint(w * (np.float32(1) / s_w)), qp["quant_min"], qp["quant_max"])
        s_x = np.float32(inp["scale"])
        xq = np.clip(np.rint(h.astype(np.float32) * (np.float32(1) / s_x)) + inp["zero_point"],
                     inp["qmin"], inp["qmax"])
        acc = (xq.astype(np.int64) - inp["zero_point"]) @ wq.astype(np.int64).T
        return acc * (float(s_x) * s_w.T.astype(np.float64)) + t[f"{name}.bias"]

    h = np.maximum(qlinear(x.numpy(), "fc1"), 0)
    h = np.maximum(qlinear(h, "fc2"), 0)
    return h @ t["head.weight"].T + t["head.bias"]


def test_an_independent_integer_emulation_reproduces_the_qat_model(w8a8: dict[str, Any]) -> None:
    x, _ = _heldout()
    with torch.no_grad():
        sim = api.load_qat(w8a8["qat"])(x).double().numpy()
    emu = _independent_emulation(w8a8["folded"], x)
    span = sim.max() - sim.min()
    assert np.abs(emu - sim).max() <= 1e-3 * span
    assert (emu.argmax(1) == sim.argmax(1)).mean() >= 0.9975
    ours = api.emulate_folded(w8a8["folded"], x).tensors[0].double().numpy()
    np.testing.assert_allclose(ours, emu, rtol=0, atol=1e-5)  # float32 head vs float64


def test_fold_check_reports_the_integer_emulation(w8a8: dict[str, Any]) -> None:
    check = w8a8["fold"].check
    assert check.passed and check.integer is not None and check.integer.passed
    j = check.to_json()["integer"]
    assert j["linears"] == ["fc1", "fc2"] and j["samples"] == 400
    assert j["top1_agreement"] >= 0.9975
    assert j["max_abs_error"] <= 1e-3 * j["output_range"]
    assert j["max_step_error"] < 0.5  # no input integer moved by the emulation


def test_integer_check_beyond_tolerance_exits_4_and_writes_nothing(
    w8a8: dict[str, Any], tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qatconv import emulate

    real = emulate.emulate_linear
    monkeypatch.setattr(emulate, "emulate_linear", lambda *a: real(*a) + 0.5)
    out = tmp_path / "folded.safetensors"
    r = cli("fold", w8a8["qat"], "-o", out, "--check", HELDOUT, "--json")
    assert r.code == 4, r.err
    assert "integer emulation" in r.json()["error"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_excluded_pairs_stay_float_and_fold_like_the_float_model(tmp_path: Path) -> None:
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    report = _prepare(qat_path, exclude=["fc2"])
    assert [r["linear"] for r in report.pairs] == ["fc1"]
    assert {s["linear"]: s["code"] for s in report.skipped} == {"fc2": "excluded"}
    q, f = load_file(qat_path), load_file(WEIGHTS)
    for k in ("fc2.weight", "fc2.bias", "bn2.weight", "bn2.bias", "bn2.running_mean",
              "bn2.running_var"):
        assert torch.equal(q[k], f[k]), k  # bit-identical to the float checkpoint
    model = api.load_qat(qat_path)
    assert not isinstance(model.fc2, QatLinearBn1d)
    api.fold(folded, qat_checkpoint=qat_path, check=HELDOUT)
    plain = tmp_path / "plain.safetensors"
    api.fold(plain, model_cfg=ModelConfig(spec=SPEC, weights=WEIGHTS))
    got, want = load_file(folded), load_file(plain)
    assert torch.equal(got["fc2.weight"], want["fc2.weight"])
    assert torch.equal(got["fc2.bias"], want["fc2.bias"])
    meta = _meta(folded)
    assert set(meta["qparams"]) == {"fc1"} and meta["excluded"] == ["fc2"]
    assert meta["quantization_config"]["ignore"] == ["fc2"]
    assert {"bn1", "bn2"} == set(meta["removed_bn"])


def test_weight_only_writes_what_it_always_wrote(tmp_path: Path) -> None:
    path = tmp_path / "qat.safetensors"
    _prepare(path, acts=Activations.none)
    meta, tensors = _meta(path), load_file(path)
    assert not {"activations", "weight_scheme", "excluded"} & set(meta)
    assert not any("input_fake_quant" in k for k in tensors)
    # The same model built and calibrated by hand, weight-only: bit-identical state.
    from qatconv.data import load_data

    model = api.load_model(ModelConfig(spec=SPEC, weights=WEIGHTS)).model
    torch.manual_seed(0)
    records = [PairRecord.from_json(r, path) for r in meta["pairs"]]
    qat.swap_pairs_(model, records, qat.make_qconfig(QuantConfig()))
    qat.calibrate_(model, load_data(CALIB).inputs.float(), batch_size=TrainConfig().batch_size,
                   recalibrate_bn=False)
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(dtype: torch.dtype, tmp_path: Path) -> None:
    weights = tmp_path / "half.safetensors"
    save_file({k: v.to(dtype) if v.is_floating_point() else v
               for k, v in load_file(WEIGHTS).items()}, weights)
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    _prepare(qat_path, weights=weights, sensitivity=False)
    q = load_file(qat_path)
    assert q["fc1.weight"].dtype == dtype
    assert q["fc1.input_fake_quant.scale"].dtype == torch.float32  # quant state stays float32
    result = api.fold(folded, qat_checkpoint=qat_path, check=HELDOUT, emit_qparams=True)
    assert result.check is not None and result.check.integer is not None
    assert result.check.integer.passed and result.check.integer.top1_agreement >= 0.99
    # The simulation quantized the folded weight as stored (rounded through the 16-bit dtype),
    # so no integer moved: what is left is the folded bias's 16-bit rounding.
    assert result.check.integer.max_step_error < 0.5
    assert load_file(folded)["fc1.input_scale"].dtype == torch.float32
    model = api.load_qat(qat_path)
    assert model.fc1.weight_storage_dtype == dtype
    with torch.no_grad():  # the simulated weight is the folded file's weight, quantized
        sim_w = model.fc1.weight_fake_quant(model.fc1.scaled_weight(model.fc1.fold_scale64()))
    got = load_file(folded)
    w, s = got["fc1.weight"].float(), got["fc1.weight_scale"]
    ints = torch.clamp(torch.round(w * (1 / s)), -128, 127)
    assert torch.equal(ints * s, sim_w)


def test_token_wise_pairs_quantize_their_inputs_per_tensor(tmp_path: Path) -> None:
    from test_levit_like import SPEC as LEVIT  # the LeViT pattern: 8 token-wise pairs
    from test_levit_like import _files

    _, weights, _x, data = _files(tmp_path)
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    api.prepare(ModelConfig(spec=LEVIT, weights=weights), data, qat_path, sensitivity=False)
    result = api.fold(folded, qat_checkpoint=qat_path, check=data, emit_qparams=True)
    assert result.check is not None and result.check.integer is not None
    assert result.check.integer.passed, result.check.integer
    meta = _meta(folded)
    assert len(meta["qparams"]) == 8 and all(q["input"] for q in meta["qparams"].values())
    assert all(load_file(folded)[f"{n}.input_scale"].shape == (1,) for n in meta["qparams"])


def test_cli_exclude_typo_and_sensitivity_json(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "qat.safetensors"
    base = ("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB, "-o", out)
    r = cli(*base, "--exclude", "fc9", "--json")
    assert r.code == 2 and "fc9" in r.json()["error"] and not out.exists()
    r = cli(*base, "--json")
    assert r.code == 0, r.err
    table = r.json()["sensitivity"]
    assert [t["linear"] for t in table] == ["fc1", "fc2"]
    assert all(t["sqnr_w8a8_db"] <= t["sqnr_weight_only_db"] for t in table)


def test_sensitivity_is_measured_unasked_only_for_few_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qatconv import sensitivity

    monkeypatch.setattr(sensitivity, "SENSITIVITY_AUTO_PAIRS", 1)  # digits has 2 pairs
    notes: list[str] = []
    report = _prepare(tmp_path / "a.safetensors", on_note=notes.append)
    assert report.sensitivity == [] and any("--sensitivity" in n for n in notes)
    forced = _prepare(tmp_path / "b.safetensors", sensitivity=True)
    assert [t["linear"] for t in forced.sensitivity] == ["fc1", "fc2"]
    # The table never changes the checkpoint.
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
