"""Fine-tune throughput: `qatconv prepare --mode finetune` vs a hand-written torch.ao QAT loop.

Both train the bundled digits MLP on the same data, batch size, steps, learning rate and
distillation loss, in one process, interleaved (A B A B) so machine drift cancels:

- qatconv: `qatconv.api.prepare(..., mode=finetune)`; steps/s from its own loop timing.
- torch.ao: `fuse_modules_qat` + `prepare_qat` (default x86 QAT qconfig) + Adam, the loop a user
  writes by hand; steps/s over the same number of steps.

Run: python bench/prepare.py [--steps 300] [--repeat 3] [--json bench/out/prepare.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from qatconv import api
from qatconv.config import Activations, Loss, Mode, ModelConfig, QuantConfig, TrainConfig
from sample_models.digits_mlp import DigitsMLP, load_split

SPEC = str(ROOT / "sample_models" / "digits_mlp.py:DigitsMLP")
WEIGHTS = ROOT / "sample_models" / "digits_mlp.safetensors"
TRAIN = ROOT / "sample_models" / "digits_train.npz"


class _Fusable(nn.Module):
    """DigitsMLP in the eager-mode layout fuse_modules_qat needs (QuantStub/DeQuantStub)."""

    def __init__(self, m: DigitsMLP) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc1, self.bn1, self.relu1 = m.fc1, m.bn1, nn.ReLU()
        self.fc2, self.bn2, self.relu2 = m.fc2, m.bn2, nn.ReLU()
        self.head = m.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.relu1(self.bn1(self.fc1(x)))
        x = self.relu2(self.bn2(self.fc2(x)))
        return self.dequant(self.head(x))


def hand_written(steps: int, batch_size: int, lr: float, seed: int) -> float:
    from safetensors.torch import load_file
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    float_model = DigitsMLP()
    float_model.load_state_dict(load_file(WEIGHTS))
    float_model.eval()
    x, _ = load_split("train")
    with torch.no_grad():
        goal = float_model(x)
    model = _Fusable(copy.deepcopy(float_model)).train()
    model = fuse_modules_qat(model, [["fc1", "bn1"], ["fc2", "bn2"]])
    model.qconfig = get_default_qat_qconfig("x86")
    model = prepare_qat(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    done = 0
    while done < steps:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2 or done == steps:
                continue
            loss = F.mse_loss(model(x[idx]), goal[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    return steps / (time.perf_counter() - start)


def qatconv_prepare(steps: int, batch_size: int, lr: float, seed: int) -> float:
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(mode=Mode.finetune, steps=steps, batch_size=batch_size, lr=lr,
                          loss=Loss.distill, seed=seed)
        t0 = [0.0]

        def on_step(info: object) -> None:
            if not t0[0]:
                t0[0] = time.perf_counter()
            times.append(time.perf_counter())

        # Weight-only, as the hand-written torch.ao loop it is compared with.
        api.prepare(ModelConfig(spec=SPEC, weights=WEIGHTS), TRAIN, Path(tmp) / "q.safetensors",
                    train=cfg, quant=QuantConfig(activations=Activations.none),
                    sensitivity=False, on_step=on_step)
    # From the end of step 1 to the end of the last: the loop's steady rate, as for the other.
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "prepare.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs: dict[str, list[float]] = {"torch.ao hand-written": [], "qatconv prepare": []}
    for r in range(args.repeat):
        runs["torch.ao hand-written"].append(hand_written(args.steps, args.batch_size, args.lr, r))
        runs["qatconv prepare"].append(qatconv_prepare(args.steps, args.batch_size, args.lr, r))
    base = statistics.median(runs["torch.ao hand-written"])
    rows = []
    print("| loop | steps/s median | min-max | ratio vs hand-written |")
    print("|---|---:|---:|---:|")
    for name, vals in runs.items():
        med = statistics.median(vals)
        rows.append({"loop": name, "steps_per_s": vals, "median": med, "ratio": med / base})
        print(f"| {name} | {med:.0f} | {min(vals):.0f}-{max(vals):.0f} | {med / base:.2f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"steps": args.steps, "batch_size": args.batch_size,
                                     "rows": rows, "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
