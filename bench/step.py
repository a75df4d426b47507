"""One fine-tune step on wide layers: qatconv's QAT modules vs torch.ao's, per step, in one process.

Models: 4 x (Linear(W, W) + BatchNorm1d(W) + ReLU) + Linear(W, 10) for W in --widths (default
512 and 2048), batch 256, one thread, MSE to a fixed target, Adam (lr 3e-4):

- qatconv: `swap_pairs_` (QatLinearBn1d, per-channel symmetric int8 weights, x86 ranges) with
  activations int8 (static W8A8 input fake quant) or none (weight-only), the optimizer
  `qatconv.qat` builds for a fine-tune (`_optimizer`).
- torch.ao: `fuse_modules_qat` + `prepare_qat` with the default x86 QAT qconfig (fused
  observer + fake-quant modules on weights and activations), or with its weight fake quant
  only (activations none), and `torch.optim.Adam`: the loop a user writes by hand.

Contenders alternate in blocks of --steps steps (A B A B ...), --rounds rounds after warm-up;
each block's process CPU time (time.process_time: less disturbed by other jobs than wall time)
and wall time are recorded; medians are reported as ms per step and steps/s, and the ratio
torch.ao / qatconv (> 1: qatconv is faster).

Run: python bench/step.py [--widths 512 2048] [--rounds 5] [--steps 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from qatconv import qat
from qatconv.config import Activations, Mode, QuantConfig, TrainConfig
from qatconv.pair_record import PairRecord

LAYERS, BATCH, LR = 4, 256, 3e-4


def float_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(LAYERS):
        mods += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 10))


def qatconv_model(base: nn.Module, acts: Activations) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = copy.deepcopy(base)
    quant = QuantConfig(activations=acts)
    pairs = [PairRecord(str(3 * i), str(3 * i + 1), str(3 * i), 1e-5, 0.1, 1, 1, True)
             for i in range(LAYERS)]  # fmt: skip
    qat.swap_pairs_(model, pairs, qat.make_qconfig(quant), quant.activation_scheme)
    model.train()
    qat.set_fake_quant_(model, fake_quant=True, observer=True)
    cfg = TrainConfig(mode=Mode.finetune, lr=LR)
    return model, qat._optimizer([p for p in model.parameters() if p.requires_grad], cfg)


def torch_ao_model(base: nn.Module, acts: Activations) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.ao.quantization import (
        QConfig,
        fuse_modules_qat,
        get_default_qat_qconfig,
        prepare_qat,
    )

    model = fuse_modules_qat(copy.deepcopy(base).train(),
                             [[str(3 * i), str(3 * i + 1)] for i in range(LAYERS)])  # fmt: skip
    default = get_default_qat_qconfig("x86")
    model.qconfig = (default if acts is Activations.int8
                     else QConfig(activation=nn.Identity, weight=default.weight))  # fmt: skip
    model = prepare_qat(model)
    return model, torch.optim.Adam(model.parameters(), lr=LR)


def stepper(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
            goal: torch.Tensor) -> Callable[[], None]:  # fmt: skip
    def step() -> None:
        loss = F.mse_loss(model(x), goal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(width: int, acts: Activations, rounds: int, steps: int) -> dict:
    base = float_model(width)
    gen = torch.Generator().manual_seed(1)
    x, goal = torch.randn(BATCH, width, generator=gen), torch.randn(BATCH, 10, generator=gen)
    contenders = {"qatconv": stepper(*qatconv_model(base, acts), x, goal),
                  "torch.ao": stepper(*torch_ao_model(base, acts), x, goal)}  # fmt: skip
    for step in contenders.values():
        for _ in range(3):
            step()
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            c, w = time.process_time(), time.perf_counter()
            for _ in range(steps):
                step()
            cpu[name].append((time.process_time() - c) / steps)
            wall[name].append((time.perf_counter() - w) / steps)
    row = {"width": width, "activations": acts.value}
    for name in contenders:
        row[name] = {"cpu_ms_per_step": 1e3 * statistics.median(cpu[name]),
                     "wall_ms_per_step": 1e3 * statistics.median(wall[name]),
                     "steps_per_s": 1 / statistics.median(wall[name])}  # fmt: skip
    row["torch_ao_vs_qatconv_cpu"] = (row["torch.ao"]["cpu_ms_per_step"]
                                      / row["qatconv"]["cpu_ms_per_step"])  # fmt: skip
    return row


def table(rows: list[dict]) -> str:
    lines = [("| width | activations | qatconv ms/step (steps/s) | torch.ao ms/step (steps/s) | "
             "torch.ao / qatconv (CPU time) |"), "|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        q, t = r["qatconv"], r["torch.ao"]
        lines.append(f"| {r['width']} | {r['activations']} | {q['cpu_ms_per_step']:.1f} "
                     f"({q['steps_per_s']:.1f}) | {t['cpu_ms_per_step']:.1f} "
                     f"({t['steps_per_s']:.1f}) | {r['torch_ao_vs_qatconv_cpu']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "step.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure(w, a, args.rounds, args.steps)
            for w in args.widths for a in (Activations.int8, Activations.none)]  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "batch": BATCH, "layers": LAYERS}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
