"""Inference speed of the exported int8 model: onnxruntime int8 vs onnxruntime float vs torch float.

Two models, each folded by qatconv from a calibrated QAT checkpoint (W8A8, `prepare`'s
default) and exported with `qatconv.export`:

- digits: the bundled digits MLP (64-128-64-10, two Linear+BN pairs);
- mlp2048: 4 x (Linear(2048, 2048) + BatchNorm1d + ReLU), random weights and BN statistics.

Contenders, all single-threaded (the machine is shared; one thread each keeps them comparable):

- onnxruntime int8 (static QDQ, W8A8; QGemm): the model `qatconv export` writes;
- onnxruntime int8 dynamic (weight-only form; DynamicQuantizeMatMul);
- onnxruntime float: the same folded model exported without quantization;
- torch float: the folded model in eager mode under `torch.inference_mode`.

Samples/s at batch 1 and 256, medians over rounds that interleave the contenders (A B C D A B C
D ...), so machine drift cancels in the ratios; file sizes of the ONNX files and the folded
checkpoint. The weight-only contender is the same fold with its input qparams dropped.

Run: python bench/export.py [--rounds 5] [--seconds 0.4] [--json bench/out/export.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from qatconv import api, checkpoint, export
from qatconv.atomic import write_atomic
from qatconv.config import Mode, ModelConfig, QuantConfig, TrainConfig
from qatconv.onnx_check import session

SAMPLES = ROOT / "sample_models"
WIDTH, DEPTH = 2048, 4


class Mlp2048(nn.Module):
    """DEPTH x (Linear(WIDTH, WIDTH) + BatchNorm1d + ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(DEPTH) for m in (
            nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _mlp2048_files(tmp: Path) -> tuple[str, Path, Path]:
    """A spec file, a float checkpoint with random BN statistics, calibration data."""
    spec_file = tmp / "mlp2048.py"
    spec_file.write_text(
        "from torch import nn\n"
        f"WIDTH, DEPTH = {WIDTH}, {DEPTH}\n"
        "class Mlp2048(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.layers = nn.Sequential(*[m for _ in range(DEPTH) for m in (\n"
        "            nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU())])\n"
        "    def forward(self, x):\n"
        "        return self.layers(x)\n")
    g = torch.Generator().manual_seed(0)
    model = Mlp2048()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(WIDTH, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(WIDTH, generator=g) + 0.5)
    ckpt = tmp / "mlp2048.safetensors"
    checkpoint.write_safetensors(dict(model.state_dict()), ckpt, {})
    calib = tmp / "mlp2048_calib.npz"
    np.savez(calib, inputs=torch.randn(512, WIDTH, generator=g).numpy())
    return f"{spec_file}:Mlp2048", ckpt, calib


def _folded(tmp: Path, name: str, spec: str, weights: Path, calib: Path) -> Path:
    qat, folded = tmp / f"{name}_qat.safetensors", tmp / f"{name}_folded.safetensors"
    api.prepare(ModelConfig(spec=spec, weights=weights), calib, qat,
                train=TrainConfig(mode=Mode.calibrate), quant=QuantConfig(), force=True,
                sensitivity=False)
    api.fold(folded, qat_checkpoint=qat, force=True)
    return folded


def _with_input_qparams(folded: Path, spec: str, calib: Path, out: Path) -> Path:
    """A copy of ``folded`` whose quantized Linears have min/max input qparams (x86 7-bit)."""
    meta = checkpoint.read_metadata(folded)
    tensors = checkpoint.load_checkpoint(folded).tensors
    if all("input" in q for q in meta["qparams"].values()):
        checkpoint.write_safetensors(tensors, out, {"qatconv": json.dumps(meta)}, force=True)
        return out
    model = api.load_folded(api.load_model(ModelConfig(spec=spec)).model, folded)
    seen: dict[str, list[float]] = {}
    for path in meta["qparams"]:
        model.get_submodule(path).register_forward_pre_hook(
            lambda m, a, p=path: seen.setdefault(p, []).extend(
                [float(a[0].min()), float(a[0].max())]))
    with torch.no_grad():
        model(torch.from_numpy(np.load(calib)["inputs"]))
    for path, rec in meta["qparams"].items():
        lo, hi = min(0.0, min(seen[path])), max(0.0, max(seen[path]))
        scale = float(np.float32((hi - lo) / 127))
        rec["input"] = {"scale": scale, "zero_point": int(np.clip(round(-lo / scale), 0, 127)),
                        "qmin": 0, "qmax": 127, "dtype": "quint8"}
    checkpoint.write_safetensors(tensors, out, {"qatconv": json.dumps(meta)}, force=True)
    return out


def _without_input_qparams(folded: Path, out: Path) -> Path:
    meta = checkpoint.read_metadata(folded)
    for rec in meta["qparams"].values():
        rec.pop("input", None)
    tensors = checkpoint.load_checkpoint(folded).tensors
    checkpoint.write_safetensors(tensors, out, {"qatconv": json.dumps(meta)}, force=True)
    return out


def _contenders(tmp: Path, name: str, spec: str, folded: Path, calib: Path,
                in_features: int) -> tuple[dict[str, Callable[[np.ndarray], Any]], dict[str, int]]:
    w8a8 = _with_input_qparams(folded, spec, calib, tmp / f"{name}_w8a8.safetensors")
    wonly = _without_input_qparams(w8a8, tmp / f"{name}_wonly.safetensors")
    files = {"int8": tmp / f"{name}_int8.onnx", "dynamic": tmp / f"{name}_dynamic.onnx",
             "float": tmp / f"{name}_float.onnx"}
    export.export(w8a8, files["int8"], input_shape=(in_features,), force=True)
    export.export(wonly, files["dynamic"], input_shape=(in_features,), force=True)
    model = api.load_folded(api.load_model(ModelConfig(spec=spec)).model, folded).eval()
    proto, _ = export.to_onnx(model, {}, torch.zeros(2, in_features), export.DEFAULT_OPSET)
    write_atomic(files["float"], proto.SerializeToString())
    kernels: dict[str, str] = {}
    runs: dict[str, Callable[[np.ndarray], Any]] = {}
    for label, key in (("onnxruntime int8 (W8A8 QDQ)", "int8"),
                       ("onnxruntime int8 dynamic (weight-only)", "dynamic"),
                       ("onnxruntime float", "float")):
        import onnx

        sess = session(onnx.load(str(files[key])), tmp / f"{name}_{key}_opt.onnx", threads=1)
        kernels[label] = ",".join(sorted({n.op_type for n in onnx.load(
            str(tmp / f"{name}_{key}_opt.onnx")).graph.node} & {
            "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "Gemm", "MatMul"}))
        runs[label] = lambda x, s=sess: s.run(None, {"input": x})

    def torch_run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    runs["torch float (eager)"] = torch_run
    sizes = {k: f.stat().st_size for k, f in files.items()}
    sizes["folded safetensors"] = folded.stat().st_size
    return runs, {"sizes": sizes, "kernels": kernels}  # type: ignore[dict-item]


def _measure(runs: dict[str, Callable[[np.ndarray], Any]], batch: int, in_features: int,
             rounds: int, seconds: float) -> dict[str, list[float]]:
    x = np.random.default_rng(0).standard_normal((batch, in_features)).astype(np.float32)
    for run in runs.values():
        run(x)  # warm-up (onnxruntime packs weights on the first run)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                run(x)
                n += 1
            rates[label].append(n * batch / (time.perf_counter() - start))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.4, help="per contender per round")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "export.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"threads": 1, "rounds": args.rounds, "models": {}}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        spec2048, w2048, c2048 = _mlp2048_files(tmp)
        models = {
            "digits": (str(SAMPLES / "digits_mlp.py:DigitsMLP"), SAMPLES / "digits_mlp.safetensors",
                       SAMPLES / "digits_calib.npz", 64),
            "mlp2048": (spec2048, w2048, c2048, WIDTH),
        }
        for name, (spec, weights, calib, in_f) in models.items():
            folded = _folded(tmp, name, spec, weights, calib)
            runs, info = _contenders(tmp, name, spec, folded, calib, in_f)
            entry: dict[str, Any] = {**info, "batches": {}}
            for batch in (1, 256):
                rates = _measure(runs, batch, in_f, args.rounds, args.seconds)
                base = statistics.median(rates["onnxruntime float"])
                entry["batches"][str(batch)] = {
                    label: {"samples_per_s": statistics.median(r), "min": min(r), "max": max(r),
                            "vs_onnxruntime_float": statistics.median(r) / base}
                    for label, r in rates.items()
                }
                print(name, batch, {k: f"{v['samples_per_s']:.0f}/s "
                                    f"{v['vs_onnxruntime_float']:.2f}x"
                                    for k, v in entry["batches"][str(batch)].items()},
                      file=sys.stderr, flush=True)
            result["models"][name] = entry
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
