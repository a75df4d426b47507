"""The command line: argv -> config -> one api call -> printed result and exit code.

The only module that knows argv, exit codes and colour. It imports no torch at module level, so
`qatconv --help` and `qatconv inspect x.safetensors` stay fast.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from qatconv import __version__
from qatconv._console import Output, error_json, error_line, result_written, stdout_to_stderr
from qatconv.config import (
    Activations,
    Backend,
    Device,
    Loss,
    Mode,
    ModelConfig,
    Optimizer,
    QuantConfig,
    TrainConfig,
)
from qatconv.errors import QatconvError, first_line

app = typer.Typer(
    name="qatconv",
    help="Fold Linear+BatchNorm1d pairs through PyTorch QAT (LinearBn1d) into deployable "
    "safetensors.\n\nExit codes: 0 ok, 2 usage, 3 bad input, 4 check failed, 1 internal error.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every command.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout, nothing else there.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No human output on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model code: path/to/file.py:NAME or package.module:NAME "
                 "(a class, or a function returning an nn.Module)."),
]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option("--model-arg", help="KEY=VALUE passed to the model constructor (VALUE read as "
                 "JSON, else as a string). Repeatable."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow torch pickles that run code when loaded. "
                       "Only for files you trust.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]
TargetColOpt = Annotated[
    str | None, typer.Option("--target-column", help="CSV data: the column holding targets.")
]
StrictPairsOpt = Annotated[
    bool, typer.Option("--strict", help="Skip pairs whose feature axis cannot be proven on data.")
]
AllowNoPairsOpt = Annotated[
    bool, typer.Option("--allow-no-pairs", help="Write the output even when no pair can fold.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, show_default=False,
                 help="Compute threads \\[default: 1 for models whose widest Linear has < 1M "
                 "weights, else the CPUs this process may use (affinity, cgroup quota); "
                 "OMP_NUM_THREADS is honoured]."),
]


def _manage_threads(threads: int | None) -> None:
    """Fix or defer (per model) the compute threads before torch loads; see qatconv/threads.py."""
    from qatconv import threads as threads_mod

    threads_mod.manage(threads)


def _note_threads(out: Output) -> None:
    from qatconv import threads as threads_mod

    choice = threads_mod.current()
    if choice is not None:
        out.note(choice.describe())


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qatconv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Fold Linear+BatchNorm1d pairs through PyTorch QAT into deployable safetensors."""


def _model_cfg(
    model: str | None, model_args: list[str] | None, weights: Path | None, trust: bool
) -> ModelConfig:
    from qatconv.modelspec import parse_model_args

    return ModelConfig(model, parse_model_args(model_args or []), weights, trust)


def _pair_table(pairs: list[dict[str, Any]], skipped: list[dict[str, Any]],
                unverified: set[str] | None = None,
                before: list[dict[str, Any]] | None = None) -> Any:
    """The pair table; ``before``: BN -> Linear candidates (their BN row says how to fold it)."""
    from rich.table import Table

    table = Table(title="Linear+BatchNorm1d pairs", title_justify="left")
    for col in ("linear", "batchnorm", "features", "status"):
        table.add_column(col)
    for p in pairs:
        status = "fold (unverified)" if unverified and p["linear"] in unverified else "fold"
        table.add_row(p["linear"], p["bn"], f"{p['in_features']}->{p['out_features']}", status)
    candidates = {c["bn"]: c for c in before or []}
    for s in skipped:
        c = None if s.get("linear") else candidates.pop(s.get("bn") or "", None)
        if c is not None:
            table.add_row(c["linear"], c["bn"], "BN->Linear",
                          "fold with --fold-bn-before-linear")
            continue
        table.add_row(s.get("linear") or "-", s.get("bn") or "-", "",
                      f"skip: {s['code']} ({s['reason']})")
    for c in candidates.values():
        table.add_row(c["linear"], c["bn"], "BN->Linear", "fold with --fold-bn-before-linear")
    return table


def _sensitivity_table(rows: list[dict[str, Any]], bits: int) -> Any:
    from rich.table import Table

    table = Table(title="Sensitivity: model-output SQNR with only this pair quantized "
                  "(low = a candidate for --exclude)", title_justify="left")
    for col in ("linear", f"w{bits} only (dB)", f"w{bits}a8 (dB)"):
        table.add_column(col, justify="left" if col == "linear" else "right")
    for r in rows:
        table.add_row(r["linear"], *(f"{v:.1f}" if v is not None else "exact"
                                     for v in (r["sqnr_weight_only_db"], r["sqnr_w8a8_db"])))
    return table


# ----------------------------------------------------------------------------- inspect


@app.command(
    epilog="Examples:\n\n  qatconv inspect model.safetensors\n\n"
    "  qatconv inspect ckpt.pt --model net.py:Net --data calib.npz --strict --json",
)
def inspect(
    path: Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, index.json, .pt/.pth/.bin/.ckpt.")],
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    data: Annotated[Path | None, typer.Option("--data", help="Sample inputs for the pair rules' axis check.")] = None,
    target_column: TargetColOpt = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 4 when a BN health problem, skipped or unverified pair is found.")] = False,
    trust_pickle: TrustOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a checkpoint holds, which pairs fold, and unhealthy BatchNorm channels."""
    from qatconv import api

    out = Output(json_mode=json_, quiet=quiet)
    cfg = _model_cfg(model, model_arg, None, trust_pickle) if model or trust_pickle else None
    ins = api.inspect_path(path, model_cfg=cfg, data=data, strict=strict,
                           target_column=target_column)
    for n in ins.notes:
        out.note(n)
    if ins.scan is not None and ins.scan.unverified and not strict:
        out.warn(f"{len(ins.scan.unverified)} pair(s) unverified: give --data DATA to prove "
                 "the feature axis (prepare --data / fold --check DATA do)")
    if ins.scan is not None and ins.scan.finder_note():
        out.warn(ins.scan.finder_note())
    out.result(ins.to_json())
    if out.human:
        _print_inspection(out, ins)
    api.check_inspection(ins, strict)


def _print_inspection(out: Output, ins: Any) -> None:
    from rich.table import Table

    t = Table(show_header=False, title=str(ins.path), title_justify="left")
    t.add_row("format", ins.format)
    t.add_row("tensors", f"{ins.tensors:,}")
    t.add_row("parameters", f"{ins.parameters:,}")
    t.add_row("bytes", f"{ins.bytes:,}")
    t.add_row("dtypes", ", ".join(f"{k} x{v}" for k, v in ins.dtypes.items()))
    if ins.qatconv:
        meta = ins.qatconv
        t.add_row("qatconv stage", str(meta.get("stage")))
        pairs = meta.get("pairs")
        t.add_row("pairs", str(len(pairs)) if isinstance(pairs, list) else "(unreadable)")
        if isinstance(meta.get("unverified"), list) and meta["unverified"]:
            t.add_row("unverified folds", ", ".join(map(str, meta["unverified"])))
        if "backend" in meta:
            t.add_row("backend / bits", f"{meta.get('backend')} / {meta.get('weight_bits')}")
        if isinstance(meta.get("metrics"), dict):
            t.add_row("metrics", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in meta["metrics"].items()))
    out.table(t)
    if ins.scan is not None:
        scan = ins.scan.to_json()
        unverified = {p.linear for p in ins.scan.unverified}
        out.table(_pair_table(scan["pairs"], scan["skipped"], unverified,
                              scan["bn_before_linear"]))
    _print_health(out, ins.bn_health)


def _print_health(out: Output, health: list[Any]) -> None:
    """BatchNorm1d health (what --strict checks); other kinds, never folded, labelled apart."""
    from rich.table import Table

    folded = [h for h in health if h.foldable_kind]
    others = [h for h in health if not h.foldable_kind]
    bad = [h for h in folded if not h.ok] + [h for h in others if not h.ok]
    if bad:
        t = Table(title="BatchNorm health", title_justify="left")
        for col in ("batchnorm", "kind", "channels", "gamma == 0", "var <= 1e-8", "non-finite"):
            t.add_column(col)
        for b in bad:
            kind = b.kind or "BatchNorm"
            if not b.foldable_kind:
                kind += " (never folded; not checked by --strict)"
            t.add_row(b.bn, kind, str(b.channels), str(b.zero_gamma), str(b.tiny_var),
                      str(b.nonfinite))
        out.table(t)
    elif folded:
        out.note(f"BatchNorm health: {len(folded)} BatchNorm(s), no problem found")
    if others:
        kinds = ", ".join(sorted({h.kind or "" for h in others}))
        out.note(f"{len(others)} other normalization layer(s) ({kinds}) are never folded: "
                 "their health is not checked by --strict")


# ----------------------------------------------------------------------------- prepare


@app.command(
    epilog="Examples:\n\n  qatconv prepare --model net.py:Net --weights float.safetensors "
    "--data calib.npz -o qat.safetensors\n\n"
    "  qatconv prepare -m net.py:Net --weights float.pt --data train.npz --mode finetune "
    "--steps 500 --weight-bits 4 -o qat.safetensors",
)
def prepare(
    output: Annotated[Path, typer.Option("--output", "-o", help="QAT checkpoint to write (.safetensors).")],
    data: Annotated[Path, typer.Option("--data", help="Calibration / training data: .npy and .safetensors are read per batch (any size); .npz .pt .csv are loaded whole into memory.")],
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    weights: Annotated[Path | None, typer.Option("--weights", "-w", help="Float checkpoint to start from.")] = None,
    mode: Annotated[Mode, typer.Option(help="calibrate: observers only, no gradient steps; finetune: QAT training.")] = Mode.calibrate,
    steps: Annotated[int, typer.Option(help="Fine-tune steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Samples per step (and per calibration batch).")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate (Adam; small: the model is already trained).")] = 3e-4,
    loss: Annotated[Loss, typer.Option(help="distill: match the float model's outputs (no labels needed); mse / cross-entropy use the data's targets.")] = Loss.distill,
    optimizer: Annotated[Optimizer, typer.Option(help="Fine-tune optimizer.")] = Optimizer.adam,
    freeze_bn_after: Annotated[int | None, typer.Option(help="Freeze BN running stats from this step on \\[default: steps/2].")] = None,
    freeze_observers_after: Annotated[int | None, typer.Option(help="Freeze weight and input observers from this step on \\[default: 3*steps/4].")] = None,
    recalibrate_bn: Annotated[bool, typer.Option("--recalibrate-bn", help="Re-estimate BN stats over the data (exact averages) before anything else.")] = False,
    backend: Annotated[Backend, typer.Option(help="Target backend; qnnpack uses a narrow symmetric range.")] = Backend.x86,
    weight_bits: Annotated[int, typer.Option(help="Weight bits, 2..8.")] = 8,
    activations: Annotated[Activations, typer.Option(help="int8: static W8A8, a per-tensor fake quant on each swapped Linear's input, ranged per backend (x86/fbgemm uint8 0..127, qnnpack int8); none: weight-only (dynamic or weight-only runtimes).")] = Activations.int8,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Glob on a Linear's path (repeatable): keep matching pairs out of quantization; fold still folds their BN in float. The sensitivity table says which to pick.", show_default=False)] = None,
    sensitivity: Annotated[bool | None, typer.Option("--sensitivity/--no-sensitivity", help="Measure each pair's SQNR with only that pair quantized (two calibrations per pair on up to 1024 samples) \\[default: when there are at most 32 pairs].", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed for shuffling and init; same inputs + seed = same file.")] = 0,
    device: Annotated[Device, typer.Option(help="cpu, cuda, or auto (cuda when available).")] = Device.cpu,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes on this machine (torch.distributed: gloo on CPU, nccl with one GPU each): each global --batch-size batch is split across them, BN statistics and activation ranges are those of the global batch, rank 0 writes. Several machines: torchrun ... -m qatconv prepare.")] = 1,
    target_column: TargetColOpt = None,
    strict: StrictPairsOpt = False,
    allow_no_pairs: AllowNoPairsOpt = False,
    fold_bn_before_linear: Annotated[bool, typer.Option("--fold-bn-before-linear", help="Also fold each BatchNorm1d that feeds only a Linear into that Linear's input side before the QAT swap.")] = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Swap each safe Linear+BatchNorm1d pair for LinearBn1d, calibrate or fine-tune, save."""
    _manage_threads(threads)
    from qatconv import api, distributed

    if nproc != 1 and distributed.Launch.from_env() is None:
        with _interruptible():
            distributed.launch_local(nproc, distributed.strip_nproc(_invocation()))
        return
    main_rank = distributed.is_main_process()
    out = Output(json_mode=json_ and main_rank, quiet=quiet or not main_rank)
    train = TrainConfig(mode, steps, batch_size, lr, loss, optimizer, freeze_bn_after,
                        freeze_observers_after, recalibrate_bn, seed, device)
    quant = QuantConfig(backend, weight_bits, activations)
    cfg = _model_cfg(model, model_arg, weights, trust_pickle)
    total = steps if mode is Mode.finetune else 0
    with _interruptible(), distributed.session(device.value) as replica, \
            out.progress("fine-tune", total) as advance:
        def on_step(info: Any) -> None:
            advance(info.step, info=f"loss {info.loss:.4g}  {info.samples_per_s:,.0f} samples/s")

        report = api.prepare(cfg, data, output, train=train, quant=quant,
                             target_column=target_column, force=force,
                             allow_no_pairs=allow_no_pairs, strict=strict,
                             exclude=tuple(exclude or ()), sensitivity=sensitivity,
                             fold_bn_before_linear=fold_bn_before_linear, on_step=on_step,
                             on_note=out.note, replica=replica)
    for w in report.warnings:
        out.warn(w)
    _note_threads(out)
    out.result(report.to_json())
    if out.human:
        out.table(_pair_table(report.pairs, report.skipped))
        if report.sensitivity:
            out.table(_sensitivity_table(report.sensitivity, weight_bits))
        for r in report.metadata.get("bn_before_linear", []):
            out.note(f"folded BatchNorm1d {r['bn']} into the input side of {r['linear']}")
        m = report.metrics
        act = "a8" if activations is Activations.int8 else ""
        line = f"w{weight_bits}{act}-simulated vs float: relative MSE {m['relative_mse']:.3g}"
        if "top1_agreement" in m:
            line += f", top-1 agreement {m['top1_agreement']:.2%}"
        out.note(line)
        out.note(f"wrote {report.output} ({len(report.pairs)} pair(s), {report.seconds:.1f} s)")


# ----------------------------------------------------------------------------- fold


@app.command(
    epilog="Examples:\n\n  qatconv fold qat.safetensors -o folded.safetensors --check calib.npz\n\n"
    "  qatconv fold --model net.py:Net --weights float.pt -o folded.safetensors\n\n"
    "  qatconv fold qat.safetensors -o out/model.safetensors.index.json --max-shard-size 2GB",
)
def fold(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folded checkpoint to write (.safetensors; the index path with --max-shard-size).")],
    qat_checkpoint: Annotated[Path | None, typer.Argument(help="QAT checkpoint written by `qatconv prepare`.", show_default=False)] = None,
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    weights: Annotated[Path | None, typer.Option("--weights", "-w", help="Float checkpoint for a plain BN fold (with --model).")] = None,
    check: Annotated[Path | None, typer.Option("--check", help="Data to verify the folded model on (exit 4 beyond tolerance). W8A8 checkpoints: also an integer emulation of the folded int8 model against the QAT model with fake quant on (exit 4 beyond 1e-3 of the output range).")] = None,
    atol: Annotated[float | None, typer.Option(help="Check: absolute tolerance \\[default: by dtype: F32 1e-4, F16 1e-2, BF16 5e-2, F64 1e-7].", show_default=False)] = None,
    rtol: Annotated[float | None, typer.Option(help="Check: relative tolerance \\[default: as --atol].", show_default=False)] = None,
    emit_qparams: Annotated[bool, typer.Option("--emit-qparams", help="Also write <linear>.weight_scale / .weight_zero_point tensors.")] = False,
    max_shard_size: Annotated[str | None, typer.Option(help="Split the output into shards of at most this size, e.g. 2GB.")] = None,
    target_column: TargetColOpt = None,
    fold_bn_before_linear: Annotated[bool, typer.Option("--fold-bn-before-linear", help="Plain fold: also fold a BatchNorm1d that feeds a Linear directly into that Linear's input side.")] = False,
    strict: StrictPairsOpt = False,
    allow_no_pairs: AllowNoPairsOpt = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fold BatchNorm into the Linears (LinearBn1d.to_float per pair) and write safetensors."""
    _manage_threads(threads)  # they matter for --check (and a plain fold's shape check)
    from qatconv import api

    out = Output(json_mode=json_, quiet=quiet)
    cfg = _model_cfg(model, model_arg, weights, trust_pickle) if (model or weights) else None
    shard = api.parse_size(max_shard_size) if max_shard_size else None
    if shard and not output.name.endswith(".index.json"):
        out.note(f"--max-shard-size: writing model-0000k-of-0000N.safetensors and "
                 f"model.safetensors.index.json into {output.parent}/")
    with _interruptible():
        result = api.fold(
            output, qat_checkpoint=qat_checkpoint, model_cfg=cfg, check=check, atol=atol,
            rtol=rtol, emit_qparams=emit_qparams, max_shard_size=shard, force=force,
            allow_no_pairs=allow_no_pairs, strict=strict, target_column=target_column,
            fold_bn_before_linear=fold_bn_before_linear, on_note=out.note,
        )
    _note_threads(out)
    _report_fold(out, result)


def _report_fold(out: Output, result: Any) -> None:
    unverified = set(result.metadata.get("unverified", []))
    if unverified and result.check is None:
        out.warn(f"{len(unverified)} pair(s) unverified: their feature axis was not proven; "
                 "rerun with --check DATA")
    out.result(result.to_json())
    if out.human:
        out.table(_pair_table(result.pairs, result.skipped, unverified))
        for r in result.metadata.get("bn_before_linear", []):
            out.note(f"folded BatchNorm1d {r['bn']} into the input side of {r['linear']}")
        if result.check:
            c = result.check
            floor = f" (its float noise floor {c.noise_floor:.3g})" if c.noise_floor else ""
            out.note(f"check vs {c.reference} model{floor} on {c.samples} samples: max abs "
                     f"error {c.max_abs_error:.3g}, max rel error {c.max_rel_error:.3g} -> "
                     f"{'ok' if c.passed else 'FAILED'}")
            if c.integer:
                i = c.integer
                top1 = f", top-1 agreement {i.top1_agreement:.2%}" if i.top1_agreement else ""
                out.note(f"integer emulation vs QAT model (fake quant on): max abs error "
                         f"{i.max_abs_error:.3g} ({i.max_abs_error / (i.output_range or 1):.2g} "
                         f"of the output range), max {i.max_step_error:.3g} input steps{top1}"
                         f" -> {'ok' if i.passed else 'FAILED'}")
        out.note(f"wrote {', '.join(str(f) for f in result.files)} ({result.seconds:.2f} s)")


# ----------------------------------------------------------------------------- export


@app.command(
    epilog="Examples:\n\n  qatconv export folded.safetensors -o model.onnx --check heldout.npz\n\n"
    "  qatconv export folded.safetensors -o model.onnx --input-shape 16,64\n\n"
    "Needs the onnx extra: pip install \"qatconv\\[onnx]\".",
)
def export(
    folded: Annotated[Path, typer.Argument(help="Folded checkpoint written by `qatconv fold`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX model to write (.onnx).")],
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (13..20).")] = 17,
    check: Annotated[Path | None, typer.Option("--check", help="Data to run onnxruntime on against the integer emulation and the QAT simulation (exit 4 beyond tolerance or on float kernels; nothing written).")] = None,
    allow_float_kernels: Annotated[bool, typer.Option("--allow-float-kernels", help="Check: accept quantized Linears that onnxruntime runs in float.")] = False,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="One sample's shape without the batch axis, e.g. 16,64 \\[default: from --check data, or the first Linear's inputs].", show_default=False)] = None,
    target_column: TargetColOpt = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a folded checkpoint as an int8 ONNX model (QDQ) that onnxruntime runs in int8."""
    _manage_threads(threads)  # torch and the onnxruntime check session both use them
    from qatconv import export as export_mod

    out = Output(json_mode=json_, quiet=quiet)
    cfg = _model_cfg(model, model_arg, None, False) if model else None
    shape = _parse_shape(input_shape) if input_shape is not None else None
    with _interruptible():
        report = export_mod.export(folded, output, model_cfg=cfg, opset=opset, check=check,
                                   allow_float_kernels=allow_float_kernels, input_shape=shape,
                                   target_column=target_column, force=force)
    _note_threads(out)
    out.result(report.to_json())
    if out.human:
        _report_export(out, report)


def _parse_shape(text: str) -> tuple[int, ...]:
    from qatconv.errors import UsageError

    try:
        return tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of sizes",
                         hint="e.g. --input-shape 64 or --input-shape 16,64") from None


def _report_export(out: Output, report: Any) -> None:
    from rich.table import Table

    kernels = report.check.kernels if report.check else {}
    t = Table(title=f"{report.output} ({report.mode}, opset {report.opset})", title_justify="left")
    for col in ("linear", "int8 form", "input rank", "onnxruntime kernels"):
        t.add_column(col)
    for row in report.linears:
        t.add_row(row["linear"], row["form"], str(row["rank"]),
                  ", ".join(kernels.get(row["linear"], [])) or "-")
    out.table(t)
    if report.check:
        for c in report.check.comparisons:
            top1 = "" if c.top1_agreement is None else f", top-1 agreement {c.top1_agreement:.2%}"
            out.note(f"onnxruntime vs {c.reference} on {report.check.samples} samples: max abs "
                     f"error {c.max_abs_error:.3g} (output range {c.output_range:.3g}){top1}")
        if report.check.accuracy is not None:
            refs = ", ".join(f"{c.reference} {c.reference_accuracy:.2%}"
                             for c in report.check.comparisons if c.reference_accuracy is not None)
            out.note(f"top-1 accuracy: onnxruntime {report.check.accuracy:.2%} ({refs})")
    out.note(f"wrote {report.output} ({report.bytes:,} bytes, {report.seconds:.2f} s)")


# ----------------------------------------------------------------------------- demo


@app.command(epilog="Example:\n\n  qatconv demo --output-dir demo_out")
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where the demo writes its files.")] = Path("qatconv-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace files from an earlier demo run.")] = False,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run prepare (fine-tune) -> fold -> check on the bundled digits MLP and show accuracies."""
    _manage_threads(threads)
    from qatconv import demo as demo_mod

    out = Output(json_mode=json_, quiet=quiet)
    with _interruptible():
        result = demo_mod.run(output_dir, force=force, on_note=out.note, progress=out.progress)
    _note_threads(out)
    out.result(result.to_json())
    if out.human:
        out.table(demo_mod.table(result))


# ----------------------------------------------------------------------------- main


class _Interrupted(Exception):
    pass


class _interruptible:
    """SIGTERM behaves like Ctrl-C while a command works: no partial output, exit 130.

    A KeyboardInterrupt that leaves the block becomes an `InterruptedError_` (exit 130) so that
    `main` reports it as one `error:` line; typer would otherwise turn it into a bare exit code.
    """

    _INTERRUPTED = "interrupted; no output was written"

    def __enter__(self) -> None:
        self._old = _interruptible.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        _interruptible.restore(self._old)
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            from qatconv.errors import InterruptedError_

            raise InterruptedError_(self._INTERRUPTED) from exc

    @staticmethod
    def install() -> Any:
        """Make SIGTERM raise KeyboardInterrupt; return the old handler (None: not installed)."""

        def raise_interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        try:
            return signal.signal(signal.SIGTERM, raise_interrupt)
        except ValueError:  # not the main thread (e.g. under a test runner thread)
            return None

    @staticmethod
    def restore(old: Any) -> None:
        if old is not None:
            try:
                signal.signal(signal.SIGTERM, old)
            except ValueError:
                pass


def _stdout_guarded(callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """The command body with whatever it (or model code) prints sent to stderr: stdout is --json's."""
    if callback is None:
        return None

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        with stdout_to_stderr():
            return callback(*args, **kwargs)

    return run


_ARGV: list[str] = []


def _invocation() -> list[str]:
    """The arguments `main` was called with (``sys.argv`` when the app runs without it)."""
    return list(_ARGV) if _ARGV else sys.argv[1:]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; every failure ends as `error:` / `hint:` + exit code.

    `QatconvError` -> its own code; a flag typer/click rejects -> 2; an `OSError` that escaped
    the library (disk full, permissions) -> 3; Ctrl-C or SIGTERM -> 130; anything else is a
    bug -> 1. The traceback is printed only with ``--debug`` (or ``QATCONV_DEBUG=1``).
    """
    import traceback

    from qatconv.errors import InterruptedError_

    args = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = args
    debug = "--debug" in args or os.environ.get("QATCONV_DEBUG") == "1"
    from qatconv.distributed import is_main_process

    json_mode = "--json" in args and is_main_process()  # stdout belongs to rank 0
    result_written(reset=True)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=r"torch\.ao\..*")

    def fail(message: str, hint: str | None, code: int, exc: BaseException | None) -> None:
        if debug and exc is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        # A distributed run: the failing rank prints its error, rank 0 owns stdout.
        if getattr(exc, "echo", True):
            sys.stderr.write(error_line(message, hint) + "\n")
            sys.stderr.flush()
        if json_mode and getattr(exc, "json", True) and not result_written():
            sys.stdout.write(error_json(message, hint, code))
            sys.stdout.flush()
        sys.exit(code)

    def kinds(e: BaseException) -> set[str]:
        # typer >= 0.20 vendors click (typer._click): match its classes and click's by name.
        return {c.__name__ for c in type(e).__mro__}

    command = typer.main.get_command(app)
    for sub in getattr(command, "commands", {}).values():
        sub.callback = _stdout_guarded(sub.callback)
    old_sigterm = _interruptible.install()
    rv: Any = None
    try:
        rv = command.main(args=args, prog_name="qatconv", standalone_mode=False)
    except QatconvError as e:
        fail(e.message, e.hint, e.exit_code, e)
    except KeyboardInterrupt as e:
        fail(_interruptible._INTERRUPTED, None, InterruptedError_.exit_code, e)
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a bare traceback
        names = kinds(e)
        code = getattr(e, "exit_code", 1)
        if "Exit" in names:
            sys.exit(code)
        if "Abort" in names:  # older click turns Ctrl-C into Abort
            fail(_interruptible._INTERRUPTED, None, InterruptedError_.exit_code, e)
        if "NoArgsIsHelpError" in names:  # bare `qatconv`: typer has printed the help
            text = str(e.format_message()).strip()  # type: ignore[attr-defined]
            if text:
                sys.stderr.write(text + "\n")
            sys.exit(code)
        if "ClickException" in names:
            ctx = getattr(e, "ctx", None)
            where = getattr(ctx, "command_path", None) or "qatconv"
            fail(str(e.format_message()), f"run '{where} --help' for the options",  # type: ignore[attr-defined]
                 code if isinstance(code, int) else 2, e)
        if isinstance(e, OSError):
            what = f"{e.filename}: " if e.filename else ""
            fail(f"{what}{e.strerror or e}", "check the path, its permissions and the free "
                 "space", 3, e)
        if isinstance(e, MemoryError):
            fail("out of memory", "use smaller inputs or a machine with more memory", 1, e)
        first = first_line(e)
        fail(f"internal error: {type(e).__name__}{': ' + first if first else ''}",
             "this is a bug in qatconv: rerun with --debug and report the traceback", 1, e)
    finally:
        _interruptible.restore(old_sigterm)
    if rv == InterruptedError_.exit_code:  # typer turns a KeyboardInterrupt into Exit(130)
        fail(_interruptible._INTERRUPTED, None, InterruptedError_.exit_code, None)
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
