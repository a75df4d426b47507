"""`python -m qatconv demo --json` as a user runs it: a real subprocess (~12 s), one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qatconv import api
from sample_models.digits_mlp import DigitsMLP, load_split

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out_dir = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "qatconv", "demo", "--output-dir", str(out_dir), "--json"],
        capture_output=True, text=True, timeout=300, cwd=out_dir.parent, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return {"json": json.loads(proc.stdout), "dir": out_dir, "stderr": proc.stderr}


def _float_heldout_accuracy() -> float:
    model = DigitsMLP()
    model.load_state_dict(load_file(SAMPLES / "digits_mlp.safetensors"))
    x, y = load_split("heldout")
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).double().mean())


def test_demo_json_has_the_contract_keys(demo: dict[str, Any]) -> None:
    obj = demo["json"]
    for key in ("float_accuracy", "ptq_accuracy", "qat_accuracy", "folded_accuracy",
                "max_fold_error", "seconds", "files"):
        assert key in obj, key
    for key in ("ptq_accuracy", "qat_accuracy"):
        accs = obj[key]
        assert "8" in accs and all(k.isdigit() and 2 <= int(k) <= 8 for k in accs), accs
        assert all(0.0 <= v <= 1.0 for v in accs.values())
    # 8 bits, 4 bits, and the widest low width where PTQ loses >= 2 points (its "low_bits").
    low = obj["low_bits"]
    assert {"8", "4", str(low)} == set(obj["qat_accuracy"]), obj["qat_accuracy"]
    assert str(low) in obj["ptq_accuracy"]
    assert all(isinstance(v, (int, float)) and v >= 0 for v in obj["seconds"].values())
    assert obj["seconds"]


def test_demo_accuracies(demo: dict[str, Any]) -> None:
    obj = demo["json"]
    float_acc = _float_heldout_accuracy()
    assert obj["float_accuracy"] == pytest.approx(float_acc, abs=1e-12)
    assert abs(obj["qat_accuracy"]["8"] - float_acc) <= 0.003
    low = str(obj["low_bits"])
    ptq_loss = float_acc - obj["ptq_accuracy"][low]
    assert ptq_loss > 0, "the low width must lose accuracy under PTQ"
    recovered = obj["qat_accuracy"][low] - obj["ptq_accuracy"][low]
    assert recovered >= 0.5 * ptq_loss, (low, obj["ptq_accuracy"][low], obj["qat_accuracy"][low])
    # The folded 8-bit model is the QAT model without fake quant: float-level accuracy.
    assert abs(obj["folded_accuracy"] - float_acc) <= 0.003
    assert 0.0 <= obj["max_fold_error"] < 1e-4


def test_demo_files_exist_and_load(demo: dict[str, Any]) -> None:
    files = [Path(f) for f in demo["json"]["files"]]
    assert files
    for f in files:
        assert f.is_file(), f
        assert f.resolve().is_relative_to(demo["dir"].resolve())
        assert load_file(f)
    folded = [f for f in files if "fold" in f.name]
    assert [f.name for f in folded] == ["digits_folded_w8.safetensors",
                                        "digits_folded_w8a8.safetensors"]
    model = api.load_folded(DigitsMLP(), folded[0])
    x, y = load_split("heldout")
    with torch.no_grad():
        acc = float((model.eval()(x).argmax(1) == y).double().mean())
    assert acc == pytest.approx(demo["json"]["folded_accuracy"], abs=1e-12)


def test_demo_runs_the_int8_model_in_onnxruntime(demo: dict[str, Any]) -> None:
    pytest.importorskip("onnxruntime")
    obj = demo["json"]
    o = obj["onnxruntime"]
    assert o["kernels"] and set(o["kernels"]) <= {
        "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}, o
    assert Path(o["file"]).is_file()
    # The int8 model onnxruntime runs classifies as the QAT simulation it was checked against.
    assert o["top1_agreement_vs_simulation"] >= 0.9975
    assert o["mode"] == "static" and o["kernels"] == ["QGemm"]
    assert abs(obj["onnxruntime_accuracy"] - obj["a8"]["qat_accuracy"]["8"]) <= 0.003
    assert abs(obj["onnxruntime_accuracy"] - obj["float_accuracy"]) <= 0.003


def test_demo_w8a8_rows(demo: dict[str, Any]) -> None:
    obj = demo["json"]
    a8 = obj["a8"]
    float_acc = _float_heldout_accuracy()
    assert set(a8["ptq_accuracy"]) == set(a8["qat_accuracy"]) == set(obj["qat_accuracy"])
    assert abs(a8["qat_accuracy"]["8"] - float_acc) <= 0.003
    # QAT recovers at least half of what PTQ loses, at the widest weight width where PTQ W?A8
    # loses >= 2 points (there is a loss to recover; PTQ W4A8 loses nothing on digits).
    low = str(obj["low_bits"])
    ptq_loss = float_acc - a8["ptq_accuracy"][low]
    assert ptq_loss >= 0.02
    assert a8["qat_accuracy"][low] - a8["ptq_accuracy"][low] >= 0.5 * ptq_loss
    # W4A8: PTQ already matches float, so QAT must only stay within 3 of the 400 held-out
    # samples (0.75 pt; the binomial standard error at 98% is 0.7 pt) of the better of the two.
    best = max(float_acc, a8["ptq_accuracy"]["4"])
    assert a8["qat_accuracy"]["4"] >= best - 3 / 400 - 1e-12
    check = a8["integer_check"]
    assert check["passed"] and check["samples"] == 400
    assert check["top1_agreement"] >= 0.9975
    assert check["max_abs_error"] <= 1e-3 * check["output_range"]
    # The emulated accuracy, recomputed from the folded W8A8 file alone.
    folded = demo["dir"] / "digits_folded_w8a8.safetensors"
    x, y = load_split("heldout")
    logits = api.emulate_folded(folded, x).tensors[0]
    assert float((logits.argmax(1) == y).double().mean()) == a8["emulated_accuracy"]
    assert abs(a8["emulated_accuracy"] - a8["qat_accuracy"]["8"]) <= 0.0025
