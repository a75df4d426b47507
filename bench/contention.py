"""qatconv on a shared machine: whole commands quiet and next to a busy process pinned to one core.

Rows (each a real `qatconv` process, wall time including start-up and imports, OMP_NUM_THREADS
unset so that qatconv's default thread choice is what runs):

- `prepare --mode finetune --steps 400` on the bundled digits MLP, default threads;
- the same with `--threads N` (N = usable CPUs: what torch did by default before qatconv chose);
- `qatconv demo`.

Each round runs every row quiet and then with the busy core, in a shuffled order; medians.
Goals (issue 14): the default prepare next to a busy core within 1.5x its quiet time, and the
demo under 20 s there.

Run: python bench/contention.py [--repeat 3] [--json bench/out/contention.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
QATCONV = [sys.executable, "-m", "qatconv"]
GOALS = {"prepare_busy_vs_quiet": 1.5, "demo_busy_s": 20.0}


@contextmanager
def busy_core(on: bool, core: int = 0) -> Iterator[None]:
    """A busy-looping process pinned to ``core``: the other job on a shared CI runner."""
    if not on:
        yield
        return
    proc = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def commands(tmp: Path, many: int) -> dict[str, list[str]]:
    prep = [*QATCONV, "prepare", "--model", str(SAMPLES / "digits_mlp.py:DigitsMLP"),
            "--weights", str(SAMPLES / "digits_mlp.safetensors"),
            "--data", str(SAMPLES / "digits_train.npz"), "--mode", "finetune", "--steps", "400",
            "--batch-size", "128", "--force", "--quiet", "-o", str(tmp / "q.safetensors")]
    return {
        "prepare finetune 400 steps (default threads)": prep,
        f"prepare finetune 400 steps (--threads {many})": [*prep, "--threads", str(many)],
        "demo": [*QATCONV, "demo", "--output-dir", str(tmp / "demo"), "--force", "--quiet"],
    }


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated row-name prefixes to leave out")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "contention.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from qatconv.threads import usable_cpus

    many = usable_cpus()
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    skip = [s for s in args.skip.split(",") if s]
    samples: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {k: v for k, v in commands(Path(tmp), many).items()
                if not any(k.startswith(s) for s in skip)}
        for name in cmds:
            samples[name] = {"quiet": [], "busy core": []}
        rng = random.Random(0)
        for _ in range(args.repeat):
            for busy in (False, True):
                order = list(cmds)
                rng.shuffle(order)
                with busy_core(busy):
                    for name in order:
                        s = timed(cmds[name], env)
                        samples[name]["busy core" if busy else "quiet"].append(s)
                        print(f"  {name} {'busy' if busy else 'quiet'}: {s:.1f} s",
                              file=sys.stderr, flush=True)
    rows = []
    print("| command | quiet s | busy core s | busy / quiet |")
    print("|---|---:|---:|---:|")
    for name, by in samples.items():
        q, b = statistics.median(by["quiet"]), statistics.median(by["busy core"])
        rows.append({"command": name, "quiet_s": q, "busy_s": b, "ratio": b / q, "samples": by})
        print(f"| {name} | {q:.1f} | {b:.1f} | {b / q:.2f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"usable_cpus": many, "repeat": args.repeat, "rows": rows,
                                     "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
