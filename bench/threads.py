"""Where more compute threads start to pay: QAT fine-tune step time by layer width, batch, threads.

For each width W and batch B, a 4 x (Linear(W, W) + BatchNorm1d + ReLU) MLP is swapped to
qatconv's LinearBn1d and trained with the steps `qatconv prepare --mode finetune` runs (fake quant,
Adam, MSE). Each cell times the same number of steps with 1 thread and with every usable CPU,
interleaved (1, N, 1, N, ...), quiet and then with a busy process pinned to one core, and reports
the ratio t(N threads) / t(1 thread): below 1 the threads pay, above 1 they cost. The default of
`qatconv.threads` (one thread below `SMALL_LAYER_MACS`) comes from this table.

qatconv's commands set OMP_WAIT_POLICY=PASSIVE before torch starts its thread pool; to measure
what they run, set it here too (without it, torch's spin-waiting threads are what is measured).

Run: OMP_WAIT_POLICY=PASSIVE python bench/threads.py [--widths 64,256,512,1024,2048]
     [--batches 64,256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contention import busy_core  # bench/contention.py: the same busy process

from qatconv import qat, threads
from qatconv.config import Mode, QuantConfig, TrainConfig
from qatconv.pair_record import PairRecord


def make_model(width: int, layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    model = nn.Sequential(*mods)
    pairs = [PairRecord(str(3 * i), str(3 * i + 1), str(3 * i), 1e-5, 0.1, 1, 1, True)
             for i in range(layers)]  # fmt: skip
    qat.swap_pairs_(model, pairs, qat.make_qconfig(QuantConfig()))
    return model.train()


def time_steps(model: nn.Module, batch: int, width: int, steps: int, n_threads: int) -> float:
    torch.set_num_threads(n_threads)
    x = torch.randn(batch, width)
    goal = torch.randn(batch, width)
    opt = qat._optimizer(list(model.parameters()), TrainConfig(mode=Mode.finetune, lr=1e-4))
    for _ in range(2):  # warm-up
        F.mse_loss(model(x), goal).backward()
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.mse_loss(model(x), goal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def measure(width: int, batch: int, many: int, repeat: int, budget_s: float) -> dict:
    model = make_model(width)
    one = time_steps(model, batch, width, 3, 1)
    steps = max(3, min(200, int(budget_s / max(one, 1e-4))))
    t: dict[int, list[float]] = {1: [], many: []}
    for _ in range(repeat):
        for n in (1, many):
            t[n].append(time_steps(model, batch, width, steps, n))
    med = {n: statistics.median(v) for n, v in t.items()}
    return {"width": width, "batch": batch, "macs": batch * width * width, "steps": steps,
            "ms_1": med[1] * 1e3, f"ms_{many}": med[many] * 1e3,
            "ratio": med[many] / med[1], "samples": {str(k): v for k, v in t.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", default="64,128,256,512,1024,2048")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=0.4, help="seconds per timed block")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "threads.json")
    args = ap.parse_args()
    many = threads.usable_cpus()
    if many < 2:
        sys.exit("threads.py needs at least 2 usable CPUs")
    rows = []
    print(f"| busy core | width | batch | MACs/layer | 1 thread ms | {many} threads ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for contended in (False, True):
        with busy_core(contended):
            for batch in map(int, args.batches.split(",")):
                for width in map(int, args.widths.split(",")):
                    r = measure(width, batch, many, args.repeat, args.budget_s)
                    r["contended"] = contended
                    rows.append(r)
                    print(f"| {'yes' if contended else 'no'} | {width} | {batch} | "
                          f"{r['macs']:.2g} | {r['ms_1']:.2f} | {r[f'ms_{many}']:.2f} | "
                          f"{r['ratio']:.2f} |", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": many, "rows": rows,
                                     "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
