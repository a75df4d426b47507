"""Fold wall time and peak memory: qatconv's streaming fold vs the usual ways to fold a checkpoint.

The checkpoint: L pairs of Linear(H, H) + BatchNorm1d(H) (+ ReLU), random and seeded, saved as
a float safetensors file (and the same tensors in qatconv's QAT layout). H is picked so the file
is --size-mib (default 1024: L=16, H=4096). Each tool runs in its own subprocess; its peak RSS
is that child's `ru_maxrss` (os.wait4), its wall time includes interpreter start and imports:

- cp: copying the file (the I/O floor).
- safetensors load_file + save_file: read every tensor, write them back (no folding). load_file
  maps the file, so save_file writes the source's page-cache pages straight back out.
- safetensors load_file + scale weights + save_file: the same, but every weight is multiplied
  by a constant first, so the bytes written are new, as with any fold.
- torch.ao fuse_modules: build the model, load_state_dict(load_file(...)), eval, fuse each
  (Linear, BN) pair, save_file(state_dict).
- torch.fx fuse: same, with torch.fx.experimental.optimization.fuse(model) (copies the model).
- qatconv fold_file, float layout (FoldPair.from_float_record), fsync on (the default).
- qatconv fold_file, same with fsync=False (what the other tools do).
- qatconv fold_file (write path): posix_fallocate refused, so the output is written with
  os.write instead of through a mapping (what a filesystem without fallocate gets).
- qatconv fold_file, QAT layout (FoldPair.from_qat_record, --emit-qparams).
- qatconv fold (CLI): the real command, `qatconv fold QAT.safetensors -o OUT`, on the QAT-layout
  file (model-free; reads the pairs from the file's qatconv metadata).
- qatconv fold --model --weights (CLI): the plain fold of the float file, model code given
  (pairs found on the model built on the meta device, then the same streaming fold).
- qatconv prepare --mode calibrate (CLI), with --prepare: the float file to a QAT checkpoint on
  256 random samples (W8A8, no sensitivity table); its wall time is not a fold's, its peak RSS
  is the point (goal <= 2.5x the file).
- python -c "import torch": the floor every torch-based tool pays.

Rounds are interleaved (all tools in a shuffled order, then again, ...) after --warmup untimed
rounds, and medians reported. The last
round's outputs are checked: qatconv equals torch's float64 fold cast to float32 bit for bit.

Run: python bench/fold.py [--size-mib 1024] [--repeat 3] [--json bench/out/fold.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
LAYERS = 16

_MODEL = """
import torch
from torch import nn
L, H = {layers}, {hidden}
model = nn.Sequential(*[m for _ in range(L) for m in (nn.Linear(H, H), nn.BatchNorm1d(H), nn.ReLU())])
"""

SCRIPTS: dict[str, str] = {
    "python -c 'import torch'": "import torch",
    "safetensors load_file + save_file": """
from safetensors.torch import load_file, save_file
save_file(load_file({src!r}), {dst!r}, metadata={{"format": "pt"}})
""",
    "safetensors load_file + scale weights + save_file": """
from safetensors.torch import load_file, save_file
sd = load_file({src!r})
for k, v in sd.items():
    if v.dim() == 2:
        sd[k] = v * 1.0001  # new bytes, as any fold writes
save_file(sd, {dst!r}, metadata={{"format": "pt"}})
""",
    "torch.ao fuse_modules": _MODEL
    + """
from safetensors.torch import load_file, save_file
from torch.ao.quantization import fuse_modules
model.load_state_dict(load_file({src!r}))
model.eval()
fuse_modules(model, [[str(3 * i), str(3 * i + 1)] for i in range(L)], inplace=True)
save_file(model.state_dict(), {dst!r}, metadata={{"format": "pt"}})
""",
    "torch.fx fuse": _MODEL
    + """
from safetensors.torch import load_file, save_file
from torch.fx.experimental.optimization import fuse
model.load_state_dict(load_file({src!r}))
fused = fuse(model.eval())
save_file(fused.state_dict(), {dst!r}, metadata={{"format": "pt"}})
""",
    "qatconv fold_file": """
from pathlib import Path
from qatconv.folding import FoldPair, fold_file
from qatconv.pair_record import PairRecord
L = {layers}
recs = [PairRecord(str(3 * i), str(3 * i + 1), str(3 * i), 1e-5, 0.1, 1, 1, True) for i in range(L)]
pairs = [FoldPair.from_float_record(r) for r in recs]
fold_file(Path({src!r}), Path({dst!r}), pairs, metadata={{}}, fsync={fsync})
""",
    "qatconv fold_file (QAT layout, emit qparams)": """
from pathlib import Path
from qatconv.folding import FoldPair, fold_file
from qatconv.pair_record import PairRecord
L = {layers}
recs = [PairRecord(str(3 * i), str(3 * i + 1), str(3 * i), 1e-5, 0.1, 1, 1, True) for i in range(L)]
pairs = [FoldPair.from_qat_record(r, quant_range=(-128, 127)) for r in recs]
fold_file(Path({qat_src!r}), Path({dst!r}), pairs, metadata={{}}, emit_qparams=True)
""",
}
# The same fold with posix_fallocate refused (as on a filesystem without it): fold_file then
# writes with os.write from a background thread instead of through a mapping of the output.
SCRIPTS["qatconv fold_file (write path)"] = """
import errno, os
def _unsupported(*args):
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")
os.posix_fallocate = _unsupported
""" + SCRIPTS["qatconv fold_file"]
NO_FSYNC = "qatconv fold_file, fsync=False"
CLI = "qatconv fold (CLI)"
CLI_PLAIN = "qatconv fold --model --weights (CLI)"
CLI_PREPARE = "qatconv prepare --mode calibrate (CLI)"
BASELINE = "safetensors load_file + save_file"


def generate(size_mib: int, seed: int) -> tuple[Path, Path, int]:
    """Write (or reuse) the float and QAT-layout checkpoints; return their paths and H."""
    hidden = int(math.sqrt(size_mib * 2**20 / (4 * LAYERS)))
    float_path = WORK / f"fold-float-{LAYERS}x{hidden}-s{seed}.safetensors"
    qat_path = WORK / f"fold-qat-{LAYERS}x{hidden}-s{seed}-meta.safetensors"
    if float_path.exists() and qat_path.exists():
        return float_path, qat_path, hidden
    import torch
    from safetensors.torch import save_file

    WORK.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    float_sd: dict[str, torch.Tensor] = {}
    qat_sd: dict[str, torch.Tensor] = {}
    bound = 1 / math.sqrt(hidden)
    for i in range(LAYERS):
        lin, bn = str(3 * i), str(3 * i + 1)
        w = torch.empty(hidden, hidden).uniform_(-bound, bound, generator=gen)
        b = torch.empty(hidden).uniform_(-bound, bound, generator=gen)
        stats = {
            "weight": torch.empty(hidden).uniform_(0.5, 1.5, generator=gen),
            "bias": torch.randn(hidden, generator=gen) * 0.1,
            "running_mean": torch.randn(hidden, generator=gen) * 0.1,
            "running_var": torch.empty(hidden).uniform_(0.5, 2.0, generator=gen),
            "num_batches_tracked": torch.tensor(1000),
        }
        float_sd[f"{lin}.weight"], float_sd[f"{lin}.bias"] = w, b
        qat_sd[f"{lin}.weight"], qat_sd[f"{lin}.bias"] = w, b
        for k, v in stats.items():
            float_sd[f"{bn}.{k}"] = v
            qat_sd[f"{lin}.bn.{k}"] = v
        s = stats["weight"].double() * torch.rsqrt(stats["running_var"].double() + 1e-5)
        amax = (w.double() * s[:, None]).abs().amax(dim=1)
        fq = f"{lin}.weight_fake_quant"
        qat_sd[f"{fq}.fake_quant_enabled"] = torch.ones(1, dtype=torch.int64)
        qat_sd[f"{fq}.observer_enabled"] = torch.ones(1, dtype=torch.int64)
        qat_sd[f"{fq}.scale"] = (amax / 127.5).float()
        qat_sd[f"{fq}.zero_point"] = torch.zeros(hidden, dtype=torch.int32)
        qat_sd[f"{fq}.activation_post_process.eps"] = torch.tensor([1.1920928955078125e-07])
        qat_sd[f"{fq}.activation_post_process.min_val"] = -amax.float()
        qat_sd[f"{fq}.activation_post_process.max_val"] = amax.float()
    save_file(float_sd, float_path, metadata={"format": "pt"})
    # qatconv's metadata, so that the real `qatconv fold QAT -o OUT` command runs on it.
    records = [{"linear": str(3 * i), "bn": str(3 * i + 1), "qat": str(3 * i), "eps": 1e-5,
                "momentum": 0.1, "in_features": hidden, "out_features": hidden, "bias": True,
                "affine": True} for i in range(LAYERS)]  # fmt: skip
    meta = {"format_version": 1, "stage": "qat", "pairs": records, "backend": "x86",
            "weight_bits": 8, "quant_min": -128, "quant_max": 127,
            "scheme": "per_channel_symmetric", "model": {"spec": None, "args": {}}}  # fmt: skip
    save_file(qat_sd, qat_path, metadata={"format": "pt", "qatconv": json.dumps(meta)})
    return float_path, qat_path, hidden


# Runs one tool and reports its own wall time and peak RSS. A child's ru_maxrss also counts the
# memory of the process it was forked from (up to exec), so tools are started from this small
# launcher, never from the benchmark process itself.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss,
               "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def run_child(argv: list[str]) -> tuple[float, float, float]:
    """Run one tool; return (wall seconds, user+sys CPU seconds, peak RSS MiB) of that tool's
    process alone (CPU time is less noisy than wall time on a busy or writeback-bound VM)."""
    result = WORK / "launcher.json"
    subprocess.run([sys.executable, "-c", _LAUNCHER, str(result), *argv], cwd=ROOT, check=True)
    r = json.loads(result.read_text())
    result.unlink()
    if r["rc"] != 0:
        raise SystemExit(f"{argv[:3]}... failed with exit code {r['rc']}")
    return r["wall"], r["cpu"], r["maxrss_kib"] / 1024  # Linux reports KiB


def model_file(hidden: int) -> tuple[Path, Path]:
    """The benchmark model as a `--model` spec file, and 256 samples for it (`--data`)."""
    import numpy as np

    spec = WORK / "fold_model.py"
    spec.write_text(_MODEL.format(layers=LAYERS, hidden=hidden).replace(
        "model = nn.Sequential", "def model() -> nn.Module:\n    return nn.Sequential"))
    data = WORK / f"fold-data-{hidden}.npy"
    if not data.exists():
        rng = np.random.default_rng(0)
        np.save(data, rng.standard_normal((256, hidden), dtype=np.float32))
    return spec, data


def commands(src: Path, qat_src: Path, hidden: int, dst: Path,
             prepare: bool = False) -> dict[str, list[str]]:
    fmt = {"src": str(src), "qat_src": str(qat_src), "dst": str(dst), "layers": LAYERS,
           "hidden": hidden, "fsync": True}  # fmt: skip
    cmds = {"cp": ["cp", str(src), str(dst)]}
    qatconv = [sys.executable, "-m", "qatconv"]
    cmds[CLI] = [*qatconv, "fold", str(qat_src), "-o", str(dst), "--quiet"]
    spec, data = model_file(hidden)
    cmds[CLI_PLAIN] = [*qatconv, "fold", "--model", f"{spec}:model", "--weights", str(src),
                       "-o", str(dst), "--quiet"]
    if prepare:
        # Without the per-pair sensitivity table: its 2 x 16 calibrations share the model's
        # tensors (no memory) but take minutes of forward passes on 4096-wide layers.
        cmds[CLI_PREPARE] = [*qatconv, "prepare", "--model", f"{spec}:model", "--weights",
                             str(src), "--data", str(data), "--no-sensitivity", "-o", str(dst),
                             "--quiet"]
    for name, code in SCRIPTS.items():
        cmds[name] = [sys.executable, "-c", code.format(**fmt)]
    cmds[NO_FSYNC] = [
        sys.executable,
        "-c",
        SCRIPTS["qatconv fold_file"].format(**fmt | {"fsync": False}),
    ]
    return cmds


def check_outputs(src: Path, outs: dict[str, Path]) -> dict[str, float]:
    """qatconv == torch's float64 fold cast to float32 (bit-exact); others: max abs diff."""
    import torch
    from safetensors import safe_open
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    with safe_open(src, framework="pt") as f:
        t = {k: f.get_tensor(k).double() for k in ("0.weight", "0.bias", "1.running_mean",
                                                    "1.running_var", "1.weight", "1.bias")}  # fmt: skip
    w_ref, b_ref = fuse_linear_bn_weights(t["0.weight"], t["0.bias"], t["1.running_mean"],
                                          t["1.running_var"], 1e-5, t["1.weight"], t["1.bias"])  # fmt: skip
    w_ref, b_ref = w_ref.detach().float(), b_ref.detach().float()
    diffs: dict[str, float] = {}
    for name, path in outs.items():
        with safe_open(path, framework="pt") as f:
            w, b = f.get_tensor("0.weight"), f.get_tensor("0.bias")
        diffs[name] = max(float((w - w_ref).abs().max()), float((b - b_ref).abs().max()))
        if name.startswith("qatconv") and not (torch.equal(w, w_ref) and torch.equal(b, b_ref)):
            raise SystemExit(f"{name}: output differs from torch's float64 fold")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prepare", action="store_true",
                    help="also `qatconv prepare --mode calibrate` of the checkpoint (peak RSS)")
    ap.add_argument("--only", default="", help="comma-separated tool names to run (default all; "
                    "the load+save baseline always runs; a comma followed by a space is part "
                    "of a name)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "fold.json")
    args = ap.parse_args()

    src, qat_src, hidden = generate(args.size_mib, args.seed)
    file_mib = src.stat().st_size / 2**20
    dst = WORK / "fold-out.safetensors"
    cmds = commands(src, qat_src, hidden, dst, args.prepare)
    if args.only:
        # Split on commas not followed by a space: "qatconv fold_file, fsync=False" is one name.
        keep = {*re.split(r",(?! )", args.only), BASELINE}
        cmds = {k: v for k, v in cmds.items() if k in keep}
    for p in (src, qat_src):  # warm the page cache: every tool then reads from memory
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)
    print(f"checkpoint: {LAYERS} x (Linear({hidden}, {hidden}) + BatchNorm1d), {file_mib:.0f} MiB; "
          f"{args.repeat} interleaved rounds", file=sys.stderr)  # fmt: skip
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cmds}
    kept: dict[str, Path] = {}
    # Warm-up rounds are not recorded: on a VM the first touches of guest memory (page cache
    # for the outputs, the tools' own allocations) are much slower than later ones.
    rng = random.Random(args.seed)
    for r in range(-args.warmup, args.repeat):
        order = list(cmds.items())
        rng.shuffle(order)  # no tool always runs right after the same other tool
        for name, argv in order:
            dst.unlink(missing_ok=True)
            wall, cpu, rss = run_child(argv)
            label = "warm-up" if r < 0 else f"round {r + 1}"
            print(f"  {label} {name}: {wall:.2f} s, user+sys {cpu:.2f} s, {rss:.0f} MiB",
                  file=sys.stderr)
            if r < 0:
                continue
            samples[name].append((wall, cpu, rss))
            if r == args.repeat - 1 and name in ("torch.ao fuse_modules", "torch.fx fuse",
                                                  "qatconv fold_file", CLI, CLI_PLAIN):  # fmt: skip
                keep = WORK / f"last-{len(kept)}.safetensors"
                dst.rename(keep)
                kept[name] = keep
    dst.unlink(missing_ok=True)
    diffs = check_outputs(src, kept)
    for p in kept.values():
        p.unlink()

    base = statistics.median(w for w, _, _ in samples[BASELINE])
    base_cpu = statistics.median(c for _, c, _ in samples[BASELINE])
    rows = []
    for name, runs in samples.items():
        wall = statistics.median(w for w, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        rss = statistics.median(m for _, _, m in runs)
        rows.append({"tool": name, "wall_s": wall, "wall_vs_load_save": wall / base,
                     "cpu_s": cpu, "cpu_vs_load_save": cpu / base_cpu,
                     "peak_rss_mib": rss, "rss_vs_file": rss / file_mib,
                     "samples": [{"wall_s": w, "cpu_s": c, "peak_rss_mib": m}
                                 for w, c, m in runs]})  # fmt: skip
    print("| tool | wall s | vs load+save | user+sys s | vs load+save | peak RSS MiB | RSS / file |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['tool']} | {row['wall_s']:.2f} | {row['wall_vs_load_save']:.2f}x | "
              f"{row['cpu_s']:.2f} | {row['cpu_vs_load_save']:.2f}x | "
              f"{row['peak_rss_mib']:.0f} | {row['rss_vs_file']:.2f}x |")  # fmt: skip
    print("\nlayer-0 max abs difference from torch's float64 fold: "
          + ", ".join(f"{k}: {v:.3g}" for k, v in diffs.items()))  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    import torch

    args.json.write_text(json.dumps({
        "checkpoint": {"layers": LAYERS, "hidden": hidden, "file_mib": file_mib,
                       "path": str(src.relative_to(ROOT))},
        "repeat": args.repeat, "warmup": args.warmup, "rows": rows, "max_abs_diff_layer0": diffs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
