"""Which pairs to keep out of quantization: `--exclude` matching and per-pair sensitivity.

The sensitivity of a pair is the SQNR (dB) of the model output on the data when only that pair
is quantized (calibrated as `prepare --mode calibrate` would), once weight-only and once W8A8,
as AIMET's quant analyzer reports it: low SQNR = a pair worth excluding.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qatconv.config import Activations, QuantConfig
from qatconv.errors import UsageError
from qatconv.modelcopy import copy_model
from qatconv.outputs import flat_cat, forward_outputs
from qatconv.pair_record import PairRecord

# Samples the per-pair table runs on: the table ranks pairs, it needs no more.
SENSITIVITY_SAMPLES = 1024
# Pairs up to which `prepare` measures the table unasked: each pair costs two calibrations of
# the whole model, so the cost grows with the square of the pair count.
SENSITIVITY_AUTO_PAIRS = 32


def split_excluded(
    records: Sequence[PairRecord], patterns: Sequence[str]
) -> tuple[list[PairRecord], list[PairRecord]]:
    """Split pair records into (kept, excluded) by `--exclude` globs on the Linear's path.

    Returns:
        The kept records, and the excluded ones (whole records: `fold` still folds their BN in
        float from them).

    Raises:
        UsageError: a glob matches no pair (a typo would silently quantize everything), or
            every pair is excluded.
    """
    kept, excluded = [], []
    for r in records:
        (excluded if any(fnmatch.fnmatchcase(r.linear, p) for p in patterns) else kept).append(r)
    names = [r.linear for r in records]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise UsageError(
                f"--exclude {p!r} matches no pair's Linear",
                hint="the pairs' Linears are: " + (", ".join(names[:8]) or "none")
                + (" ..." if len(names) > 8 else ""),
            )
    if records and not kept:
        raise UsageError(
            "--exclude keeps every pair out of quantization: there is nothing to prepare",
            hint="exclude fewer pairs, or fold the float checkpoint: qatconv fold --model SPEC "
            "--weights CKPT -o OUT",
        )
    return kept, excluded


def excluded_skips(excluded: Sequence[PairRecord], patterns: Sequence[str]) -> list[dict]:
    """Skip entries (code ``excluded``) for the pairs `split_excluded` kept out."""
    out = []
    for r in excluded:
        hit = next(p for p in patterns if fnmatch.fnmatchcase(r.linear, p))
        out.append({"linear": r.linear, "bn": r.bn, "code": "excluded",
                    "reason": f"matches --exclude {hit}: kept in float, its BN still folds"})
    return out


@dataclass(frozen=True)
class PairSensitivity:
    """Model-output SQNR (dB) with only ``linear``'s pair quantized; inf = no error."""

    linear: str
    weight_only_db: float
    w8a8_db: float

    def to_json(self) -> dict[str, Any]:
        return {"linear": self.linear, "sqnr_weight_only_db": _finite(self.weight_only_db),
                "sqnr_w8a8_db": _finite(self.w8a8_db)}


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``10 log10(sum(ref^2) / sum((ref - test)^2))`` in float64; inf when they are equal."""
    ref, err = reference.double(), (test.double() - reference.double())
    noise = float((err * err).sum())
    signal = float((ref * ref).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def pair_sensitivity(
    float_model: nn.Module,
    records: Sequence[PairRecord],
    quant: QuantConfig,
    inputs: torch.Tensor,
    *,
    batch_size: int,
) -> list[PairSensitivity]:
    """Per pair, the output SQNR with only that pair quantized, weight-only and W8A8.

    Runs on the first `SENSITIVITY_SAMPLES` samples; each variant is calibrated on them with
    BN statistics kept (what `prepare --mode calibrate` does).
    """
    from qatconv import qat

    device = next((p.device for p in float_model.parameters()), inputs.device)
    x = inputs[:SENSITIVITY_SAMPLES].to(device)
    float_model.eval()
    reference = _outputs(float_model, x, batch_size)
    w8a8 = QuantConfig(quant.backend, quant.weight_bits, Activations.int8).activation_scheme
    # A calibration changes no tensor of the model: each variant shares them all (its one pair
    # too) instead of copying the model, 2 x pairs times.
    shared = [*float_model.parameters(), *float_model.buffers()]
    table = []
    for record in records:
        sqnr = []
        for scheme in (None, w8a8):
            model = copy_model(float_model, share=shared)
            qat.swap_pairs_(model, [record], qat.make_qconfig(quant), scheme, share_weights=True)
            qat.calibrate_(model, x, batch_size=batch_size, recalibrate_bn=False)
            sqnr.append(sqnr_db(reference, _outputs(model, x, batch_size)))
        table.append(PairSensitivity(record.linear, sqnr[0], sqnr[1]))
    return table


def sensitivity_table(
    float_model: nn.Module,
    records: Sequence[dict[str, Any]],
    quant: QuantConfig,
    inputs: torch.Tensor,
    *,
    batch_size: int,
    requested: bool | None,
    note: Callable[[str], None],
) -> list[PairSensitivity]:
    """`pair_sensitivity` when ``requested``; unasked (None), only for at most
    `SENSITIVITY_AUTO_PAIRS` pairs (saying so through ``note`` when it is skipped)."""
    if requested is None and len(records) > SENSITIVITY_AUTO_PAIRS:
        note(f"sensitivity table skipped for {len(records)} pairs (over "
             f"{SENSITIVITY_AUTO_PAIRS}: two calibrations each); --sensitivity measures it")
        return []
    if requested is False:
        return []
    return pair_sensitivity(float_model, records, quant, inputs, batch_size=batch_size)


def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Every value of every output leaf on ``x``, in one 1-D tensor."""
    with torch.no_grad():
        return flat_cat(forward_outputs(model, x, batch_size))


def _finite(v: float) -> float | None:
    """JSON has no inf: an error-free pair reads null."""
    return v if math.isfinite(v) else None
