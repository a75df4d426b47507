"""All of qatconv's benchmarks in one sitting, and the table for README.

Runs, in this order, each interleaving its own contenders (A B A B ...) so that machine drift
cancels within a comparison:

1. fold     (bench/fold.py --prepare): `qatconv fold` (model-free, and plain --model --weights)
            vs cp, safetensors load+save, torch.ao fuse_modules, torch.fx fuse on a generated
            1 GiB checkpoint; wall and peak RSS; and `prepare --mode calibrate`'s peak RSS.
2. prepare  (bench/prepare.py): fine-tune steps/s vs a hand-written torch.ao QAT loop;
   prepare_process (bench/prepare_process.py): whole processes on a 4 x Linear(512) MLP;
   step (bench/step.py): one QAT step at widths 512 and 2048, activations int8 and none.
2b. contention (bench/contention.py): digits prepare and the demo, quiet and next to a busy core.
3. startup  (bench/startup.py): `qatconv --help`, `qatconv inspect` of the 1 GiB file vs
            `python -c "import torch"`.
4. scaling  (bench/scaling.py): plain fold and prepare of models with 10, 100, 1,000 pairs.
5. export   (bench/export.py): onnxruntime int8 (the model `qatconv export` writes) vs
            onnxruntime float vs torch float, samples/s at batch 1 and 256 (needs the onnx extra).

Writes bench/out/run.json (everything) and bench/out/run.md (the tables, with each goal and
whether it was met). Run: python bench/run.py [--quick]   (--quick: 256 MiB, fewer repeats)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"

GOALS = {
    "fold_wall_vs_load_save": 1.0,  # at most
    "fold_rss_vs_file": 0.4,  # at most
    "prepare_vs_hand_written": 1.0,  # at least
    "prepare_process_vs_hand_written": 1.3,  # at least, whole process, 4 x Linear(512)
    "prepare_rss_vs_file": 2.5,  # at most, prepare --mode calibrate of the 1 GiB checkpoint
    "contention_prepare_busy_vs_quiet": 1.5,  # at most, default threads
    "contention_demo_busy_s": 20.0,  # at most
    "startup_vs_import_torch": 0.25,  # at most
    "export_int8_vs_float_b256": 1.5,  # at least, 4 x Linear(2048) MLP
    "export_int8_vs_float_b1": 2.0,  # at least, 4 x Linear(2048) MLP
}
INT8 = "onnxruntime int8 (W8A8 QDQ)"


def run(script: str, *args: str) -> dict:
    out = OUT / f"{Path(script).stem}.json"
    cmd = [sys.executable, str(ROOT / "bench" / script), "--json", str(out), *args]
    print(f"$ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)
    print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return json.loads(out.read_text())


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(res: dict) -> str:
    lines = [f"Machine: {res['machine']}", ""]
    fold = res["fold"]
    lines += [(f"### fold ({fold['checkpoint']['file_mib']:.0f} MiB checkpoint, "
               f"{fold['checkpoint']['layers']} x Linear({fold['checkpoint']['hidden']}) + BN; "
               f"medians of {fold['repeat']})"), "",
              "| tool | wall s (min-max) | vs load+save | peak RSS MiB | RSS / file |",
              "|---|---:|---:|---:|---:|"]
    for r in fold["rows"]:
        walls = [s["wall_s"] for s in r["samples"]]
        lines.append(f"| {r['tool']} | {r['wall_s']:.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
                     f"{r['wall_vs_load_save']:.2f}x | {r['peak_rss_mib']:.0f} | "
                     f"{r['rss_vs_file']:.2f}x |")
    lines.append("")
    for tool in FOLD_TOOLS:
        q = next((r for r in fold["rows"] if r["tool"] == tool), None)
        if q is not None:
            lines.append(
                f"Goal: `{tool}` wall <= {GOALS['fold_wall_vs_load_save']}x load+save: "
                f"{q['wall_vs_load_save']:.2f}x, "
                f"{verdict(q['wall_vs_load_save'] <= GOALS['fold_wall_vs_load_save'])}; "
                f"peak RSS <= {GOALS['fold_rss_vs_file']}x file: {q['rss_vs_file']:.2f}x, "
                f"{verdict(q['rss_vs_file'] <= GOALS['fold_rss_vs_file'])}.")
    q = next((r for r in fold["rows"] if r["tool"] == PREPARE_TOOL), None)
    if q is not None:
        lines.append(f"Goal: `{PREPARE_TOOL}` peak RSS <= {GOALS['prepare_rss_vs_file']}x "
                     f"file: {q['rss_vs_file']:.2f}x, "
                     f"{verdict(q['rss_vs_file'] <= GOALS['prepare_rss_vs_file'])}.")
    lines += ["", *contention_report(res)] if "contention" in res else [""]
    prep = res["prepare"]
    lines += [(f"### prepare (fine-tune, digits MLP, {prep['steps']} steps, batch "
               f"{prep['batch_size']})"), "",
              "| loop | steps/s median (min-max) | vs hand-written |", "|---|---:|---:|"]
    for r in prep["rows"]:
        lines.append(f"| {r['loop']} | {r['median']:.0f} ({min(r['steps_per_s']):.0f}-"
                     f"{max(r['steps_per_s']):.0f}) | {r['ratio']:.2f}x |")
    ratio = next(r["ratio"] for r in prep["rows"] if r["loop"].startswith("qatconv"))
    lines += ["", (f"Goal: >= {GOALS['prepare_vs_hand_written']}x the hand-written loop: "
                   f"{ratio:.2f}x, {verdict(ratio >= GOALS['prepare_vs_hand_written'])}."), ""]
    if "prepare_process" in res:
        lines += [*process_report(res["prepare_process"]), ""]
    if "step" in res:
        lines += [*step_report(res["step"]), ""]
    lines += ["### start-up", "", "| command | median s (min-max) | vs import torch |",
              "|---|---:|---:|"]
    for r in res["startup"]:
        lines.append(f"| {r['command']} | {r['median']:.3f} ({min(r['seconds']):.3f}-"
                     f"{max(r['seconds']):.3f}) | {r['ratio_vs_import_torch']:.2f}x |")
    worst = max(r["ratio_vs_import_torch"] for r in res["startup"] if "qatconv" in r["command"])
    lines += ["", (f"Goal: <= {GOALS['startup_vs_import_torch']}x importing torch: worst "
                   f"{worst:.2f}x, {verdict(worst <= GOALS['startup_vs_import_torch'])}."), ""]
    sc = res["scaling"]
    sizes = list(next(iter(sc.values()))["median_s"])
    lines += ["### scaling (in-process; Linear(16, 16) + BN pairs)", "",
              "| step | " + " | ".join(f"{n} pairs s (ms/pair)" for n in sizes)
              + " | slope ms/pair |", "|---|" + "---:|" * (len(sizes) + 1)]
    for step, r in sc.items():
        cells = " | ".join(f"{r['median_s'][n]:.2f} ({r['per_pair_ms'][n]:.1f})" for n in sizes)
        lines.append(f"| {step} | {cells} | {r['slope_ms_per_pair']:.2f} |")
    if "export" in res:
        lines += ["", *export_report(res["export"])]
    return "\n".join(lines) + "\n"


FOLD_TOOLS = ("qatconv fold (CLI)", "qatconv fold --model --weights (CLI)")
PREPARE_TOOL = "qatconv prepare --mode calibrate (CLI)"


def contention_report(res: dict) -> list[str]:
    c = res["contention"]
    lines = [(f"### on a shared machine ({c['usable_cpus']} usable CPUs; quiet vs a busy process "
              f"pinned to one core; medians of {c['repeat']})"), "",
             "| command | quiet s | busy core s | busy / quiet |", "|---|---:|---:|---:|"]
    for r in c["rows"]:
        lines.append(f"| {r['command']} | {r['quiet_s']:.1f} | {r['busy_s']:.1f} | "
                     f"{r['ratio']:.2f}x |")
    prep = next(r for r in c["rows"] if r["command"].endswith("(default threads)"))
    demo = next((r for r in c["rows"] if r["command"] == "demo"), None)
    goal = GOALS["contention_prepare_busy_vs_quiet"]
    lines += ["", (f"Goal: default-threads prepare next to the busy core <= {goal}x its quiet "
                  f"time: {prep['ratio']:.2f}x, {verdict(prep['ratio'] <= goal)}.")]
    if demo is not None:
        goal = GOALS["contention_demo_busy_s"]
        lines.append(f"Goal: the demo next to the busy core <= {goal:.0f} s: "
                     f"{demo['busy_s']:.1f} s, {verdict(demo['busy_s'] <= goal)}.")
    return [*lines, ""]


def process_report(pp: dict) -> list[str]:
    lines = [(f"### prepare, whole process ({pp['layers']} x Linear({pp['width']}) + BN, batch "
              f"{pp['batch']}, {pp['steps']} steps, one thread each)"), "",
             "| run | wall s median (min-max) |", "|---|---:|"]
    for name, vals in pp["samples"].items():
        med = sorted(vals)[len(vals) // 2]
        lines.append(f"| {name} | {med:.1f} ({min(vals):.1f}-{max(vals):.1f}) |")
    ratio, goal = pp["ratio_hand_over_qatconv"], GOALS["prepare_process_vs_hand_written"]
    return [*lines, "", (f"Goal: hand-written time / qatconv time >= {goal}x: {ratio:.2f}x, "
                        f"{verdict(ratio >= goal)}.")]


def step_report(st: dict) -> list[str]:
    from step import table  # bench/step.py

    return [(f"### one fine-tune step ({st['layers']} x Linear(W) + BN, batch {st['batch']}, one "
             "thread, Adam; CPU time, medians)"), "", table(st["rows"])]


def export_report(ex: dict) -> list[str]:
    title = (f"### export (onnxruntime CPU, {ex['threads']} thread; medians of {ex['rounds']} "
             "interleaved rounds)")
    header = ("| model | contender | batch 1 samples/s | vs ORT float | batch 256 samples/s | "
              "vs ORT float |")
    lines = [title, "", header, "|---|---|---:|---:|---:|---:|"]
    for name, m in ex["models"].items():
        for label in m["batches"]["1"]:
            b1, b256 = m["batches"]["1"][label], m["batches"]["256"][label]
            lines.append(f"| {name} | {label} | {b1['samples_per_s']:,.0f} | "
                         f"{b1['vs_onnxruntime_float']:.2f}x | {b256['samples_per_s']:,.0f} | "
                         f"{b256['vs_onnxruntime_float']:.2f}x |")
    lines += ["", "| model | int8 .onnx | dynamic .onnx | float .onnx | folded .safetensors |",
              "|---|---:|---:|---:|---:|"]
    for name, m in ex["models"].items():
        z = m["sizes"]
        lines.append(f"| {name} | {z['int8']:,} | {z['dynamic']:,} | {z['float']:,} | "
                     f"{z['folded safetensors']:,} |")
    big = ex["models"]["mlp2048"]["batches"]
    r256, r1 = big["256"][INT8]["vs_onnxruntime_float"], big["1"][INT8]["vs_onnxruntime_float"]
    g256, g1 = GOALS["export_int8_vs_float_b256"], GOALS["export_int8_vs_float_b1"]
    lines += ["", (f"Goals (4 x Linear(2048) MLP): int8 >= {g256}x ORT float at batch 256: "
                   f"{r256:.2f}x, {verdict(r256 >= g256)}; >= {g1}x at batch 1: {r1:.2f}x, "
                   f"{verdict(r1 >= g1)}."), ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB checkpoint, fewer repeats")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out, e.g. "
                    "export,scaling")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    OUT.mkdir(parents=True, exist_ok=True)
    size, rep = ("256", "2") if args.quick else ("1024", "3")
    res: dict = {
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python "
                   f"{platform.python_version()}",
    }
    res["fold"] = run("fold.py", "--size-mib", size, "--repeat", rep, "--prepare")
    if "contention" not in skip:
        res["contention"] = run("contention.py", "--repeat", "1" if args.quick else "3")
    res["prepare"] = run("prepare.py", "--repeat", rep)
    if "prepare_process" not in skip:
        res["prepare_process"] = run("prepare_process.py", "--repeat", rep)
    if "step" not in skip:
        res["step"] = run("step.py", "--rounds", "3" if args.quick else "5")
    res["startup"] = run("startup.py", "--repeat", "3" if args.quick else "5")
    res["scaling"] = run("scaling.py", "--repeat", "1" if args.quick else "3")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("export bench skipped: pip install -e '.[onnx]'", file=sys.stderr)
    else:
        if "export" not in skip:
            res["export"] = run("export.py", "--rounds", "3" if args.quick else "5")
    (OUT / "run.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = report(res)
    (OUT / "run.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
