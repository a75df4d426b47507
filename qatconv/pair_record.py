"""`PairRecord`: one Linear -> BatchNorm1d pair as it crosses modules and lands in metadata.

The pair finder produces them (`pairs.Pair.to_record`), `prepare` stores them under the
checkpoint's ``pairs``, and the swap, the fold, the checks and `load_folded` read them back.
`PairRecord.from_json` is the only place a stored record is validated; nobody else reads the
raw dict. Imports no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qatconv.errors import CheckpointError

__all__ = ["META_HINT", "PairRecord"]

META_HINT = "the checkpoint's qatconv metadata is damaged; re-run `qatconv prepare`"
_FIELDS = ("linear", "bn", "qat", "eps", "momentum", "in_features", "out_features", "bias",
           "affine")  # fmt: skip


@dataclass(frozen=True)
class PairRecord:
    """A pair: module paths (``qat``: where the ``LinearBn1d`` sits in the QAT model, the
    Linear's path), the BN's ``eps`` / ``momentum``, the Linear's sizes, whether it has a
    bias, whether the BN is affine (None: not recorded, read as affine). ``extra`` keeps
    fields this version does not know, so a record survives a round trip unchanged."""

    linear: str
    bn: str
    qat: str
    eps: float
    momentum: float | None
    in_features: int
    out_features: int
    bias: bool
    affine: bool | None = True
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_affine(self) -> bool:
        return self.affine is not False

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "linear": self.linear,
            "bn": self.bn,
            "qat": self.qat,
            "eps": self.eps,
            "momentum": self.momentum,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
        }
        if self.affine is not None:
            obj["affine"] = self.affine
        return {**obj, **self.extra}

    @classmethod
    def from_json(cls, obj: object, source: object, index: int = 0) -> PairRecord:
        """Validate one stored record.

        Needs ``linear``, ``bn``, ``qat`` (module paths), ``eps`` (>= 0, finite),
        ``momentum`` (number or null), ``in_features`` / ``out_features`` (positive integers),
        ``bias`` / ``affine`` (booleans; ``affine`` may be absent).

        Raises:
            CheckpointError: the first field that is missing or malformed, naming the pair.
        """
        if not isinstance(obj, dict):
            raise CheckpointError(
                f"{source}: pair {index} in the qatconv metadata is a {type(obj).__name__}, not "
                "an object", hint=META_HINT,
            )
        r = obj
        label = r.get("linear") if isinstance(r.get("linear"), str) else f"#{index}"
        for key in ("linear", "bn", "qat"):
            if not isinstance(r.get(key), str) or not r[key]:
                _bad_field(source, label, key, r.get(key))
        eps = r.get("eps")
        if not _is_number(eps) or not math.isfinite(eps) or eps < 0:
            _bad_field(source, label, "eps", eps, "a number >= 0")
        momentum = r.get("momentum")
        if momentum is not None and (not _is_number(momentum) or not math.isfinite(momentum)):
            _bad_field(source, label, "momentum", momentum, "a number or null")
        for key in ("in_features", "out_features"):
            v = r.get(key)
            if not _is_int(v) or v <= 0:
                _bad_field(source, label, key, v, "a positive integer")
        for key in ("bias", "affine"):
            if key in r and not isinstance(r[key], bool):
                _bad_field(source, label, key, r[key], "true or false")
        if "bias" not in r:
            _bad_field(source, label, "bias", None, "true or false")
        return cls(
            r["linear"], r["bn"], r["qat"], r["eps"], momentum, r["in_features"],
            r["out_features"], r["bias"], r.get("affine"),
            {k: v for k, v in r.items() if k not in _FIELDS},
        )


def _bad_field(source: object, label: object, key: str, value: object, want: str = "") -> None:
    shown = json.dumps(value) if value is None or isinstance(value, (int, float, str)) else (
        type(value).__name__
    )
    if len(shown) > 40:
        shown = shown[:37] + "..."
    need = f" (expected {want})" if want else ""
    raise CheckpointError(
        f"{source}: pair {label}: {key!r} is {'missing' if value is None else shown}{need} in "
        "the qatconv metadata",
        hint=META_HINT,
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
