"""`prepare` on several processes, and on data bigger than memory.

1. Fine-tune throughput, 1 process vs ``--nproc 2``: the 512-wide MLP with 4 Linear+BatchNorm1d
   pairs at --batch-size 256 (the global batch: 128 rows per rank with 2), threads per process
   = usable cores / processes (what `qatconv.distributed` sets). steps/s is marginal: two runs
   with --steps LO and HI, (HI - LO) / (t_HI - t_LO), so start-up and the one-off passes
   (loading, metrics) cancel. Runs are interleaved (1, 2, 1, 2, ...) and the median is taken.
2. Peak RSS of `qatconv prepare` (fine-tune, 30 steps) on a 2 GiB `.npy` vs a 20 MiB one (a
   64-wide 2-pair MLP: the data, not the model, is what grows), from ``wait4``'s ``ru_maxrss``
   of the process. The 20 MiB file is read whole (data up to qatconv.data.WHOLE_MAX_BYTES, 64 MiB,
   are), the 2 GiB one per batch: the goal says the big file costs no more resident memory
   than holding the small one. The data files are written to bench/_work (git-ignored) and
   deleted after.

Run: python bench/distributed.py [--repeat 3] [--big-gib 2] [--json bench/out/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work" / "distributed"

MODEL_FILE = '''
from torch import nn


def make(pairs: int = 4, width: int = 512, classes: int = 10) -> nn.Sequential:
    layers = []
    for _ in range(pairs):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))
'''


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def write_model(pairs: int, width: int) -> tuple[str, Path]:
    """The model file and a float checkpoint with non-trivial BN statistics."""
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "dist_model.py").write_text(MODEL_FILE)
    sys.path.insert(0, str(WORK))
    from dist_model import make  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = make(pairs, width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    weights = WORK / f"w{pairs}x{width}.safetensors"
    save_file(model.state_dict(), str(weights))
    return f"{WORK / 'dist_model.py'}:make", weights


def write_npy(path: Path, rows: int, width: int) -> None:
    """Standard-normal float32 rows, written in 64 MiB chunks with plain writes (a memory map
    would grow this process, and every child's ru_maxrss starts from its parent's)."""
    rng = np.random.default_rng(0)
    step = max(1, (64 << 20) // (4 * width))
    with open(path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, width)}
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            f.write(rng.standard_normal((stop - start, width), dtype=np.float32).tobytes())


def prepare_cmd(spec: str, weights: Path, data: Path, pairs: int, width: int, steps: int,
                nproc: int) -> list[str]:
    return [sys.executable, "-m", "qatconv", "prepare", "--model", spec,
            "--model-arg", f"pairs={pairs}", "--model-arg", f"width={width}",
            "--weights", str(weights), "--data", str(data), "-o", str(WORK / "out.safetensors"),
            "--force", "--mode", "finetune", "--steps", str(steps), "--batch-size", "256",
            "--nproc", str(nproc), "--no-sensitivity", "--json"]


def run(cmd: list[str], threads: int) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one process (the launcher's own for --nproc > 1),
    started from bench/fold.py's small launcher: a child's ru_maxrss counts its parent's."""
    sys.path.insert(0, str(ROOT / "bench"))
    from fold import _LAUNCHER  # type: ignore[import-not-found]

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = WORK / "launcher.json"
    subprocess.run([sys.executable, "-c", _LAUNCHER, str(result), *cmd], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    r = json.loads(result.read_text())
    result.unlink()
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed with exit code {r['rc']}")
    return r["wall"], r["maxrss_kib"] * 1024


def throughput(repeat: int, lo: int, hi: int) -> dict[str, object]:
    spec, weights = write_model(4, 512)
    data = WORK / "train512.npy"
    write_npy(data, 4096, 512)  # small: the one-off passes over the data cancel anyway
    cores = usable_cpus()
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeat):
        for nproc in (1, 2):
            threads = max(1, cores // nproc)
            t_lo, _ = run(prepare_cmd(spec, weights, data, 4, 512, lo, nproc), threads)
            t_hi, _ = run(prepare_cmd(spec, weights, data, 4, 512, hi, nproc), threads)
            rates[nproc].append((hi - lo) / (t_hi - t_lo) if t_hi > t_lo else float("nan"))
            print(f"nproc {nproc}: {rates[nproc][-1]:.3g} steps/s", file=sys.stderr)
    med = {n: statistics.median(r) for n, r in rates.items()}
    return {"cores": cores, "steps": [lo, hi], "batch_size": 256,
            "steps_per_s": {str(n): med[n] for n in med},
            "runs": {str(n): rates[n] for n in rates},
            "speedup_2_vs_1": med[2] / med[1]}


def rss(big_gib: float, small_mib: float, repeat: int) -> dict[str, object]:
    width = 64
    spec, weights = write_model(2, width)
    sizes = {"small": int(small_mib * 2**20), "big": int(big_gib * 2**30)}
    files = {}
    for name, nbytes in sizes.items():
        files[name] = WORK / f"{name}.npy"
        write_npy(files[name], nbytes // (4 * width), width)
    peaks: dict[str, list[int]] = {"small": [], "big": []}
    walls: dict[str, list[float]] = {"small": [], "big": []}
    try:
        for _ in range(repeat):
            for name in ("small", "big"):
                # One thread: peak memory does not depend on it, and the machine is shared.
                wall, peak = run(prepare_cmd(spec, weights, files[name], 2, width, 30, 1), 1)
                peaks[name].append(peak)
                print(f"{name}: peak RSS {peak / 2**20:.0f} MiB, {wall:.0f} s", file=sys.stderr)
                walls[name].append(wall)
    finally:
        for f in files.values():
            f.unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in peaks.items()}
    return {"data_bytes": sizes,
            "peak_rss_bytes": med, "wall_s": {k: statistics.median(v) for k, v in walls.items()},
            "ratio_big_vs_small": med["big"] / med["small"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs=2, default=[10, 60], metavar=("LO", "HI"))
    ap.add_argument("--big-gib", type=float, default=2.0)
    ap.add_argument("--small-mib", type=float, default=20.0)
    ap.add_argument("--skip", choices=["throughput", "rss"], action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result: dict[str, object] = {"torch": torch.__version__}
    try:
        if "throughput" not in args.skip:
            result["throughput"] = throughput(args.repeat, *args.steps)
        if "rss" not in args.skip:
            result["rss"] = rss(args.big_gib, args.small_mib, max(1, args.repeat - 1))
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
