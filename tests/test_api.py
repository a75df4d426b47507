"""The pipeline through `qatconv.api` on the shipped sample models, end to end.

Every expectation is computed here, independently of the code under test: the classic eval-mode
BatchNorm fold in float64 from the checkpoint's raw tensors (``s = gamma / sqrt(var + eps)``,
``W' = W * s[:, None]``, ``b' = (b - mean) * s + beta``, cast to float32), and the unfused float
model (the sample's own class with its checkpoint loaded by `safetensors`) in eval mode.

Tolerances:
- folded tensors vs the float64 fold: ``atol=0, rtol=2**-23`` (at most one float32 ulp: this
  file's ``1 / sqrt`` and the library's ``rsqrt`` may round the last float64 bit differently
  before the cast).
- model outputs: ``max|got - ref| <= 1e-5 * max|ref|`` (reference.REL). Folding moves float32 rounding
  (~6e-8 of each intermediate's magnitude) around; an element-wise relative error is
  meaningless for outputs near zero, so the bound is relative to the output's scale.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reference import assert_rel_close, bn_scale64, fold_state64
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from qatconv import api
from qatconv.config import Mode, ModelConfig, QuantConfig, TrainConfig
from qatconv.errors import CheckFailedError
from qatconv.qat import set_fake_quant_
from sample_models.digits_mlp import DigitsMLP
from sample_models.tabular_resnet import TabularResNet

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
ULP32 = 2.0**-23


class Sample:
    """One shipped model: its class, spec, checkpoint, data and the pairs it must have."""

    def __init__(self, cls: type[nn.Module], spec: str, weights: str, calib: str, check: str,
                 pairs: list[tuple[str, str]]) -> None:
        self.cls = cls
        self.spec = str(SAMPLES / spec)
        self.weights = SAMPLES / weights
        self.calib = SAMPLES / calib
        self.check = SAMPLES / check
        self.pairs = pairs

    def cfg(self, weights: Path | None = None) -> ModelConfig:
        return ModelConfig(spec=self.spec, weights=weights or self.weights)


SAMPLE_MODELS = {
    "digits": Sample(DigitsMLP, "digits_mlp.py:DigitsMLP", "digits_mlp.safetensors",
                     "digits_calib.npz", "digits_heldout.npz", [("fc1", "bn1"), ("fc2", "bn2")]),
    "tabular": Sample(
        TabularResNet, "tabular_resnet.py:TabularResNet", "tabular_resnet.safetensors",
        "tabular_calib.npz", "tabular_calib.npz",
        [("stem", "stem_bn")]
        + [(f"blocks.{i}.lin{j}", f"blocks.{i}.bn{j}") for i in range(2) for j in (1, 2)],
    ),
}
DIGITS = SAMPLE_MODELS["digits"]


# ------------------------------------------------------------------------------------ helpers


def assert_ulp_equal(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=0.0, rtol=ULP32)


def inputs_of(path: Path) -> torch.Tensor:
    with np.load(path) as d:
        return torch.from_numpy(d["inputs"]).float()


def targets_of(path: Path) -> torch.Tensor:
    with np.load(path) as d:
        return torch.from_numpy(d["targets"])


def float_model(sample: Sample) -> nn.Module:
    m = sample.cls()
    m.load_state_dict(load_file(sample.weights), strict=True)
    return m.eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta.get("format") == "pt"
    return json.loads(meta["qatconv"])


def by_hand_folded(sample: Sample, path: Path) -> nn.Module:
    """The original architecture with its (known) BNs replaced by Identity, loaded strictly
    from the folded file with safetensors only."""
    m = sample.cls()
    for _, bn in sample.pairs:
        parent, _, name = bn.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, name, nn.Identity())
    m.load_state_dict(load_file(path), strict=True)
    return m.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_folded_file(sample: Sample, folded: Path) -> None:
    """Tensors = float64 fold of the float checkpoint; BN tensors gone; the rest bit-identical;
    outputs = the float model's, through load_folded and through a by-hand load."""
    src = load_file(sample.weights)
    got = load_file(folded)
    bn_keys = {k for _, bn in sample.pairs for k in src if k.startswith(f"{bn}.")}
    assert set(got) == set(src) - bn_keys
    eps = {p["linear"]: p["eps"] for p in metadata(folded)["pairs"]}
    assert sorted(eps) == sorted(lin for lin, _ in sample.pairs)
    for lin, bn in sample.pairs:
        w, b = fold_state64(src, lin, bn, eps[lin])
        assert_ulp_equal(got[f"{lin}.weight"], w)
        assert_ulp_equal(got[f"{lin}.bias"], b)
    folded_linears = {f"{lin}.{t}" for lin, _ in sample.pairs for t in ("weight", "bias")}
    for k in set(got) - folded_linears:
        assert torch.equal(got[k], src[k]), k

    x = inputs_of(sample.check)
    ref = run(float_model(sample), x)
    assert_rel_close(run(api.load_folded(sample.cls(), folded), x), ref)
    assert_rel_close(run(by_hand_folded(sample, folded), x), ref)


# ------------------------------------------------------------------------- calibrate + fold


@pytest.mark.parametrize("name", sorted(SAMPLE_MODELS))
def test_calibrate_then_fold_is_the_float64_bn_fold(name: str, tmp_path: Path) -> None:
    sample = SAMPLE_MODELS[name]
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    report = api.prepare(sample.cfg(), sample.calib, qat_path)
    assert [(p["linear"], p["bn"]) for p in report.pairs] == sample.pairs
    meta = metadata(qat_path)
    assert meta["stage"] == "qat" and meta["mode"] == "calibrate"
    # Calibration keeps the checkpoint's weights and BN statistics in the QAT file.
    src, q = load_file(sample.weights), load_file(qat_path)
    for lin, bn in sample.pairs:
        assert torch.equal(q[f"{lin}.weight"], src[f"{lin}.weight"])
        for t in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(q[f"{lin}.bn.{t}"], src[f"{bn}.{t}"]), (lin, t)

    result = api.fold(folded, qat_checkpoint=qat_path, check=sample.check)
    assert result.source_stage == "qat" and result.files == [folded]
    assert result.check is not None and result.check.passed
    fmeta = metadata(folded)
    assert fmeta["stage"] == "folded"
    assert sorted(fmeta["removed_bn"]) == sorted(bn for _, bn in sample.pairs)
    check_folded_file(sample, folded)


@pytest.mark.parametrize("name", sorted(SAMPLE_MODELS))
def test_plain_fold_of_the_float_checkpoint(name: str, tmp_path: Path) -> None:
    sample = SAMPLE_MODELS[name]
    folded = tmp_path / "plain.safetensors"
    result = api.fold(folded, model_cfg=sample.cfg(), check=sample.check)
    assert result.source_stage == "float"
    assert result.check is not None and result.check.passed and result.check.reference == "float"
    assert metadata(folded)["source_stage"] == "float"
    check_folded_file(sample, folded)


def test_plain_fold_reads_a_pt_container_with_ddp_prefix(tmp_path: Path) -> None:
    src = load_file(DIGITS.weights)
    pt = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.items()}, "epoch": 7}, pt)
    folded = tmp_path / "from_pt.safetensors"
    result = api.fold(folded, model_cfg=DIGITS.cfg(pt))
    notes = " | ".join(result.notes)
    assert "state_dict" in notes, notes
    assert "module." in notes, notes
    check_folded_file(DIGITS, folded)
    # The same bytes of tensors as folding the safetensors checkpoint.
    direct = tmp_path / "direct.safetensors"
    api.fold(direct, model_cfg=DIGITS.cfg())
    a, b = load_file(folded), load_file(direct)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ inputs stay untouched


def test_prepare_leaves_the_float_checkpoint_and_data_untouched(tmp_path: Path) -> None:
    before = {p: sha256(p) for p in (DIGITS.weights, DIGITS.calib)}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    api.prepare(DIGITS.cfg(), DIGITS.calib, tmp_path / "q.safetensors",
                train=TrainConfig(mode=Mode.finetune, steps=10, batch_size=32))
    assert {p: sha256(p) for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes


def test_load_model_is_not_changed_by_prepare_or_fold(tmp_path: Path) -> None:
    """Fine-tuning updates weights and BN stats: the float model read afterwards is unchanged."""
    ref = {k: v.clone() for k, v in float_model(DIGITS).state_dict().items()}
    api.prepare(DIGITS.cfg(), DIGITS.calib, tmp_path / "q.safetensors",
                train=TrainConfig(mode=Mode.finetune, steps=10, batch_size=32, lr=1e-2))
    api.fold(tmp_path / "f.safetensors", qat_checkpoint=tmp_path / "q.safetensors")
    after = api.load_model(DIGITS.cfg()).model.state_dict()
    assert ref.keys() == after.keys() and all(torch.equal(ref[k], after[k]) for k in ref)
    q = load_file(tmp_path / "q.safetensors")
    assert not torch.equal(q["fc1.weight"], ref["fc1.weight"]), "fine-tune took no step"


def test_recalibrate_bn_gives_exact_averages_and_a_faithful_fold(tmp_path: Path) -> None:
    """--recalibrate-bn: each BN's stats become the exact mean / unbiased variance of its input
    over the data, pair by pair in graph order (upstream BNs already re-estimated). Reference:
    the float model in float64 with forward pre-hooks; bound 1e-6 (float32 forward inside
    the library vs float64 here)."""
    sample = SAMPLE_MODELS["tabular"]
    qat_path, folded = tmp_path / "qat.safetensors", tmp_path / "folded.safetensors"
    api.prepare(sample.cfg(), sample.calib, qat_path, train=TrainConfig(recalibrate_bn=True))
    x = inputs_of(sample.calib)
    ref = float_model(sample).double()
    for _, bn in sample.pairs:
        mod = ref.get_submodule(bn)
        seen: list[torch.Tensor] = []
        handle = mod.register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0]))
        run(ref, x.double())
        handle.remove()
        with torch.no_grad():
            mod.running_mean.copy_(seen[0].mean(0))
            mod.running_var.copy_(seen[0].var(0, unbiased=True))
    q = load_file(qat_path)
    for lin, bn in sample.pairs:
        mod = ref.get_submodule(bn)
        mean, var = q[f"{lin}.bn.running_mean"].double(), q[f"{lin}.bn.running_var"].double()
        std = mod.running_var.sqrt()
        assert float(((mean - mod.running_mean).abs() / std).max()) < 1e-6, lin
        assert float(((var - mod.running_var).abs() / mod.running_var).max()) < 1e-6, lin
        # The shipped stats really were replaced (they are far from these data's).
        assert not torch.allclose(mod.running_var.float(), load_file(sample.weights)[
            f"{bn}.running_var"], rtol=1e-2)
    api.fold(folded, qat_checkpoint=qat_path)
    assert_rel_close(run(api.load_folded(sample.cls(), folded), x), run(ref.float(), x))


# ------------------------------------------------------------------- fine-tune at 8 bits


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Digits fine-tuned at 8 bits on the train split, then folded with --emit-qparams."""
    d = tmp_path_factory.mktemp("finetune")
    qat_path, folded = d / "qat_w8.safetensors", d / "folded_w8.safetensors"
    api.prepare(DIGITS.cfg(), SAMPLES / "digits_train.npz", qat_path,
                train=TrainConfig(mode=Mode.finetune, steps=120, batch_size=128, lr=1e-3),
                quant=QuantConfig(weight_bits=8))
    api.fold(folded, qat_checkpoint=qat_path, emit_qparams=True)
    return {"qat": qat_path, "folded": folded}


def test_finetune_w8_int8_simulated_accuracy_is_within_0_3_points_of_float(
    finetuned: dict[str, Path],
) -> None:
    x, y = inputs_of(DIGITS.check), targets_of(DIGITS.check)
    float_acc = float((run(float_model(DIGITS), x).argmax(1) == y).double().mean())
    qat_model = api.load_qat(finetuned["qat"])
    qat_acc = float((run(qat_model, x).argmax(1) == y).double().mean())
    assert float_acc == pytest.approx(0.98)  # the shipped checkpoint (sample_models/README.md)
    assert abs(qat_acc - float_acc) <= 0.003, (qat_acc, float_acc)
    # The simulation really quantizes: it differs from the same weights without fake quant.
    fq_on = run(qat_model, x)
    set_fake_quant_(qat_model, fake_quant=False, observer=False)
    assert not torch.equal(fq_on, run(qat_model, x))


def _qat_as_float_model(qat_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The unfused float architecture holding the QAT checkpoint's weights and BN stats: what
    the QAT model computes with fake quant off, in eval mode."""
    meta = metadata(qat_path)
    q = load_file(qat_path)
    state: dict[str, torch.Tensor] = {}
    for k, v in q.items():
        if ".weight_fake_quant." in f".{k}" or ".input_fake_quant." in f".{k}":
            continue
        for p in meta["pairs"]:
            if k.startswith(f"{p['qat']}.bn."):
                k = f"{p['bn']}.{k.removeprefix(p['qat'] + '.bn.')}"
        state[k] = v
    m = DigitsMLP()
    m.load_state_dict(state, strict=True)
    return m.eval(), meta


def test_fold_of_finetuned_checkpoint_matches_qat_without_fake_quant(
    finetuned: dict[str, Path],
) -> None:
    x = inputs_of(DIGITS.check)
    unfused, meta = _qat_as_float_model(finetuned["qat"])
    ref = run(unfused, x)
    folded = api.load_folded(DigitsMLP(), finetuned["folded"])
    assert_rel_close(run(folded, x), ref)
    # The library's own reference (QAT model, fake quant and observers off) agrees too.
    qat_model = api.load_qat(finetuned["qat"])
    set_fake_quant_(qat_model, fake_quant=False, observer=False)
    assert_rel_close(run(qat_model, x), ref)
    # And the folded tensors are the float64 fold of the fine-tuned tensors.
    q, got = load_file(finetuned["qat"]), load_file(finetuned["folded"])
    for p in meta["pairs"]:
        w, b = fold_state64(q, p["qat"], p["bn"], p["eps"], prefix=f"{p['qat']}.bn")
        assert_ulp_equal(got[f"{p['linear']}.weight"], w)
        assert_ulp_equal(got[f"{p['linear']}.bias"], b)


def test_emit_qparams_reproduce_the_qat_fake_quantized_weight(finetuned: dict[str, Path]) -> None:
    meta, got, q = metadata(finetuned["folded"]), load_file(finetuned["folded"]), load_file(
        finetuned["qat"])
    qmin, qmax = meta["quant_min"], meta["quant_max"]
    assert (qmin, qmax) == (-128, 127)
    qat_model = api.load_qat(finetuned["qat"])
    for p in meta["pairs"]:
        lin, out = p["linear"], p["out_features"]
        scale = got[f"{lin}.weight_scale"]
        assert scale.shape == (out, 1) and scale.dtype == torch.float32
        zp = got.get(f"{lin}.weight_zero_point", torch.zeros(out, 1, dtype=torch.int32))
        assert zp.shape == (out, 1)
        deployed = torch.fake_quantize_per_channel_affine(
            got[f"{lin}.weight"], scale.flatten(), zp.flatten().to(torch.int32), 0, qmin, qmax)
        # The QAT fake-quantized weight, recomputed here: the module's weight_fake_quant
        # (observer off, so its stored qparams) applied to W * gamma / sqrt(var + eps).
        qb = f"{p['qat']}.bn"
        gamma = q[f"{qb}.weight"].double()
        s = bn_scale64(q[f"{qb}.running_var"], p["eps"], gamma)
        scaled = (q[f"{p['qat']}.weight"].double() * s[:, None]).float()
        fq = qat_model.get_submodule(p["qat"]).weight_fake_quant
        assert not bool(fq.observer_enabled[0])
        with torch.no_grad():
            expected = fq(scaled)
        keep = gamma != 0
        assert torch.equal(deployed[keep], expected[keep]), lin
        # The deployed weight is on the integer grid: it really is quantized.
        assert not torch.equal(deployed, got[f"{lin}.weight"])


def test_folded_metadata_records_per_pair_quant_params(finetuned: dict[str, Path]) -> None:
    meta = metadata(finetuned["folded"])
    per_pair = meta.get("qparams") or {}
    for p in meta["pairs"]:
        info = per_pair.get(p["linear"]) or p
        assert {"scheme", "quant_min", "quant_max"} <= set(info), (p["linear"], info)


# ----------------------------------------------------------------- check, shards, errors


def test_fold_check_fails_when_the_metadata_lies_about_eps(tmp_path: Path) -> None:
    """A real wrong fold: the QAT file claims eps = 0.5, the model's BNs use 1e-5."""
    from safetensors.torch import save_file

    qat_path = tmp_path / "qat.safetensors"
    api.prepare(DIGITS.cfg(), DIGITS.calib, qat_path)
    meta = metadata(qat_path)
    for p in meta["pairs"]:
        p["eps"] = 0.5
    lying = tmp_path / "lying.safetensors"
    save_file(load_file(qat_path), lying, metadata={"format": "pt", "qatconv": json.dumps(meta)})
    with pytest.raises(CheckFailedError, match="differs"):
        api.fold(tmp_path / "f.safetensors", qat_checkpoint=lying, check=DIGITS.check)


def test_sharded_output_loads_back(tmp_path: Path) -> None:
    sample = SAMPLE_MODELS["tabular"]
    qat_path = tmp_path / "qat.safetensors"
    api.prepare(sample.cfg(), sample.calib, qat_path)
    index = tmp_path / "out" / "model.safetensors.index.json"
    index.parent.mkdir()
    result = api.fold(index, qat_checkpoint=qat_path, max_shard_size=api.parse_size("5KB"))
    shards = sorted(index.parent.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert index.exists() and set(result.files) == {index, *shards}
    weight_map = json.loads(index.read_text())["weight_map"]
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(shard)
        assert not set(part) & set(merged)
        assert all(weight_map[k] == shard.name for k in part)
        merged.update(part)
    assert set(merged) == set(weight_map)
    # The shards together hold exactly the single-file fold.
    single = tmp_path / "single.safetensors"
    api.fold(single, qat_checkpoint=qat_path)
    one = load_file(single)
    assert merged.keys() == one.keys() and all(torch.equal(merged[k], one[k]) for k in one)
    x = inputs_of(sample.check)
    assert_rel_close(run(api.load_folded(sample.cls(), index), x), run(float_model(sample), x))
