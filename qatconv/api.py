"""The pipeline as plain functions returning small report types.

`cli.py`, `demo.py` and a user's notebook all call these. Step modules (checkpoint, pairs, qat,
folding, ...) are imported inside the functions so that importing this module stays torch-free.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatconv import __version__, threads
from qatconv.config import (
    InputQParams,
    Mode,
    ModelConfig,
    QuantConfig,
    QuantScheme,
    TrainConfig,
)
from qatconv.errors import (
    BadInputError,
    CheckFailedError,
    CheckpointError,
    DataError,
    NoPairsError,
    UsageError,
    first_line,
)
from qatconv.metadata import FORMAT_VERSION, header_entries

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qatconv.data import Dataset
    from qatconv.distributed import Replica
    from qatconv.emulate import IntegerCheck
    from qatconv.inspection import Inspection
    from qatconv.outputs import Outputs
    from qatconv.pair_record import PairRecord
    from qatconv.pairs import PairScan
    from qatconv.qat import StepInfo

log = logging.getLogger(__name__)



@dataclass
class LoadedModel:
    """A float model with its checkpoint loaded, and what loading did."""

    model: nn.Module
    notes: list[str] = field(default_factory=list)
    spec: str | None = None
    # The checkpoint's tensors with keys aligned to the model, in the checkpoint's own dtypes.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    args: dict[str, object] = field(default_factory=dict)
    # The checkpoint's floating-point dtypes, when ``tensors`` was not kept (`load_model`
    # with ``keep_tensors=False``).
    source_dtypes: set[torch.dtype] | None = None


@dataclass
class PrepareReport:
    output: Path
    pairs: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    notes: list[str]
    metrics: dict[str, Any]
    seconds: float
    metadata: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    # Per pair: model-output SQNR with only that pair quantized (`PairSensitivity.to_json`).
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """What `prepare --json` prints."""
        return {
            "output": str(self.output),
            "warnings": self.warnings,
            "pairs": self.pairs,
            "skipped": self.skipped,
            "metrics": self.metrics,
            "sensitivity": self.sensitivity,
            "bn_before_linear": self.metadata.get("bn_before_linear", []),
            "seconds": self.seconds,
            "notes": self.notes,
            **({"distributed": dist} if (dist := self.metadata.get("distributed")) else {}),
        }


@dataclass
class CheckResult:
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    passed: bool
    reference: str  # "qat" (fake quant off) or "float"
    samples: int
    # Max abs difference of the reference's own run in the check dtype vs its float64 run on
    # the same data (None when the float64 run was impossible): the scale of rounding noise.
    noise_floor: float | None = None
    failure: str | None = None  # which error exceeded which allowance, when not passed
    # Static W8A8: the integer emulation against the QAT model with fake quant on.
    integer: IntegerCheck | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
            "reference": self.reference,
            "samples": self.samples,
            "noise_floor": self.noise_floor,
            "failure": self.failure,
            "integer": self.integer.to_json() if self.integer else None,
        }


@dataclass
class FoldResult:
    output: Path
    files: list[Path]
    pairs: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    removed: list[str]
    notes: list[str]
    source_stage: str  # "qat" or "float"
    check: CheckResult | None
    seconds: float
    metadata: dict[str, Any]

    @property
    def unverified(self) -> list[str]:
        """Pairs whose feature axis was not proven on data, sorted."""
        return sorted(set(self.metadata.get("unverified", [])))

    def to_json(self) -> dict[str, Any]:
        """What `fold --json` prints."""
        return {
            "output": str(self.output),
            "files": [str(f) for f in self.files],
            "source_stage": self.source_stage,
            "pairs": self.pairs,
            "skipped": self.skipped,
            "unverified": self.unverified,
            "removed": self.removed,
            "check": self.check.to_json() if self.check else None,
            "seconds": self.seconds,
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------- loading


def load_model(cfg: ModelConfig, *, keep_tensors: bool = True) -> LoadedModel:
    """Build the model from its spec (or an unpickled module) and load the checkpoint strictly.

    With ``keep_tensors=False`` a safetensors checkpoint is read one module at a time into the
    built model (`_load_model_streamed`): ``tensors`` comes back empty, and the checkpoint never
    sits in memory beside the model's parameters.

    Raises:
        UsageError: neither a spec nor a trusted pickled module.
        ModelSpecError, CheckpointError: spec or checkpoint problems (exit 3).
    """
    from qatconv import checkpoint, modelspec

    if (not keep_tensors and cfg.spec is not None and cfg.weights is not None
            and checkpoint.is_safetensors(cfg.weights)):  # fmt: skip
        return _load_model_streamed(cfg)
    notes: list[str] = []
    loaded = None
    if cfg.weights is not None:
        loaded = checkpoint.load_checkpoint(cfg.weights, trust_pickle=cfg.trust_pickle)
        notes += loaded.notes
    if cfg.spec is not None:
        model = modelspec.build_model(cfg.spec, dict(cfg.args))
    elif loaded is not None and loaded.module is not None:
        model = loaded.module
        notes.append(f"using the nn.Module pickled in {cfg.weights} (--trust-pickle)")
    else:
        raise UsageError(
            "--model is required",
            hint="pass --model path/to/file.py:ClassName (or a pickled module with --trust-pickle)",
        )
    if loaded is not None:
        keys = model.state_dict().keys()
        tensors, align_notes = checkpoint.align_state_dict(loaded.tensors, keys)
        notes += align_notes
        checkpoint.load_into(model, tensors, source=str(cfg.weights))
    else:
        tensors = {}
    model.eval()
    threads.fit_to_model(model)
    return LoadedModel(model, notes, cfg.spec, args=dict(cfg.args), tensors=tensors)


def _load_model_streamed(cfg: ModelConfig) -> LoadedModel:
    """`load_model` for a safetensors checkpoint, read module by module into the built model."""
    import torch

    from qatconv import checkpoint, modelspec
    from qatconv.dtypes import DTYPES

    assert cfg.spec is not None and cfg.weights is not None
    with checkpoint.open_lazy(cfg.weights) as lazy:
        model = modelspec.build_model(cfg.spec, dict(cfg.args))
        # Source names under the keys they load into (prefixes stripped where that fits).
        sources, align_notes = checkpoint.align_state_dict(
            {n: n for n in lazy.shapes}, model.state_dict().keys())
        checkpoint.load_read_into(model, {k: lazy.shapes[n] for k, n in sources.items()},
                                  lambda key: lazy.read(sources[key]), str(cfg.weights))
        dtypes = {getattr(torch, DTYPES[d].torch, None) for d in lazy.dtypes.values()}
        notes = [*lazy.notes, *align_notes]
    model.eval()
    threads.fit_to_model(model)
    floating = {d for d in dtypes if d is not None and d.is_floating_point}
    return LoadedModel(model, notes, cfg.spec, args=dict(cfg.args), source_dtypes=floating)


def _sample(inputs: torch.Tensor, n: int = 8) -> tuple[torch.Tensor, ...]:
    return (inputs[: max(2, min(n, len(inputs)))],)


def _sample_from_data(
    model: nn.Module, data: Path | None, target_column: str | None, device: str | None = None
) -> tuple[torch.Tensor, ...] | None:
    """A few rows of ``data`` (checked to run through ``model``) for the pair rules' axis check."""
    if data is None:
        return None
    from qatconv import data as data_mod

    inputs = data_mod.load_data(data, target_column=target_column).inputs
    inputs = inputs.to(_param_dtype(model))
    if device is not None:
        inputs = inputs[:8].to(device)
    _check_data_fits(model, inputs, data)
    return _sample(inputs)


def _check_data_fits(model: nn.Module, inputs: torch.Tensor, path: Path) -> str | None:
    """Raise DataError unless ``inputs`` run through ``model``; say which output leaves
    qatconv leaves out of comparisons (`qatconv.outputs`), if any."""
    import torch

    from qatconv.outputs import flatten_outputs

    try:
        with torch.no_grad():
            model.eval()
            return flatten_outputs(model(inputs[:2]), batch=len(inputs[:2])).note()
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit
        first = first_line(e, type(e).__name__)
        raise DataError(
            f"the data in {path} (inputs {tuple(inputs.shape)}) does not fit the model: {first}",
            hint="check the feature count and layout the model expects",
        ) from None


def scan_pairs(
    model: nn.Module, sample: tuple[torch.Tensor, ...] | None, *, strict: bool
) -> PairScan:
    from qatconv.pairs import find_pairs

    return find_pairs(model, sample, strict=strict)


def _note_finder(scan: PairScan, loaded: LoadedModel, note: Callable[[str], None]) -> None:
    """Say how an untraceable model's pairs were found (a recorded run holds for its shapes)."""
    how = scan.finder_note()
    if how is not None:
        note(how)
        loaded.notes.append(how)


def _require_pairs(scan: PairScan, allow_no_pairs: bool) -> None:
    if scan.pairs or allow_no_pairs:
        return
    reasons = "; ".join(
        (f"{s.linear} -> {s.bn}: {s.code}" if s.linear else f"{s.bn}: {s.code}")
        for s in scan.skipped[:5]
    ) or "the model has no Linear followed by BatchNorm1d"
    hint = ("run `qatconv inspect CKPT --model SPEC` for the reasons; --allow-no-pairs writes "
            "the output anyway")
    if scan.bn_before_linear:
        c = scan.bn_before_linear[0]
        hint = (f"{len(scan.bn_before_linear)} BatchNorm1d -> Linear candidate(s) ({c.bn} -> "
                f"{c.linear}{', ...' if len(scan.bn_before_linear) > 1 else ''}) fold with "
                "--fold-bn-before-linear; --allow-no-pairs writes the output anyway")
    raise NoPairsError(f"no Linear+BatchNorm1d pair can fold ({reasons})", hint=hint)


def _skipped_json(scan: PairScan) -> list[dict[str, Any]]:
    return [
        {"linear": s.linear, "bn": s.bn, "code": s.code, "reason": s.reason} for s in scan.skipped
    ]


def _pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but torch sees no CUDA device",
            hint="use --device cpu or --device auto",
        )
    return torch.device(name)


# ---------------------------------------------------------------------------- prepare


def prepare(
    model_cfg: ModelConfig,
    data: Path,
    out: Path,
    *,
    train: TrainConfig | None = None,
    quant: QuantConfig | None = None,
    target_column: str | None = None,
    force: bool = False,
    allow_no_pairs: bool = False,
    strict: bool = False,
    exclude: Sequence[str] = (),
    sensitivity: bool | None = None,
    fold_bn_before_linear: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    replica: Replica | None = None,
) -> PrepareReport:
    """Float checkpoint -> QAT checkpoint (LinearBn1d per pair, calibrated or fine-tuned).

    Long only for its 14 options and their Args; the body is its steps (load -> pairs -> train
    and measure -> write).

    Args:
        model_cfg: model spec/args and float checkpoint.
        data: calibration / training data file.
        out: the QAT `.safetensors` to write.
        train: mode, steps, loss, freeze schedule, seed, device.
        quant: backend, weight bits and activations (``int8``: static W8A8).
        target_column: CSV target column.
        force: replace an existing ``out``.
        allow_no_pairs: write ``out`` even when nothing can fold.
        strict: skip pairs whose feature axis cannot be proven.
        exclude: globs on the Linear paths of pairs to keep out of quantization (not swapped;
            `fold` folds their BN in float).
        sensitivity: measure the per-pair SQNR table (two calibrations per pair); None: only
            when the model has at most `sensitivity.SENSITIVITY_AUTO_PAIRS` pairs.
        fold_bn_before_linear: fold each BatchNorm1d that feeds only a Linear into that
            Linear's input side before the QAT swap (recorded as ``bn_before_linear``).
        on_step: fine-tune progress callback.
        on_note: called with each sentence about what was done.
        replica: this rank of a distributed run (`qatconv.distributed.session`): the
            fine-tune splits each global batch across ranks, the metrics pass splits the data,
            rank 0 alone writes ``out`` once every rank has finished.

    Returns:
        PrepareReport. Raises a `QatconvError` subclass on bad input.
    """

    from qatconv import checkpoint

    train = train or TrainConfig()
    quant = quant or QuantConfig()
    note = on_note or (lambda s: log.info(s))
    started = time.perf_counter()
    inputs_paths = [p for p in (model_cfg.weights, data) if p is not None]
    writer = replica is None or replica.launch.is_main
    if writer:
        checkpoint.check_output_path(out, force=force, inputs=inputs_paths,
                                     suffixes=(".safetensors",))
    src = _load_for_prepare(model_cfg, data, target_column, note)
    plan = _plan_pairs(src, model_cfg, train, strict=strict, allow_no_pairs=allow_no_pairs,
                       exclude=exclude, fold_bn_before_linear=fold_bn_before_linear, note=note)
    qat_model, metrics, table = _train_and_measure(
        src, plan, train, quant, on_step=on_step, replica=replica,
        sensitivity=sensitivity if writer else False, note=note,
    )
    meta = _qat_metadata(src.loaded, plan.records, plan.scan, train, quant, src.dataset.sha256,
                         src.orig_dtype, metrics, plan.excluded, exclude)  # fmt: skip
    _write_prepared(qat_model, src.orig_dtype, meta, plan.before, out, replica=replica,
                    writer=writer, force=force, inputs_paths=inputs_paths)
    return PrepareReport(
        output=out,
        pairs=[r.to_json() for r in plan.records],
        skipped=meta["skipped"],
        notes=src.loaded.notes,
        metrics=metrics,
        seconds=time.perf_counter() - started,
        metadata=meta,
        warnings=src.warnings,
        sensitivity=[t.to_json() for t in table],
    )


@dataclass
class _PrepareSource:
    """prepare's inputs once loaded: the float32 model, its data and what was said about them."""

    loaded: LoadedModel
    dataset: Dataset
    model: nn.Module
    orig_dtype: torch.dtype
    inputs: torch.Tensor
    warnings: list[str]


def _load_for_prepare(
    model_cfg: ModelConfig, data: Path, target_column: str | None, note: Callable[[str], None]
) -> _PrepareSource:
    """Load the float model and the data, and check that the data fits the model."""
    from qatconv import data as data_mod

    _refuse_qatconv_output(model_cfg.weights)
    loaded = load_model(model_cfg, keep_tensors=False)
    for n in loaded.notes:
        note(n)
    warnings_: list[str] = []
    if model_cfg.weights is None and not loaded.tensors:
        warnings_.append(
            "no --weights: the model keeps the initialization its constructor gave it"
        )
    dataset = data_mod.load_data(data, target_column=target_column)
    model, orig_dtype = _as_float32(loaded, note)
    loaded.tensors.clear()  # loaded into the model: a second copy of the checkpoint is not needed
    inputs = dataset.inputs.float()
    ignored = _check_data_fits(model, inputs, data)
    if ignored:
        note(ignored)
        loaded.notes.append(ignored)
    return _PrepareSource(loaded=loaded, dataset=dataset, model=model, orig_dtype=orig_dtype,
                          inputs=inputs, warnings=warnings_)


@dataclass
class _PairPlan:
    """Which pairs prepare swaps (records), keeps float (excluded) and folded beforehand."""

    scan: PairScan
    all_records: list[PairRecord]
    records: list[PairRecord]
    excluded: list[PairRecord]
    before: list[dict[str, Any]]


def _plan_pairs(
    src: _PrepareSource,
    model_cfg: ModelConfig,
    train: TrainConfig,
    *,
    strict: bool,
    allow_no_pairs: bool,
    exclude: Sequence[str],
    fold_bn_before_linear: bool,
    note: Callable[[str], None],
) -> _PairPlan:
    """Find the pairs, fold BN-before-Linear when asked, split off excluded pairs, check state."""
    from qatconv import sensitivity as sens
    from qatconv import validate

    scan = scan_pairs(src.model, _sample(src.inputs), strict=strict)
    _note_finder(scan, src.loaded, note)
    before_ok = [c for c in scan.bn_before_linear if c.verified or not strict]
    _require_pairs(scan, allow_no_pairs or (fold_bn_before_linear and bool(before_ok)))
    all_records = [p.to_record() for p in scan.pairs]
    before: list[dict[str, Any]] = []
    if fold_bn_before_linear:
        all_records, before = _fold_bn_before_model_(src.model, all_records, before_ok)
    records, excluded = sens.split_excluded(all_records, exclude)
    validate.check_model_state(src.model, all_records, model_cfg.weights or model_cfg.spec,
                               stats_recomputed=train.recalibrate_bn)
    return _PairPlan(scan=scan, all_records=all_records, records=records, excluded=excluded,
                     before=before)


def _train_and_measure(
    src: _PrepareSource,
    plan: _PairPlan,
    train: TrainConfig,
    quant: QuantConfig,
    *,
    on_step: Callable[[StepInfo], None] | None,
    replica: Replica | None,
    sensitivity: bool | None,
    note: Callable[[str], None],
) -> tuple[nn.Module, dict[str, Any], list[Any]]:
    """Swap and calibrate / fine-tune the pairs, then measure the per-pair sensitivity table."""
    from qatconv import sensitivity as sens

    qat_model, metrics = _train_qat(
        src.model, plan.records, src.inputs, src.dataset.targets, train, quant, on_step,
        src.warnings, replica,
        weight_storage_dtype=_weight_storage_dtype(quant.activation_scheme is not None,
                                                   src.orig_dtype),
    )
    # After training, so the seeded run (and its file) does not depend on the table.
    table = sens.sensitivity_table(src.model, plan.all_records, quant, src.inputs,
                                   batch_size=train.batch_size, requested=sensitivity,
                                   note=note)
    return qat_model, metrics, table


def _write_prepared(
    qat_model: nn.Module,
    orig_dtype: torch.dtype,
    meta: dict[str, Any],
    before: list[dict[str, Any]],
    out: Path,
    *,
    replica: Replica | None,
    writer: bool,
    force: bool,
    inputs_paths: list[Path],
) -> None:
    """Finish the metadata and, on the writing rank once every rank has trained, write ``out``."""
    from qatconv import checkpoint

    if before:
        meta["bn_before_linear"] = before
    if replica is not None:
        meta["distributed"] = replica.to_json()
        replica.barrier()  # every rank trained without error: now rank 0 writes
    if writer:
        checkpoint.write_safetensors(
            _qat_state(qat_model, orig_dtype), out,
            header_entries(meta), force=force, inputs=inputs_paths,
        )


def _refuse_qatconv_output(weights: Path | None) -> None:
    """prepare starts from a float checkpoint, never from one qatconv wrote."""
    from qatconv import checkpoint

    if weights is None or not _is_safetensors(weights):
        return
    stage = checkpoint.read_metadata(weights).get("stage")
    if stage in ("qat", "folded"):
        raise BadInputError(
            f"{weights} is already a {stage} checkpoint written by qatconv",
            hint="fold it: qatconv fold QAT.safetensors -o OUT.safetensors"
            if stage == "qat" else "prepare starts from the float checkpoint",
        )


def _as_float32(
    loaded: LoadedModel, note: Callable[[str], None]
) -> tuple[nn.Module, torch.dtype]:
    """The model in float32 (torch's fake quant needs it) and the checkpoint's own dtype."""
    import torch

    model = loaded.model
    # The checkpoint's own dtype (loading casts into the model's float32 parameters).
    if loaded.source_dtypes is not None:
        dtypes = set(loaded.source_dtypes)
    else:
        source = loaded.tensors.values() if loaded.tensors else model.parameters()
        dtypes = {t.dtype for t in source if t.is_floating_point()}
    orig_dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    if orig_dtype != torch.float32:
        note(f"the model is {orig_dtype}; QAT runs in float32 (torch's fake quant needs it)")
        model = model.float()
    return model, orig_dtype


def _train_qat(
    model: nn.Module,
    records: list[PairRecord],
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    train: TrainConfig,
    quant: QuantConfig,
    on_step: Callable[[StepInfo], None] | None,
    warnings_: list[str],
    replica: Replica | None = None,
    *,
    weight_storage_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Swap the pairs for LinearBn1d, calibrate or fine-tune; the QAT model and its metrics."""
    import torch

    from qatconv import qat

    device = _pick_device(train.device.value) if replica is None else replica.device
    torch.manual_seed(train.seed)
    float_model = model.to(device)
    # Hold one copy of what need not be two: the pairs' tensors are swapped out of the copy at
    # once, and a calibration changes no parameter (the 1 GiB model: 4.7x -> ~2x the file).
    calibrate = train.mode is Mode.calibrate
    share = ([*float_model.parameters(), *float_model.buffers()] if calibrate
             else qat.pair_tensors(float_model, records))
    qat_model = qat.deepcopy_model(float_model, share=share)
    qat.swap_pairs_(qat_model, records, qat.make_qconfig(quant), quant.activation_scheme,
                    share_weights=calibrate, weight_storage_dtype=weight_storage_dtype)
    qat_model.to(device)
    if replica is not None:
        replica.synchronize_statistics_([m for _, m in qat.qat_modules(qat_model)])
    inputs = inputs.to(device)
    targets = targets.to(device) if targets is not None else None
    result = None
    if train.mode is Mode.calibrate:
        qat.calibrate_(
            qat_model, inputs, batch_size=train.batch_size, recalibrate_bn=train.recalibrate_bn
        )
    else:
        if train.recalibrate_bn:
            qat.calibrate_(qat_model, inputs, batch_size=train.batch_size, recalibrate_bn=True)
        result = qat.finetune_(qat_model, float_model, inputs, targets, train, on_step=on_step,
                               replica=replica)
    if replica is None:
        metrics: dict[str, Any] = qat.simulated_metrics(qat_model, float_model, inputs)
    else:
        lo, hi = replica.row_range(len(inputs))
        metrics = qat.simulated_metrics(qat_model, float_model, inputs.narrow(0, lo, hi - lo),
                                        reduce_sums=replica.sum_)
    if result is not None:
        _add_loss_metrics(metrics, result, warnings_)
    return qat_model, metrics


def _add_loss_metrics(metrics: dict[str, Any], result: Any, warnings_: list[str]) -> None:
    """The fine-tune's loss curve summary; a warning when the run diverged."""
    k = max(1, len(result.losses) // 10)
    metrics.update(
        loss_first=result.losses[0],
        loss_last=result.losses[-1],
        loss_first10pct_mean=sum(result.losses[:k]) / k,
        loss_last10pct_mean=sum(result.losses[-k:]) / k,
        bn_frozen_at=result.bn_frozen_at,
        observers_frozen_at=result.observers_frozen_at,
    )
    # 100x: BN-statistics noise alone can lift a near-zero distillation loss a few-fold.
    if metrics["loss_last10pct_mean"] > 100 * metrics["loss_first"]:
        warnings_.append(
            f"the fine-tune loss grew from {metrics['loss_first']:.3g} (step 1) to "
            f"{metrics['loss_last10pct_mean']:.3g} (last 10% of steps): the run diverged; "
            "lower --lr"
        )


def _qat_state(qat_model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The QAT state dict to save: back in the checkpoint's dtype (fake-quant state stays
    float32), on the CPU, contiguous."""

    def fake_quant_state(k: str) -> bool:
        return ".weight_fake_quant." in k or ".input_fake_quant." in k

    return {
        k: (v.to(dtype) if v.is_floating_point() and not fake_quant_state(k) else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in qat_model.state_dict().items()
    }


def _qat_metadata(
    loaded: LoadedModel,
    records: list[PairRecord],
    scan: PairScan,
    train: TrainConfig,
    quant: QuantConfig,
    data_sha256: str,
    dtype: torch.dtype,
    metrics: dict[str, Any],
    excluded: list[PairRecord],
    exclude: Sequence[str],
) -> dict[str, Any]:
    """The ``qatconv`` metadata of a QAT checkpoint (what README.md says `prepare` records).

    Static W8A8 adds ``activations`` and ``weight_scheme`` (`QuantScheme.to_json`); pairs kept
    out by ``--exclude`` are listed whole under ``excluded`` and as ``excluded`` skips. A
    weight-only run without ``--exclude`` writes exactly the keys it always wrote.
    """
    import torch

    from qatconv import sensitivity as sens

    finetune = train.mode is Mode.finetune
    qmin, qmax = quant.quant_range
    extra: dict[str, Any] = {}
    scheme = quant.activation_scheme
    if scheme is not None:
        extra["activations"] = {**scheme.to_json(), "observer": _INPUT_OBSERVER}
        extra["weight_scheme"] = quant.weight_scheme.to_json()
    if excluded:
        extra["excluded"] = [r.to_json() for r in excluded]
    return {
        **extra,
        "format_version": FORMAT_VERSION,
        "stage": "qat",
        "model": _model_meta(loaded),
        "pairs": [r.to_json() for r in records],
        "skipped": _skipped_json(scan) + sens.excluded_skips(excluded, exclude),
        "pair_finder": scan.finder_json(),
        "backend": quant.backend.value,
        "weight_bits": quant.weight_bits,
        "quant_min": qmin,
        "quant_max": qmax,
        "scheme": "per_channel_symmetric",
        "mode": train.mode.value,
        "steps": train.steps if finetune else 0,
        "loss": train.loss.value if finetune else None,
        "batch_size": train.batch_size,
        "lr": train.lr if finetune else None,
        "optimizer": train.optimizer.value if finetune else None,
        "freeze_bn_after": train.bn_freeze_step if finetune else None,
        "freeze_observers_after": train.observer_freeze_step if finetune else None,
        "recalibrate_bn": train.recalibrate_bn,
        "seed": train.seed,
        "data_sha256": data_sha256,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "qatconv_version": __version__,
        "metrics": metrics,
    }


# What the input observers record (static W8A8), in the metadata's words.
_INPUT_OBSERVER = (
    "exact min/max over the data (calibrate and the start of a fine-tune), then a moving "
    "average of each batch's min/max (constant 0.01) until --freeze-observers-after"
)


# ---------------------------------------------------------------------------- fold


def build_qat_model(meta: dict[str, Any], model_cfg: ModelConfig | None) -> nn.Module:
    """The QAT model described by a QAT checkpoint's metadata (tensors not loaded)."""
    from qatconv import qat, validate
    from qatconv.config import Backend

    cfg = _model_cfg_from_meta(meta, model_cfg)
    model = load_model(cfg).model.float()
    # BN -> Linear folds were done before the QAT swap.
    _drop_bns_(model, _bn_linear_paths(meta.get("bn_before_linear") or []))
    records = validate.qat_records(meta, cfg.spec)
    validate.check_pairs_fit_model(model, records, cfg.spec)
    quant = QuantConfig(Backend(meta.get("backend", "x86")), int(meta.get("weight_bits", 8)))
    # The recorded scheme, not today's table: the checkpoint's range is what it was trained with.
    acts = meta.get("activations")
    scheme = QuantScheme.from_json(acts) if acts is not None else None
    qat.swap_pairs_(model, records, qat.make_qconfig(quant), scheme,
                    weight_storage_dtype=_weight_storage_dtype(scheme is not None,
                                                               meta.get("dtype")))
    return model


def _weight_storage_dtype(w8a8: bool, dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The 16-bit dtype a static-W8A8 model's folded weights are stored in, which its QAT
    simulation rounds through (`QatLinearBn1d.weight_storage_dtype`); None otherwise, so
    weight-only runs stay exactly as they were."""
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if w8a8 and dtype in (torch.float16, torch.bfloat16) else None


def _model_meta(loaded: LoadedModel) -> dict[str, Any]:
    """The model spec relative to the working directory (and absolute), and its arguments."""
    from qatconv import modelspec

    return {**modelspec.record_spec(loaded.spec), "args": loaded.args}


def _model_cfg_from_meta(
    meta: dict[str, Any], model_cfg: ModelConfig | None, note: Callable[[str], None] | None = None
) -> ModelConfig:
    from qatconv import modelspec

    if model_cfg is not None and model_cfg.spec is not None:
        return ModelConfig(spec=model_cfg.spec, args=model_cfg.args)
    model_meta = meta.get("model") or {}
    if not model_meta.get("spec"):
        raise UsageError(
            "this check needs the model code, and the checkpoint names no model spec",
            hint="pass --model path/to/file.py:NAME",
        )
    # Its metadata is not the user's word: the spec is vetted before anything is called.
    spec, how = modelspec.spec_from_record(model_meta, "the checkpoint")
    if note is not None:
        note(f"using {how}")
    return ModelConfig(spec=spec, args=model_meta.get("args") or {})


# A fold writes safetensors, or an index with its shards (--max-shard-size).
_FOLD_SUFFIXES = (".safetensors", ".index.json")


def fold(
    out: Path,
    *,
    qat_checkpoint: Path | None = None,
    model_cfg: ModelConfig | None = None,
    check: Path | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    emit_qparams: bool = False,
    max_shard_size: int | None = None,
    force: bool = False,
    allow_no_pairs: bool = False,
    strict: bool = False,
    target_column: str | None = None,
    fold_bn_before_linear: bool = False,
    on_pair: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> FoldResult:
    """Fold a QAT checkpoint (model-free), or a float checkpoint with its model (plain fold).

    Long for its options and their Args; the body is its steps (plan -> write, checked -> report).

    Args:
        out: output `.safetensors` (or index path when sharding).
        qat_checkpoint: a checkpoint written by `prepare`.
        model_cfg: for the plain fold (spec + weights), or the spec for ``check``.
        check: data to verify the folded model against the reference on. The output is
            written to a staging folder and moved into place only when the check passes.
        atol, rtol: the check passes when ``|a - b| <= atol + rtol * |b|`` everywhere;
            ``None`` picks them from the checkpoint dtype (`CHECK_TOLERANCE`).
        emit_qparams: write ``<linear>.weight_scale`` / ``weight_zero_point`` tensors.
        max_shard_size: bytes per output shard.
        fold_bn_before_linear: plain fold only: also fold each BatchNorm1d that feeds a Linear
            directly into that Linear's input side (W' = W diag(s), b' = b + W (beta - mean s)).

    Raises:
        CheckFailedError: the check ran and the folded model is beyond tolerance (exit 4);
            nothing is written then.
    """
    from qatconv import folding as fold_mod

    _check_fold_flags(check, atol, rtol, target_column)
    started = time.perf_counter()
    note = on_note or (lambda s: log.info(s))
    if qat_checkpoint is not None:
        plan = _plan_qat_fold(
            qat_checkpoint, out, model_cfg, check, force=force, allow_no_pairs=allow_no_pairs,
            emit_qparams=emit_qparams, fold_bn_before_linear=fold_bn_before_linear,
        )
    else:
        plan = _plan_float_fold(
            out, model_cfg, check, force=force, allow_no_pairs=allow_no_pairs,
            emit_qparams=emit_qparams, strict=strict, target_column=target_column,
            fold_bn_before_linear=fold_bn_before_linear, note=note,
        )
    meta_out = _folded_meta(plan.records, plan.skipped, plan.stage_from, plan.model_meta,
                            plan.extra)  # fmt: skip
    old_shards = _shards_of_existing_index(out) if max_shard_size and force else []

    def write(target: Path) -> Any:
        return _fold_stream_or_memory(
            fold_mod, plan.source, plan.state, target, plan.fpairs, emit_qparams,
            max_shard_size, force, on_pair, meta_out,
        )

    def run_check(target: Path, data: Path) -> CheckResult:
        return verify(
            target, plan.stage_from, model_cfg, data, atol=atol, rtol=rtol,
            qat_checkpoint=qat_checkpoint, model_meta=plan.model_meta,
            target_column=target_column, on_note=note,
        )

    report, files, check_result = _write_checked(out, write, run_check, check)
    index = [f for f in files if f.name.endswith(".index.json")]
    _remove_stale_shards(old_shards, files)
    return FoldResult(
        output=index[0] if index else out,
        files=files,
        pairs=[r.to_json() for r in plan.records],
        skipped=plan.skipped,
        removed=list(report.removed),
        notes=plan.notes,
        source_stage=plan.stage_from,
        check=check_result,
        seconds=time.perf_counter() - started,
        metadata={"qparams": report.qparams, "unverified": plan.unverified,
                  "bn_before_linear": plan.extra.get("bn_before_linear", [])},
    )


def _check_fold_flags(
    check: Path | None, atol: float | None, rtol: float | None, target_column: str | None
) -> None:
    if check is None and (atol is not None or rtol is not None or target_column is not None):
        raise UsageError(
            "--atol, --rtol and --target-column only apply to --check",
            hint="add --check DATA to verify the folded model",
        )
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not value >= 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")


def _write_checked(
    out: Path,
    write: Callable[[Path], Any],
    run_check: Callable[[Path, Path], CheckResult],
    check: Path | None,
) -> tuple[Any, list[Path], CheckResult | None]:
    """Write the fold; with ``check``, into a staging folder beside ``out``, moved into place
    only when the check passes: a failed command leaves no output (and no replaced one).

    Returns the fold report, the files written (at their final paths) and the check result.
    """
    import shutil

    staging = out.parent / f".{out.name}.staging-{os.getpid()}" if check else None
    target = staging / out.name if staging else out
    if staging:
        staging.mkdir()
    try:
        report = write(target)
        files = list(report.files)
        check_result = None
        if check is not None:
            check_result = run_check(target, check)
            if not check_result.passed:
                raise CheckFailedError(
                    f"folded model differs from the {check_result.reference} reference: "
                    f"{check_result.failure}; nothing was written",
                    hint="run `qatconv inspect CKPT --model SPEC --data DATA` to see the pairs",
                )
            integer = check_result.integer
            if integer is not None and not integer.passed:
                raise CheckFailedError(
                    f"the integer emulation of the folded W8A8 model differs from the QAT "
                    f"model (fake quant on): max abs error {integer.max_abs_error:.3g} > "
                    f"{integer.tolerance:g} x output range {integer.output_range:.3g}; "
                    "nothing was written",
                    hint="the --json check.integer object has the details; re-run prepare",
                )
            files = [out.parent / f.name for f in report.files]
            for f in report.files:
                os.replace(f, out.parent / f.name)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return report, files, check_result


@dataclass
class _FoldPlan:
    """The pairs a fold will fold, where the tensors come from, and its metadata extras."""

    records: list[PairRecord]
    skipped: list[dict[str, Any]]
    fpairs: list[Any]  # folding.FoldPair
    source: Path
    stage_from: str  # "qat" or "float"
    model_meta: dict[str, Any]
    extra: dict[str, Any]
    state: dict[str, torch.Tensor] | None = None  # tensors to fold when not streamed from source
    notes: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)


def _plan_qat_fold(
    qat_checkpoint: Path,
    out: Path,
    model_cfg: ModelConfig | None,
    check: Path | None,
    *,
    force: bool,
    allow_no_pairs: bool,
    emit_qparams: bool,
    fold_bn_before_linear: bool,
) -> _FoldPlan:
    """What a model-free fold of a QAT checkpoint will do (pairs from its metadata)."""
    from qatconv import checkpoint, validate
    from qatconv import folding as fold_mod

    if model_cfg is not None and model_cfg.weights is not None:
        raise UsageError("give either a QAT checkpoint or --weights, not both")
    if fold_bn_before_linear:
        raise UsageError(
            "--fold-bn-before-linear is for the plain fold of a float checkpoint",
            hint="qatconv fold --model SPEC --weights FLOAT_CKPT --fold-bn-before-linear",
        )
    meta = checkpoint.read_metadata(qat_checkpoint)
    if meta.get("stage") != "qat":
        raise BadInputError(
            f"{qat_checkpoint} is not a QAT checkpoint written by `qatconv prepare` "
            f"(stage: {meta.get('stage', 'none')})",
            hint="for a float checkpoint use: qatconv fold --model SPEC --weights CKPT -o OUT",
        )
    checkpoint.check_output_path(
        out, force=force, inputs=[qat_checkpoint] + ([check] if check else []),
        suffixes=_FOLD_SUFFIXES,
    )
    records = validate.qat_records(meta, qat_checkpoint)
    # Pair weights are checked by the fold itself as it streams them (one read, not two).
    validate.check_qat_tensors(
        qat_checkpoint, records, skip=frozenset(f"{r.qat}.weight" for r in records)
    )
    skipped = list(meta.get("skipped") or [])
    if not records and not allow_no_pairs:
        raise NoPairsError(f"{qat_checkpoint} lists no pairs to fold")
    act = QuantScheme.from_json(meta["activations"]) if meta.get("activations") else None
    excluded = validate.qat_records({"pairs": meta.get("excluded") or []}, qat_checkpoint)
    qrange = (meta.get("quant_min"), meta.get("quant_max"))
    fpairs = [
        fold_mod.FoldPair.from_qat_record(
            r, quant_range=qrange if None not in qrange else None,  # type: ignore[arg-type]
            w8a8=act is not None,
        )
        for r in records
    ] + [replace(fold_mod.FoldPair.from_float_record(r), excluded=True) for r in excluded]
    source, stage_from, model_meta = qat_checkpoint, "qat", meta.get("model") or {}
    extra = {k: meta.get(k) for k in ("backend", "weight_bits", "quant_min", "quant_max",
                                       "scheme")}
    extra["qparams"] = _qparams_meta(qat_checkpoint, meta, records, emit_qparams, act)
    extra.update(_scheme_meta(meta, records, excluded, act))
    # Excluded pairs are folded too (in float, no qparams): the folded file lists every pair.
    if meta.get("bn_before_linear"):  # folded by prepare: the folded model drops those BNs too
        extra["bn_before_linear"] = meta["bn_before_linear"]
    return _FoldPlan(records + excluded, skipped, fpairs, source, stage_from, model_meta, extra)


def _scheme_meta(
    meta: dict[str, Any],
    records: list[PairRecord],
    excluded: list[PairRecord],
    act: QuantScheme | None,
) -> dict[str, Any]:
    """Folded-metadata keys of a static W8A8 / mixed-precision QAT checkpoint (none for a
    weight-only one without exclusions: its folded metadata stays as it was)."""
    from qatconv.config import compressed_tensors_config

    extra: dict[str, Any] = {}
    if excluded:
        extra["excluded"] = [r.linear for r in excluded]
    if act is None:
        return extra
    weight = QuantScheme.from_json(meta.get("weight_scheme"))
    extra["activations"] = meta["activations"]
    extra["weight_scheme"] = meta["weight_scheme"]
    extra["quantization_config"] = compressed_tensors_config(
        weight, act, [r.linear for r in records], [r.linear for r in excluded])
    return extra


def _qparams_meta(
    qat_checkpoint: Path,
    meta: dict[str, Any],
    records: list[PairRecord],
    emit: bool,
    act: QuantScheme | None,
) -> dict[str, dict[str, Any]]:
    """Per pair: how its folded weight is quantized, with the trained per-channel scales
    (exact float32 values; `--emit-qparams` also writes them as tensors), and for static W8A8
    its input's ``InputQParams`` under ``input``."""
    wanted = [f"{r.qat}.{fq}.{t}" for r in records
              for fq in ("weight_fake_quant", "input_fake_quant") for t in ("scale", "zero_point")]
    values = _qat_small_tensors(qat_checkpoint, wanted)
    out = {}
    for r in records:
        q = r.qat
        entry: dict[str, Any] = {
            "scheme": meta.get("scheme", "per_channel_symmetric"),
            "axis": 0,
            "weight_bits": meta.get("weight_bits"),
            "quant_min": meta.get("quant_min"),
            "quant_max": meta.get("quant_max"),
            "scale_tensor": f"{r.linear}.weight_scale" if emit else None,
            "scale": values.get(f"{q}.weight_fake_quant.scale"),
        }
        if act is not None:
            entry["input"] = _input_qparams(qat_checkpoint, r, values, act).to_json()
        out[r.linear] = entry
    return out


def _input_qparams(
    path: Path, record: PairRecord, values: dict[str, list[float | int]], act: QuantScheme
) -> InputQParams:
    q = record.qat
    scale = values.get(f"{q}.input_fake_quant.scale")
    zp = values.get(f"{q}.input_fake_quant.zero_point")
    if not scale or not zp or len(scale) != 1 or len(zp) != 1:
        raise CheckpointError(
            f"{path}: pair {record.linear!r} has no input fake-quant scale / zero point "
            "(float32 / int32, one value each), yet the metadata says static W8A8",
            hint="re-run `qatconv prepare`",
        )
    try:
        return InputQParams(float(scale[0]), int(zp[0]), act.quant_min, act.quant_max, act.dtype)
    except ValueError as e:
        raise CheckpointError(f"{path}: pair {record.linear!r}: {e}") from None


def _plan_float_fold(
    out: Path,
    model_cfg: ModelConfig | None,
    check: Path | None,
    *,
    force: bool,
    allow_no_pairs: bool,
    emit_qparams: bool,
    strict: bool,
    target_column: str | None,
    fold_bn_before_linear: bool,
    note: Callable[[str], None],
) -> _FoldPlan:
    """What a plain BN fold of a float checkpoint will do (pairs from the pair finder)."""
    from qatconv import checkpoint, validate
    from qatconv import folding as fold_mod

    if model_cfg is None or model_cfg.weights is None:
        raise UsageError(
            "fold needs a QAT checkpoint, or --model and --weights for a plain BN fold",
            hint="qatconv fold QAT.safetensors -o OUT.safetensors",
        )
    if emit_qparams:
        raise UsageError(
            "--emit-qparams needs a QAT checkpoint (a plain fold has no quant params)",
            hint="run `qatconv prepare` first",
        )
    checkpoint.check_output_path(
        out, force=force, inputs=[model_cfg.weights] + ([check] if check else []),
        suffixes=_FOLD_SUFFIXES,
    )
    found = None if fold_bn_before_linear else _pairs_on_meta(model_cfg, check, target_column,
                                                              strict=strict)
    streamed = found is not None
    if found is None:
        found = _pairs_on_loaded(model_cfg, check, target_column, strict=strict)
    loaded, scan = found
    for n in loaded.notes:
        note(n)
    _note_finder(scan, loaded, note)
    before_ok = [c for c in scan.bn_before_linear if c.verified or not strict]
    _require_pairs(scan, allow_no_pairs or (fold_bn_before_linear and bool(before_ok)))
    records = [p.to_record() for p in scan.pairs]
    if streamed:  # the values are read from the file, a block at a time
        validate.check_file_tensors(
            model_cfg.weights, _running_vars(loaded.model, records),
            skip=frozenset(f"{r.linear}.weight" for r in records),
        )
    else:
        validate.check_model_state(loaded.model, records, model_cfg.weights)
    skipped = _skipped_json(scan)
    unverified = [p.linear for p in scan.unverified]
    state = None if streamed else loaded.tensors
    extra: dict[str, Any] = {"unverified": unverified, "pair_finder": scan.finder_json()}
    if fold_bn_before_linear:
        unverified += [c.linear for c in scan.bn_before_linear if not c.verified and not strict]
        state, records, extra["bn_before_linear"] = _fold_bn_before(
            loaded.model, state, records, before_ok
        )
    fpairs = [fold_mod.FoldPair.from_float_record(r) for r in records]
    source, stage_from = model_cfg.weights, "float"
    model_meta = _model_meta(loaded)
    return _FoldPlan(records, skipped, fpairs, source, stage_from, model_meta, extra, state,
                     loaded.notes, unverified)


def _pairs_on_loaded(
    cfg: ModelConfig, check: Path | None, target_column: str | None, *, strict: bool
) -> tuple[LoadedModel, PairScan]:
    """The pairs of the model with its checkpoint loaded (all of it, in memory)."""
    assert cfg.weights is not None
    loaded = load_model(cfg)
    if not _is_safetensors(cfg.weights):
        loaded.notes.append(f"loaded {cfg.weights.name} whole: only safetensors checkpoints are "
                            "folded without holding them in memory")
    sample = _sample_from_data(loaded.model, check, target_column)
    return loaded, scan_pairs(loaded.model, sample, strict=strict)


def _pairs_on_meta(
    cfg: ModelConfig, check: Path | None, target_column: str | None, *, strict: bool
) -> tuple[LoadedModel, PairScan] | None:
    """The pairs of a safetensors checkpoint's model built on the meta device (shapes only, no
    weight memory), checked against the file's header; the sample runs on meta too.

    None when that does not work (a pickle, keys that need renaming, a model whose code needs
    real values): the caller then loads the checkpoint. Errors are left to that path to report.
    """
    from qatconv import checkpoint, modelspec
    from qatconv.st_checkpoint import open_checkpoint

    assert cfg.weights is not None
    if cfg.spec is None or not _is_safetensors(cfg.weights):
        return None
    with open_checkpoint(cfg.weights) as ckpt:
        shapes = {name: shape for name, (_, shape) in ckpt.infos().items()}
        notes = list(ckpt.notes)
        if ckpt.index is not None:  # as loading it says
            notes.insert(0, f"read {len(ckpt.headers)} shard(s) listed in {ckpt.index.name}")
    try:
        model = modelspec.build_model(cfg.spec, dict(cfg.args), device="meta")
        expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    except Exception as e:  # noqa: BLE001 - anything: the loading path runs (and reports) it
        log.info("building the model on the meta device failed (%s)", e)
        return None
    if set(expected) != set(shapes):
        return None  # renamed keys or missing num_batches_tracked: the loading path aligns
    checkpoint.check_keys_fit(expected, shapes, str(cfg.weights))
    try:
        sample = _sample_from_data(model, check, target_column, device="meta")
        scan = scan_pairs(model, sample, strict=strict)
    except Exception as e:  # noqa: BLE001 - e.g. code that reads values: load and run for real
        log.info("pair search on the meta device failed (%s); loading the checkpoint", e)
        return None
    return LoadedModel(model, notes, cfg.spec, args=dict(cfg.args)), scan


def _running_vars(model: nn.Module, records: Sequence[PairRecord]) -> dict[str, Any]:
    """Every BatchNorm's ``running_var`` key -> (eps, folded by one of ``records``)."""
    from torch import nn

    paired = {r.bn for r in records}
    return {f"{path}.running_var": (float(m.eps), path in paired)
            for path, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None}


def _fold_bn_before(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    records: list[PairRecord],
    candidates: Sequence[Any],
) -> tuple[dict[str, torch.Tensor], list[PairRecord], list[dict[str, Any]]]:
    """Fold each BatchNorm1d -> Linear candidate into a copy of ``state``.

    Returns the new state, the pair records (the input-side fold may have given a Linear its
    bias: the output-side fold must read it rather than create another) and the fold records.
    """
    from qatconv import folding as fold_mod

    before = [
        {"bn": c.bn, "linear": c.linear, "eps": model.get_submodule(c.bn).eps,
         "bias": model.get_submodule(c.linear).bias is not None}
        for c in candidates
    ]
    state = dict(state)  # the fold replaces entries; the loaded dict stays as read
    fold_mod.fold_bn_before_linear_(state, before)
    records = [replace(r, bias=r.bias or f"{r.linear}.bias" in state) for r in records]
    return state, records, before


def _fold_bn_before_model_(
    model: nn.Module, records: list[PairRecord], candidates: Sequence[Any]
) -> tuple[list[PairRecord], list[dict[str, Any]]]:
    """Fold BatchNorm1d -> Linear candidates into the model itself (prepare, before the swap).

    Returns the pair records (biases updated) and the fold records.
    """
    state, records, before = _fold_bn_before(model, model.state_dict(), records, candidates)
    _drop_bns_(model, _bn_linear_paths(before))
    model.load_state_dict(state, strict=True)
    return records, before


def _shards_of_existing_index(out: Path) -> list[Path]:
    """Shards named by the index that a sharded `--force` fold is about to replace."""
    from qatconv.st_checkpoint import checkpoint_files

    index = out if out.name.endswith(".index.json") else out.parent / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        return checkpoint_files(index)[1:]
    except BadInputError:
        return []


def _remove_stale_shards(old: Sequence[Path], written: Sequence[Path]) -> None:
    keep = {Path(f).resolve() for f in written}
    for shard in old:
        if shard.resolve() not in keep:
            shard.unlink(missing_ok=True)


# The small fake-quant tensors `fold` copies into the metadata, by safetensors dtype.
_SMALL_DTYPES = {"F32": "<f4", "I32": "<i4", "I64": "<i8"}


def _qat_small_tensors(path: Path, names: Sequence[str]) -> dict[str, list[float | int]]:
    """The values of small F32/I32/I64 tensors (fake-quant scales and zero points) of a QAT
    checkpoint, read without torch; absent names (or other dtypes) are left out."""
    import numpy as np

    from qatconv.st_checkpoint import open_checkpoint

    out: dict[str, list[float | int]] = {}
    with open_checkpoint(path) as ckpt:
        for name in names:
            if name in ckpt.where and ckpt.info(name).dtype in _SMALL_DTYPES:
                dtype = _SMALL_DTYPES[ckpt.info(name).dtype]
                out[name] = np.frombuffer(ckpt.read(name), dtype=dtype).tolist()
    return out


def _check_tolerance(folded_path: Path) -> float:
    """The loosest default tolerance among the dtypes of the folded file's tensors."""
    return _loosest_tolerance(folded_path, CHECK_TOLERANCE, 1e-4)


def _loosest_tolerance(folded_path: Path, table: dict[str, float], default: float) -> float:
    """The loosest of ``table``'s tolerances among the dtypes of the folded file's tensors."""
    from qatconv.st_checkpoint import open_checkpoint

    with open_checkpoint(folded_path) as ckpt:
        dtypes = {dtype for dtype, _ in ckpt.infos().values()}
    return max((table[d] for d in dtypes if d in table), default=default)


# Default `fold --check` tolerances by the folded weights' dtype (atol = rtol): the folded
# weights are rounded once more than the reference's, so the error scales with the dtype's eps.
CHECK_TOLERANCE = {"F64": 1e-7, "F32": 1e-4, "F16": 1e-2, "BF16": 5e-2}


def _param_dtype(model: nn.Module) -> torch.dtype:
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _torch_version() -> str | None:
    """torch's version, without importing it when it is not loaded (a model-free fold)."""
    import sys
    from importlib import metadata

    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _folded_meta(
    records: Sequence[PairRecord],
    skipped: Sequence[dict[str, Any]],
    source: str,
    model_meta: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "stage": "folded",
        "source_stage": source,
        "model": model_meta,
        "pairs": [r.to_json() for r in records],
        "removed_bn": [r.bn for r in records]
        + [r["bn"] for r in extra.get("bn_before_linear", [])],
        "bias_added": sorted(
            {r.linear for r in records if not r.bias}
            | {r["linear"] for r in extra.get("bn_before_linear", []) if not r["bias"]}
        ),
        "skipped": list(skipped),
        "torch_version": _torch_version(),
        "qatconv_version": __version__,
        **extra,
    }


def _fold_stream_or_memory(
    fold_mod: Any,
    source: Path,
    state: dict[str, torch.Tensor] | None,
    out: Path,
    fpairs: list[Any],
    emit_qparams: bool,
    max_shard_size: int | None,
    force: bool,
    on_pair: Callable[[str], None] | None,
    meta: dict[str, Any],
) -> Any:
    """Stream from ``source`` when it is a safetensors file holding exactly the model's keys.

    Otherwise (a pickle, renamed keys) the loaded ``state`` is first written to a temporary
    safetensors file beside ``out``, so there is one fold path with one set of guarantees.
    """
    import os
    import tempfile

    from qatconv import checkpoint

    metadata = header_entries(meta)
    kwargs = {
        "metadata": metadata, "emit_qparams": emit_qparams, "max_shard_size": max_shard_size,
        "force": force, "on_pair": on_pair,
    }
    if state is None or _streamable(source, state):
        return fold_mod.fold_file(source, out, fpairs, **kwargs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".src.safetensors",
                                    dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        checkpoint.write_safetensors(state, tmp, {}, force=True)
        return fold_mod.fold_file(tmp, out, fpairs, **kwargs)
    finally:
        tmp.unlink(missing_ok=True)


def _streamable(source: Path, state: dict[str, torch.Tensor]) -> bool:
    """True when the file on disk is a safetensors file holding exactly the model's tensors."""
    from qatconv.st_checkpoint import open_checkpoint

    if not source.name.endswith((".safetensors", ".index.json")):
        return False
    with open_checkpoint(source) as ckpt:
        return set(ckpt.where) == set(state)


def verify(
    folded_path: Path,
    stage_from: str,
    model_cfg: ModelConfig | None,
    data: Path,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    qat_checkpoint: Path | None = None,
    model_meta: dict[str, Any] | None = None,
    target_column: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> CheckResult:
    """Run the reference and the folded model on ``data``; report the max errors."""
    import torch

    from qatconv import checkpoint, outputs, qat
    from qatconv import data as data_mod

    ds = data_mod.load_data(data, target_column=target_column)
    atol_given = atol is not None
    if atol is None or rtol is None:
        tol = _check_tolerance(folded_path)
        atol = tol if atol is None else atol
        rtol = tol if rtol is None else rtol
    if stage_from == "qat":
        assert qat_checkpoint is not None
        meta = {"model": model_meta or {}, **checkpoint.read_metadata(qat_checkpoint)}
        reference = load_qat(qat_checkpoint, model_cfg)
        qat.set_fake_quant_(reference, fake_quant=False, observer=False)
        spec_cfg = _model_cfg_from_meta(meta, model_cfg, on_note)
        ref_name = "qat"
    else:
        assert model_cfg is not None
        reference = load_model(model_cfg).model
        spec_cfg = None
        ref_name = "float"
    if spec_cfg is None:  # the float reference's own architecture (a pickled module too)
        from qatconv.modelcopy import copy_model

        folded_model = copy_model(reference)
    else:
        folded_model = load_model(spec_cfg).model
    load_folded(folded_model, folded_path)
    dtype = _param_dtype(folded_model)
    reference.to(dtype).eval()
    folded_model.eval()
    inputs = ds.inputs.to(dtype)
    _check_data_fits(reference, inputs, data)
    with torch.no_grad():
        ref_out = outputs.forward_outputs(reference, inputs)
        got_out = outputs.forward_outputs(folded_model, inputs)
    outputs.require_same_names(ref_out, got_out, f"the {ref_name} reference", "the folded model")
    if on_note is not None and ref_out.note():
        on_note(f"--check: {ref_out.note()}")
    ref, got = outputs.flat_cat(ref_out, torch.float64), outputs.flat_cat(got_out, torch.float64)
    noise = _noise_floor(reference, inputs, ref)
    scaled = not atol_given and noise is not None and NOISE_FACTOR * noise > atol
    if scaled:
        atol = NOISE_FACTOR * noise  # type: ignore[operator]
    why = f" = {NOISE_FACTOR:g} x the noise floor" if scaled else ""
    result = _compare(ref, got, atol, rtol, ref_name, len(inputs), noise, why)
    if stage_from == "qat" and _is_w8a8(folded_path):
        assert qat_checkpoint is not None
        integer = verify_integer(folded_path, qat_checkpoint, spec_cfg, ds.inputs)
        result = replace(result, integer=integer)
    return result


# The default atol is at least this many times the reference's own noise floor: the folded
# model rounds differently from the reference (other weights, fewer ops), and two float32 runs
# of one computation can each be a noise floor away from the exact result (measured: the exact
# fold of an ill-conditioned residual model lands within 2.6x of it).
NOISE_FACTOR = 4.0


def _noise_floor(reference: nn.Module, inputs: torch.Tensor, ref: torch.Tensor) -> float | None:
    """Max abs difference of the reference's outputs ``ref`` from its own float64 run."""
    import torch

    from qatconv import outputs

    dtype = inputs.dtype
    if dtype == torch.float64:
        return 0.0
    try:
        reference.double()
        with torch.no_grad():
            exact = outputs.flat_cat(outputs.forward_outputs(reference, inputs.double()),
                                     torch.float64)
    except Exception as e:  # noqa: BLE001 - a model that cannot run in float64: no floor
        log.info("the reference does not run in float64 (%s); no noise floor", e)
        return None
    finally:
        reference.to(dtype)
    if exact.shape != ref.shape:
        return None
    return float((ref - exact).abs().max()) if ref.numel() else 0.0


def _compare(
    ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float, ref_name: str,
    samples: int, noise: float | None, atol_why: str,
) -> CheckResult:
    """Pass when ``|got - ref| <= atol + rtol * |ref|`` everywhere and ``got`` is finite."""
    import torch

    diff = (got - ref).abs()
    scale = ref.abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / scale.clamp_min(1e-12)).max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(got).all())
    over = diff - (atol + rtol * scale)
    failure = None
    floor = f"; the reference's own float noise floor is {noise:.3g}" if noise is not None else ""
    if not finite:
        failure = "the folded model's outputs hold NaN/inf"
    elif over.numel() and float(over.max()) > 0:
        i = int(over.argmax())
        failure = (f"abs error {float(diff[i]):.3g} exceeds the allowed {atol:.3g} (atol"
                   f"{atol_why}) + {rtol:g} (rtol) x |reference| {float(scale[i]):.3g}"
                   f"{floor}; max abs error {max_abs:.3g}, max rel error {max_rel:.3g}")
    return CheckResult(max_abs, max_rel, atol, rtol, failure is None, ref_name, samples, noise,
                       failure)


def _is_w8a8(folded_path: Path) -> bool:
    from qatconv import checkpoint

    qparams = checkpoint.read_metadata(folded_path).get("qparams") or {}
    return any(isinstance(q, dict) and q.get("input") for q in qparams.values())


def verify_integer(
    folded_path: Path,
    qat_checkpoint: Path,
    model_cfg: ModelConfig | None,
    inputs: torch.Tensor,
    *,
    batch_size: int = 1024,
) -> IntegerCheck:
    """The folded W8A8 model run as integer arithmetic (`qatconv.emulate`, numpy) against the
    QAT model in eval with fake quant on, both in float32 on the CPU.

    Args:
        folded_path: the folded checkpoint (its ``qparams`` metadata and tensors).
        qat_checkpoint: the QAT checkpoint it was folded from.
        model_cfg: the model spec (the folded model runs everything but the quantized Linears).
        inputs: model inputs, first dimension = samples.
    """
    import torch

    from qatconv import checkpoint, emulate, outputs

    reference = load_qat(qat_checkpoint, model_cfg).float()
    folded = load_folded(load_model(model_cfg or ModelConfig()).model, folded_path).float().eval()
    quants = emulate.linear_quants(checkpoint.read_metadata(folded_path)["qparams"])
    tensors = checkpoint.load_checkpoint(folded_path).tensors
    x = inputs.float()
    names = tuple(quants)
    with (torch.no_grad(), emulate.captured_inputs(reference, names) as ref_in,
          emulate.emulated(folded, tensors, quants),
          emulate.captured_inputs(folded, names) as emu_in):
        ref_out = outputs.forward_outputs(reference, x, batch_size)
        emu_out = outputs.forward_outputs(folded, x, batch_size)
    outputs.require_same_names(ref_out, emu_out, "the QAT model", "the integer emulation")
    first = (ref_out.tensors[0].numpy(), emu_out.tensors[0].numpy()) if len(ref_out) else None
    return emulate.compare(
        outputs.flat_cat(ref_out, torch.float64).numpy(),
        outputs.flat_cat(emu_out, torch.float64).numpy(),
        tolerance=_loosest_tolerance(folded_path, emulate.INT_CHECK_TOLERANCE, 1e-3),
        step_error=emulate.step_error(ref_in, emu_in, quants),
        first=first, samples=len(x), linears=names,
    )


def load_qat(path: Path | str, model_cfg: ModelConfig | None = None) -> nn.Module:
    """The int8-simulated model of a QAT checkpoint: fake quant on, observers off, eval mode.

    Args:
        path: a checkpoint written by `prepare`.
        model_cfg: the model spec when the checkpoint's metadata does not name one.
    """
    from qatconv import checkpoint, qat

    path = Path(path)
    meta = checkpoint.read_metadata(path)
    if meta.get("stage") != "qat":
        raise BadInputError(f"{path} is not a QAT checkpoint (stage: {meta.get('stage', 'none')})")
    model = build_qat_model(meta, model_cfg)
    tensors = checkpoint.load_checkpoint(path).tensors
    qat.match_fake_quant_shapes_(model, tensors)
    checkpoint.load_into(model, tensors, source=str(path))
    qat.set_fake_quant_(model, fake_quant=True, observer=False)
    return model.eval()


def emulate_folded(
    path: Path | str, inputs: torch.Tensor, model_cfg: ModelConfig | None = None
) -> Outputs:
    """Run a folded static-W8A8 checkpoint as an int8 backend would: each quantized Linear in
    integer arithmetic (`qatconv.emulate`, numpy), the rest as the folded model, float32.

    Args:
        path: the folded checkpoint (from a QAT checkpoint prepared with ``--activations int8``).
        inputs: model inputs, first dimension = samples.
        model_cfg: the model spec when the checkpoint's metadata does not name one.

    Returns:
        The flattened outputs (`qatconv.outputs.Outputs`; ``.tensors[0]`` for a tensor model).
    """
    from qatconv import checkpoint, emulate

    path = Path(path)
    meta = checkpoint.read_metadata(path)
    model = load_folded(load_model(_model_cfg_from_meta(meta, model_cfg)).model, path)
    tensors = checkpoint.load_checkpoint(path).tensors
    return emulate.emulate(model.float().eval(), tensors, meta.get("qparams") or {},
                           inputs.float())


# ---------------------------------------------------------------------------- load_folded


def _bn_linear_paths(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (BN, Linear) paths of BN -> Linear fold records."""
    return [(r["bn"], r["linear"]) for r in records]


def _drop_bns_(model: nn.Module, paths: Sequence[tuple[str, str]]) -> None:
    """Each BN becomes `nn.Identity`; its Linear gets a (zero) bias if it had none."""
    import torch
    from torch import nn

    from qatconv.qat import _set_submodule

    for bn_path, linear_path in paths:
        _set_submodule(model, bn_path, nn.Identity())
        linear = model.get_submodule(linear_path)
        if linear.bias is None:
            linear.bias = nn.Parameter(
                torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                            device=linear.weight.device)
            )


def load_folded(model: nn.Module, path: Path | str) -> nn.Module:
    """Load a folded checkpoint into the original architecture.

    Replaces each removed BatchNorm with `nn.Identity`, gives each Linear a bias where folding
    created one, then loads the tensors strictly. Emitted quant params
    (``*.weight_scale`` / ``*.weight_zero_point`` / ``*.input_scale`` / ``*.input_zero_point``)
    are not model tensors and are skipped.

    Args:
        model: an instance of the architecture the checkpoint was folded from.
        path: the folded `.safetensors` (or its `.index.json` when sharded).

    Returns:
        ``model``, modified in place.

    Raises:
        CheckpointError: not a folded checkpoint, or its tensors do not fit ``model``.
    """
    from qatconv import checkpoint, validate

    path = Path(path)
    meta = checkpoint.read_metadata(path)
    if meta.get("stage") != "folded":
        raise BadInputError(
            f"{path} is not a folded checkpoint (stage: {meta.get('stage', 'none')})",
            hint="fold it first: qatconv fold QAT.safetensors -o OUT.safetensors",
        )
    records = validate.qat_records(meta, path)
    validate.check_pairs_fit_model(model, records, path)
    _drop_bns_(model, [(r.bn, r.linear) for r in records]
               + _bn_linear_paths(meta.get("bn_before_linear", [])))
    tensors = checkpoint.load_checkpoint(path).tensors
    qparam_keys = {
        k for k in tensors
        if k.endswith((".weight_scale", ".weight_zero_point", ".input_scale",
                       ".input_zero_point"))
        and k.rsplit(".", 1)[0] in {r.linear for r in records}
    }
    tensors = {k: v for k, v in tensors.items() if k not in qparam_keys}
    checkpoint.load_into(model, tensors, source=str(path))
    return model


# ---------------------------------------------------------------------------- inspect


def inspect_path(
    path: Path,
    *,
    model_cfg: ModelConfig | None = None,
    data: Path | None = None,
    strict: bool = False,
    target_column: str | None = None,
) -> Inspection:
    """Describe a checkpoint; with a model spec, also its pairs and BN health.

    Args:
        path: the checkpoint (any supported format).
        model_cfg: the model spec and args (its ``weights`` is ignored: ``path`` is loaded).
        data: a sample input for the pair rules' axis check.
        strict: report pairs whose feature axis cannot be proven as skipped.

    For `.safetensors` without a model only the header is read and torch is not imported.
    """
    from qatconv import inspection

    if model_cfg is None or model_cfg.spec is None:
        if data is not None:
            raise UsageError("--data needs --model", hint="the data is a sample for the pair rules")
        trust = model_cfg is not None and model_cfg.trust_pickle
        return inspection.inspect_file(path, trust_pickle=trust)
    from qatconv import checkpoint

    stage = checkpoint.read_metadata(path).get("stage") if _is_safetensors(path) else None
    if stage == "qat":
        model = load_qat(path, model_cfg)
        return inspection.inspect_file(path, model=model)
    if stage == "folded":
        model = load_folded(load_model(ModelConfig(model_cfg.spec, model_cfg.args)).model, path)
        return inspection.inspect_file(path, model=model)
    loaded = load_model(ModelConfig(model_cfg.spec, model_cfg.args, path, model_cfg.trust_pickle))
    sample = _sample_from_data(loaded.model, data, target_column)
    scan = scan_pairs(loaded.model, sample, strict=strict)
    return inspection.inspect_file(
        path, model=loaded.model, scan=scan, notes=loaded.notes, tensors=loaded.tensors
    )


def _is_safetensors(path: Path) -> bool:
    return path.is_dir() or path.name.endswith((".safetensors", ".index.json"))


def check_inspection(ins: Inspection, strict: bool) -> None:
    """Raise CheckFailedError (exit 4) under --strict when a problem was found."""
    if strict and ins.problems:
        raise CheckFailedError(
            f"{len(ins.problems)} problem(s): " + "; ".join(ins.problems[:3]),
            hint="run without --quiet (or with --json) to see every problem",
        )


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1.5GiB' / '1000' -> bytes."""
    units = {
        "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
        "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    }  # fmt: skip
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise UsageError(f"cannot read size {text!r}", hint="use e.g. 2GB, 500MB or 1GiB")
    return int(value * units[unit])


__all__ = [
    "CheckResult",
    "FoldResult",
    "PrepareReport",
    "emulate_folded",
    "fold",
    "inspect_path",
    "load_folded",
    "load_model",
    "load_qat",
    "prepare",
    "verify",
    "verify_integer",
]
