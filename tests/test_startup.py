"""`qatconv --help` and `qatconv inspect x.safetensors` never import torch (it costs ~1.2 s) nor onnx.

Each check is a fresh interpreter (`python -c`) that runs `qatconv.cli.main([...])` in-process and
then reports the exit codes and whether `torch` is in `sys.modules`: two subprocesses in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"

SCRIPT = r"""
import contextlib, io, json, sys
from qatconv.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxruntime"))
print(json.dumps({"results": results, "torch_modules": heavy[:5]}))
"""


def _run(argvs: list[list[str]]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QATCONV_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(argvs)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for r in report["results"]:
        assert r["code"] == 0, r
    return report


def test_help_and_version_do_not_import_torch() -> None:
    report = _run([["--help"], ["prepare", "--help"], ["fold", "--help"], ["--version"],
                   ["export", "--help"]])
    assert report["torch_modules"] == []
    assert "prepare" in report["results"][0]["out"]
    assert report["results"][3]["out"].startswith("qatconv ")


def test_inspect_safetensors_does_not_import_torch(tmp_path: Path) -> None:
    from qatconv import api
    from qatconv.config import ModelConfig

    qat = tmp_path / "qat.safetensors"
    api.prepare(ModelConfig(spec=str(SAMPLES / "digits_mlp.py:DigitsMLP"),
                            weights=SAMPLES / "digits_mlp.safetensors"),
                SAMPLES / "digits_calib.npz", qat)
    report = _run([
        ["inspect", str(SAMPLES / "digits_mlp.safetensors")],
        ["inspect", str(qat), "--json"],
    ])
    assert report["torch_modules"] == []
    assert "safetensors" in report["results"][0]["err"]
    obj = json.loads(report["results"][1]["out"])
    assert obj["qatconv"]["stage"] == "qat"
    assert [p["linear"] for p in obj["qatconv"]["pairs"]] == ["fc1", "fc2"]


# Importing torch raises in the child: a model-free fold must not need it.
BLOCK_TORCH = r"""
import importlib.abc, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"{name} is blocked by this test")
        return None

sys.meta_path.insert(0, _NoTorch())
"""


def test_model_free_fold_runs_with_torch_unimportable(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    from qatconv import api
    from qatconv.config import ModelConfig, QuantConfig

    qat = tmp_path / "qat.safetensors"
    api.prepare(ModelConfig(spec=str(SAMPLES / "digits_mlp.py:DigitsMLP"),
                            weights=SAMPLES / "digits_mlp.safetensors"),
                SAMPLES / "digits_calib.npz", qat, quant=QuantConfig(weight_bits=4))
    with_torch = tmp_path / "with_torch.safetensors"
    api.fold(with_torch, qat_checkpoint=qat, emit_qparams=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "no_torch.safetensors"
    argv = ["fold", str(qat), "-o", str(out), "--emit-qparams", "--json"]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + SCRIPT, json.dumps([argv])],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["results"][0]["code"] == 0, report["results"][0]
    assert report["torch_modules"] == []
    assert out.read_bytes() == with_torch.read_bytes()
    # and it is torch's fuse_linear_bn_weights in float64, cast to float32, bit for bit
    folded, qat_sd = load_file(out), load_file(qat)
    for path in ("fc1", "fc2"):
        t = {k: qat_sd[f"{path}.{k}"].double() for k in (
            "weight", "bias", "bn.running_mean", "bn.running_var", "bn.weight", "bn.bias")}
        w, b = fuse_linear_bn_weights(t["weight"], t["bias"], t["bn.running_mean"],
                                      t["bn.running_var"], 1e-5, t["bn.weight"], t["bn.bias"])
        assert torch.equal(folded[f"{path}.weight"], w.detach().float())
        assert torch.equal(folded[f"{path}.bias"], b.detach().float())
