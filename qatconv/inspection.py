"""Checkpoint file (and optionally its model) -> `Inspection`. Never prints.

For `.safetensors` files only the header and the small BatchNorm tensors are read (struct):
torch is not imported, and the time does not grow with the file's size.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatconv.dtypes import DTYPES
from qatconv.metadata import METADATA_KEY, parse_metadata
from qatconv.st_checkpoint import OpenCheckpoint, is_index, open_checkpoint, resolve

if TYPE_CHECKING:
    from torch import nn

    from qatconv.pairs import PairScan

TINY_VAR = 1e-8

Vector = list[float]


@dataclass
class BnHealth:
    """Problems in one BatchNorm's tensors (counts of channels)."""

    bn: str
    channels: int
    zero_gamma: int = 0
    tiny_var: int = 0
    nonfinite: int = 0
    # The module's class with a model (None from a checkpoint alone: the kind is unknown).
    kind: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.zero_gamma or self.tiny_var or self.nonfinite)

    @property
    def foldable_kind(self) -> bool:
        """Whether qatconv folds this kind (BatchNorm1d; unknown counts, to be safe)."""
        return self.kind in (None, "BatchNorm1d")

    def problems(self) -> list[str]:
        out = []
        if self.zero_gamma:
            out.append(f"{self.bn}: {self.zero_gamma} channel(s) with gamma == 0")
        if self.tiny_var:
            out.append(f"{self.bn}: {self.tiny_var} channel(s) with running_var <= {TINY_VAR:g}")
        if self.nonfinite:
            out.append(f"{self.bn}: {self.nonfinite} non-finite value(s)")
        return out


@dataclass
class Inspection:
    path: Path
    format: str
    files: list[Path]
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]
    qatconv: dict[str, Any] | None
    bn_health: list[BnHealth] = field(default_factory=list)
    scan: PairScan | None = None
    notes: list[str] = field(default_factory=list)
    # With a model: every parameter/buffer holding NaN/inf, with its count. (Without one only
    # the BatchNorm vectors are read, so that the time does not grow with the file's size.)
    nonfinite: dict[str, int] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        # BatchNorm2d & co. are never folded: their health is shown, never a --strict problem.
        out = [p for h in self.bn_health if h.foldable_kind for p in h.problems()]
        out += [f"{name}: {n} non-finite value(s)" for name, n in self.nonfinite.items()]
        recorded = (self.qatconv or {}).get("unverified")
        if isinstance(recorded, list):  # a fold whose feature axis was never proven
            out += [f"unverified fold of {p} (folded without --check data)" for p in recorded]
        if self.scan is not None:
            # A BatchNorm1d that no Linear feeds (an input BN, say) is not a pair left unfolded.
            out += [
                f"skipped {s.linear} -> {s.bn}: {s.code}"
                for s in self.scan.skipped
                if s.code != "not-adjacent"
            ]
            out += [f"unverified {p.linear} -> {p.bn}" for p in self.scan.unverified]
        return out

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "tensors": self.tensors,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "dtypes": self.dtypes,
            "qatconv": self.qatconv,
            "bn_health": [
                {
                    "bn": h.bn,
                    "channels": h.channels,
                    "zero_gamma": h.zero_gamma,
                    "tiny_var": h.tiny_var,
                    "nonfinite": h.nonfinite,
                    "kind": h.kind,
                }
                for h in self.bn_health
            ],
            "pairs": None,
            "nonfinite": self.nonfinite,
            "notes": self.notes,
            "problems": self.problems,
        }
        if self.scan is not None:
            obj["pairs"] = self.scan.to_json()
        return obj


def inspect_file(path: Path, model: nn.Module | None = None, scan: PairScan | None = None,
                 notes: list[str] | None = None,
                 tensors: Mapping[str, Any] | None = None,
                 trust_pickle: bool = False) -> Inspection:
    """Describe the checkpoint at ``path``.

    Args:
        path: `.safetensors`, a sharded index (or its folder), or a torch pickle.
        model: the loaded model, when `--model` was given (BN health then comes from it).
        scan: its pair scan.
        notes: what loading did.
        tensors: the already-loaded tensors of a non-safetensors checkpoint.
    """
    path = Path(path)
    if _is_safetensors(path):
        with open_checkpoint(path) as ckpt:
            ins = _from_checkpoint(path, ckpt)
    elif tensors is not None:
        ins = _from_tensors(path, tensors)
    else:
        from qatconv.checkpoint import load_checkpoint

        loaded = load_checkpoint(path, trust_pickle=trust_pickle)
        ins = _from_tensors(path, loaded.tensors)
        ins.notes += loaded.notes
    if model is not None:
        ins.bn_health = _health_from_model(model)
        ins.nonfinite = _nonfinite_tensors(model)
    ins.scan = scan
    ins.notes += notes or []
    return ins


def _is_safetensors(path: Path) -> bool:
    resolved = resolve(path)
    return is_index(resolved) or resolved.name.lower().endswith(".safetensors")


def _from_checkpoint(path: Path, ckpt: OpenCheckpoint) -> Inspection:
    headers = ckpt.headers
    dtypes: Counter[str] = Counter()
    params = nbytes = count = 0
    for name in ckpt.where:
        info = ckpt.info(name)
        dtypes[info.dtype] += 1
        params += info.numel
        nbytes += info.nbytes
        count += 1
    meta = headers[0].metadata.get(METADATA_KEY) if headers else None
    qat_meta = parse_metadata(meta, path, lenient=True)
    ins = Inspection(
        path,
        "safetensors" if len(headers) == 1 else "safetensors-sharded",
        [h.path for h in headers],
        count,
        params,
        nbytes,
        dict(sorted(dtypes.items())),
        qat_meta,
    )
    ins.bn_health = _health_from_checkpoint(ckpt)
    ins.notes += ckpt.notes
    return ins


def _read_vector(ckpt: OpenCheckpoint, name: str) -> Vector | None:
    info = ckpt.info(name)
    if info.nbytes > 64 * 2**20:  # BN vectors are small; skip anything else
        return None
    raw = ckpt.read(name)
    n = info.numel
    if info.dtype == "BF16":  # the top 16 bits of a float32
        halves = struct.unpack(f"<{n}H", raw)
        return list(struct.unpack(f"<{n}f", struct.pack(f"<{n}I", *(h << 16 for h in halves))))
    code = DTYPES[info.dtype].struct  # BF16 (widened above) and integers have none
    return None if code is None else list(struct.unpack(f"<{n}{code}", raw))


def _health_from_checkpoint(ckpt: OpenCheckpoint) -> list[BnHealth]:
    where = ckpt.where
    out = []
    for name in sorted(where):
        if not name.endswith(".running_var"):
            continue
        prefix = name[: -len("running_var")]

        def read(key: str, _p: str = prefix) -> Vector | None:
            k = _p + key
            return _read_vector(ckpt, k) if k in where else None

        out.append(
            _health(prefix[:-1], read("weight"), read("bias"), read("running_mean"), read("running_var"))
        )
    return out


def _from_tensors(path: Path, tensors: Mapping[str, Any]) -> Inspection:
    dtypes: Counter[str] = Counter()
    params = nbytes = 0
    for t in tensors.values():
        dtypes[str(t.dtype).removeprefix("torch.")] += 1
        params += t.numel()
        nbytes += t.numel() * t.element_size()
    ins = Inspection(path, "pytorch", [path], len(tensors), params, nbytes,
                     dict(sorted(dtypes.items())), None)
    health = []
    for name in sorted(tensors):
        if name.endswith(".running_var"):
            p = name[: -len("running_var")]

            def get(key: str, _p: str = p) -> Vector | None:
                t = tensors.get(_p + key)
                return None if t is None else t.detach().double().cpu().flatten().tolist()

            health.append(_health(p[:-1], get("weight"), get("bias"), get("running_mean"),
                                  get("running_var")))
    ins.bn_health = health
    return ins


def _health_from_model(model: nn.Module) -> list[BnHealth]:
    from torch import nn

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
            def arr(t: Any) -> Vector | None:
                return None if t is None else t.detach().double().cpu().flatten().tolist()

            health = _health(name, arr(mod.weight), arr(mod.bias), arr(mod.running_mean),
                             arr(mod.running_var))
            health.kind = type(mod).__name__
            out.append(health)
    return out


def _nonfinite_tensors(model: nn.Module) -> dict[str, int]:
    import torch

    out = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                out[name] = n
    return out


def _health(bn: str, gamma: Vector | None, beta: Vector | None,
            mean: Vector | None, var: Vector | None) -> BnHealth:
    channels = len(var) if var is not None else 0
    h = BnHealth(bn, channels)
    arrays = [a for a in (gamma, beta, mean, var) if a is not None]
    h.nonfinite = sum(not math.isfinite(v) for a in arrays for v in a)
    if gamma is not None:
        h.zero_gamma = sum(v == 0 for v in gamma)
    if var is not None:
        h.tiny_var = sum(v <= TINY_VAR for v in var)
    return h
