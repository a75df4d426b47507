"""Whole-process fine-tune time: `qatconv prepare --mode finetune` vs a hand-written torch.ao script.

The model is 4 x (Linear(W, W) + BatchNorm1d + ReLU) + Linear(W, 10) (W = --width, default 512),
random and seeded, trained on 4096 random samples, batch 256, 200 steps, Adam, distillation from
the float model, one thread each (OMP_NUM_THREADS=1 for the script, --threads 1 for qatconv),
activations fake-quantized in both (qatconv's default --activations int8); qatconv's per-pair
sensitivity table is off (--no-sensitivity), as the script has none.
Both are whole processes (interpreter start, imports, loading, training, writing the result),
interleaved A B A B; the ratio is hand-written time / qatconv time (>= 1.3x is the goal).

The hand-written script is what a user writes with torch.ao: fuse_modules_qat on each
(Linear, BN), prepare_qat with the default x86 QAT qconfig (which fake-quantizes activations
too), Adam, MSE to the float model's outputs, then save_file of the state dict.

Run: python bench/prepare_process.py [--width 512] [--repeat 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
LAYERS, SAMPLES, BATCH, STEPS = 4, 4096, 256, 200

MODEL = """
from torch import nn


def model(width: int = {width}) -> nn.Module:
    mods = []
    for _ in range({layers}):
        mods += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 10))
"""

HAND_WRITTEN = """
import copy, sys
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat
sys.path.insert(0, {work!r})
from prepare_model import model as build

torch.manual_seed(0)
float_model = build()
float_model.load_state_dict(load_file({weights!r}))
float_model.eval()
x = torch.from_numpy(np.load({data!r}))
with torch.no_grad():
    goal = float_model(x)
qat = copy.deepcopy(float_model).train()
qat = fuse_modules_qat(qat, [[str(3 * i), str(3 * i + 1)] for i in range({layers})])
qat.qconfig = get_default_qat_qconfig("x86")
qat = prepare_qat(qat)
opt = torch.optim.Adam(qat.parameters(), lr=3e-4)
gen = torch.Generator().manual_seed(0)
for step in range({steps}):
    idx = torch.randint(0, len(x), ({batch},), generator=gen)
    loss = F.mse_loss(qat(x[idx]), goal[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
save_file({{k: v.contiguous() for k, v in qat.state_dict().items()}}, {out!r})
"""


def generate(width: int) -> tuple[Path, Path, Path]:
    """The model file, its random float checkpoint and the training data (reused when there)."""
    import numpy as np

    WORK.mkdir(parents=True, exist_ok=True)
    spec = WORK / "prepare_model.py"
    spec.write_text(MODEL.format(width=width, layers=LAYERS))
    weights = WORK / f"prepare-{LAYERS}x{width}.safetensors"
    data = WORK / f"prepare-data-{width}.npy"
    if not weights.exists():
        import torch
        from safetensors.torch import save_file

        sys.path.insert(0, str(WORK))
        from prepare_model import model  # type: ignore[import-not-found]

        torch.manual_seed(0)
        m = model(width)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_var.uniform_(0.5, 2.0)
                mod.running_mean.normal_(0, 0.1)
        save_file(m.state_dict(), weights)
    if not data.exists():
        np.save(data, np.random.default_rng(0).standard_normal((SAMPLES, width), np.float32))
    return spec, weights, data


def commands(spec: Path, weights: Path, data: Path, out: Path) -> dict[str, list[str]]:
    qatconv = [sys.executable, "-m", "qatconv", "prepare", "--model", f"{spec}:model",
               "--weights", str(weights), "--data", str(data), "--mode", "finetune",
               "--steps", str(STEPS), "--batch-size", str(BATCH), "--threads", "1",
               "--no-sensitivity", "--force", "--quiet", "-o", str(out)]
    script = HAND_WRITTEN.format(work=str(WORK), weights=str(weights), data=str(data),
                                 layers=LAYERS, steps=STEPS, batch=BATCH, out=str(out))
    return {"torch.ao hand-written (whole process)": [sys.executable, "-c", script],
            "qatconv prepare --mode finetune (whole process)": qatconv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "prepare_process.json")
    args = ap.parse_args()
    spec, weights, data = generate(args.width)
    cmds = commands(spec, weights, data, WORK / "prepare-out.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    samples: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.repeat):
        for name, argv in cmds.items():
            t = time.perf_counter()
            subprocess.run(argv, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            samples[name].append(time.perf_counter() - t)
            print(f"  {name}: {samples[name][-1]:.1f} s", file=sys.stderr, flush=True)
    hand, ours = (statistics.median(v) for v in samples.values())
    print("| run | wall s median (min-max) |\n|---|---:|")
    for name, vals in samples.items():
        print(f"| {name} | {statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f}) |")
    print(f"\nhand-written / qatconv: {hand / ours:.2f}x (goal >= 1.3x)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"width": args.width, "layers": LAYERS, "steps": STEPS,
                                     "batch": BATCH, "samples": samples,
                                     "ratio_hand_over_qatconv": hand / ours}, indent=2))


if __name__ == "__main__":
    main()
