"""Start-up cost: `qatconv --help` and `qatconv inspect` of a large safetensors file, against
`python -c "import torch"`, each in a fresh subprocess, interleaved (A B C A B C ...).

The goal (issue 7): both qatconv commands take at most 0.25x the time of importing torch;
`inspect` reads only the header, so its time must not grow with the file's size.

Run: python bench/startup.py [--file bench/_work/fold-float-*.safetensors] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"


def default_file() -> Path | None:
    """The largest float checkpoint bench/fold.py generated."""
    files = sorted(WORK.glob("fold-float-*.safetensors"), key=lambda p: p.stat().st_size)
    return files[-1] if files else None


def wall(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def commands(big: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        'python -c "import torch"': [py, "-c", "import torch"],
        "qatconv --help": [py, "-m", "qatconv", "--help"],
        f"qatconv inspect {big.name} ({big.stat().st_size / 2**30:.2f} GiB)": [
            py, "-m", "qatconv", "inspect", str(big), "--json"
        ],
    }


def run(big: Path, repeat: int) -> list[dict]:
    cmds = commands(big)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for name, argv in cmds.items():  # warm the page cache and .pyc files once
        wall(argv)
    for _ in range(repeat):
        for name, argv in cmds.items():
            times[name].append(wall(argv))
    base = statistics.median(times['python -c "import torch"'])
    return [
        {"command": k, "seconds": v, "median": statistics.median(v),
         "ratio_vs_import_torch": statistics.median(v) / base}
        for k, v in times.items()
    ]


def table(rows: list[dict]) -> str:
    lines = ["| command | median s | min-max s | vs import torch |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['command']} | {r['median']:.3f} | {min(r['seconds']):.3f}-"
                     f"{max(r['seconds']):.3f} | {r['ratio_vs_import_torch']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--file", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "startup.json")
    args = ap.parse_args()
    args.file = args.file or default_file()
    if args.file is None or not args.file.exists():
        sys.exit(f"{args.file} is missing: run `python bench/fold.py` first (it generates it)")
    rows = run(args.file, args.repeat)
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
