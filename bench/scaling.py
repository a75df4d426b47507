"""Time per pair as models grow: plain fold and prepare (calibrate) of models with 10, 100 and
1,000 Linear(16, 16)+BatchNorm1d pairs, in-process (so interpreter start-up does not hide the
slope), interleaved over sizes, medians of --repeat runs.

The goal (issue 7): time per pair stays flat. The slope is the least-squares fit of wall time
against the number of pairs (seconds per pair); `per_pair` is wall / pairs for each size.

Run: python bench/scaling.py [--sizes 10 100 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from qatconv import api
from qatconv.config import ModelConfig, TrainConfig

torch.set_flush_denormal(True)  # 1,000 random layers drift into denormals; same for every tool

MODEL_FILE = '''
from torch import nn

def make(pairs: int, width: int = 16) -> nn.Sequential:
    layers = []
    for _ in range(pairs):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers)
'''


def setup(work: Path, sizes: list[int]) -> dict[int, tuple[str, Path, Path]]:
    (work / "scaling_model.py").write_text(MODEL_FILE)
    sys.path.insert(0, str(work))
    from scaling_model import make  # type: ignore[import-not-found]

    out = {}
    torch.manual_seed(0)
    data = work / "scaling_data.npz"
    np.savez(data, inputs=np.random.default_rng(0).standard_normal((256, 16), dtype=np.float32))
    for n in sizes:
        model = make(n)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
        ckpt = work / f"scaling_{n}.safetensors"
        save_file(model.state_dict(), ckpt, metadata={"format": "pt"})
        out[n] = (f"{work / 'scaling_model.py'}:make", ckpt, data)
    return out


def time_fold(spec: str, ckpt: Path, data: Path, n: int, out: Path) -> float:
    t = time.perf_counter()
    api.fold(out, model_cfg=ModelConfig(spec=spec, args={"pairs": n}, weights=ckpt),
             check=data, force=True)
    return time.perf_counter() - t


def time_prepare(spec: str, ckpt: Path, data: Path, n: int, out: Path) -> float:
    t = time.perf_counter()
    api.prepare(ModelConfig(spec=spec, args={"pairs": n}, weights=ckpt), data, out,
                train=TrainConfig(), force=True, sensitivity=False)
    return time.perf_counter() - t


def run(sizes: list[int], repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = setup(work, sizes)
        times: dict[str, dict[int, list[float]]] = {"fold": {n: [] for n in sizes},
                                                    "prepare": {n: [] for n in sizes}}
        for _ in range(repeat):
            for n in sizes:
                spec, ckpt, data = cases[n]
                times["fold"][n].append(time_fold(spec, ckpt, data, n, work / "f.safetensors"))
                times["prepare"][n].append(
                    time_prepare(spec, ckpt, data, n, work / "q.safetensors"))
    result = {}
    for step, by_n in times.items():
        med = {n: statistics.median(v) for n, v in by_n.items()}
        slope, intercept = np.polyfit(sizes, [med[n] for n in sizes], 1)
        result[step] = {
            "median_s": med,
            "per_pair_ms": {n: 1000 * med[n] / n for n in sizes},
            "slope_ms_per_pair": 1000 * slope,
            "intercept_s": intercept,
            "runs": by_n,
        }
    return result


def table(result: dict) -> str:
    sizes = list(next(iter(result.values()))["median_s"])
    head = " | ".join(f"{n} pairs: s (ms/pair)" for n in sizes)
    lines = [f"| step | {head} | slope ms/pair |", "|---|" + "---:|" * (len(sizes) + 1)]
    for step, r in result.items():
        cells = " | ".join(f"{r['median_s'][n]:.2f} ({r['per_pair_ms'][n]:.1f})" for n in sizes)
        lines.append(f"| {step} | {cells} | {r['slope_ms_per_pair']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "scaling.json")
    args = ap.parse_args()
    result = run(args.sizes, args.repeat)
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
