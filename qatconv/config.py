"""Validated, frozen settings for each pipeline step (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from qatconv.errors import CheckpointError, UsageError


class Mode(str, Enum):
    calibrate = "calibrate"
    finetune = "finetune"


class Loss(str, Enum):
    distill = "distill"
    mse = "mse"
    cross_entropy = "cross-entropy"


class Backend(str, Enum):
    x86 = "x86"
    fbgemm = "fbgemm"
    qnnpack = "qnnpack"


class Activations(str, Enum):
    """What the QAT model quantizes besides the weights."""

    int8 = "int8"  # static W8A8: a per-tensor fake quant on every swapped Linear's input
    none = "none"  # weight-only (dynamic-quantization and weight-only runtimes)


class Optimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from: a spec with its args, and/or a checkpoint."""

    spec: str | None = None
    args: dict[str, object] = field(default_factory=dict)
    weights: Path | None = None
    trust_pickle: bool = False


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor kind is quantized: integer dtype, range, symmetry and granularity.

    ``dtype`` is torch's name without the prefix (``qint8``, ``quint8``); ``granularity`` is
    ``channel`` (one scale per output channel, axis 0) or ``tensor``.
    """

    dtype: str
    quant_min: int
    quant_max: int
    symmetric: bool
    granularity: str

    def __post_init__(self) -> None:
        if self.dtype not in ("qint8", "quint8"):
            raise ValueError(f"unknown quantized dtype {self.dtype!r}")
        if not self.quant_min < self.quant_max or self.granularity not in ("channel", "tensor"):
            raise ValueError(f"bad quant scheme {self}")

    @property
    def bits(self) -> int:
        """Bits the range needs (7 for x86's 0..127 activations)."""
        return (self.quant_max - self.quant_min).bit_length()

    def to_json(self) -> dict[str, object]:
        return {
            "dtype": self.dtype, "quant_min": self.quant_min, "quant_max": self.quant_max,
            "symmetric": self.symmetric, "granularity": self.granularity, "bits": self.bits,
        }

    @classmethod
    def from_json(cls, data: object) -> QuantScheme:
        """Raises CheckpointError on anything but a scheme `to_json` wrote."""
        try:
            if not isinstance(data, dict):
                raise TypeError("not an object")
            return cls(str(data["dtype"]), _int(data["quant_min"]), _int(data["quant_max"]),
                       bool(data["symmetric"]), str(data["granularity"]))
        except (KeyError, TypeError, ValueError) as e:
            raise _bad_record("quant scheme", data, e) from None


@dataclass(frozen=True)
class InputQParams:
    """The trained quant params of one Linear's input: ``q = clamp(round(x / scale) +
    zero_point, quant_min, quant_max)`` (round half to even), ``x ~ (q - zero_point) * scale``.

    Written by `fold` as ``qparams[linear].input``; read by the integer emulation and export.
    """

    scale: float
    zero_point: int
    quant_min: int
    quant_max: int
    dtype: str

    def __post_init__(self) -> None:
        if not (self.scale > 0 and self.scale < float("inf")):
            raise ValueError(f"input scale must be positive and finite, got {self.scale}")
        if not self.quant_min <= self.zero_point <= self.quant_max:
            raise ValueError(
                f"input zero point {self.zero_point} is outside [{self.quant_min}, "
                f"{self.quant_max}]"
            )

    def to_json(self) -> dict[str, object]:
        return {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.quant_min,
                "qmax": self.quant_max, "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: object) -> InputQParams:
        """Raises CheckpointError on anything but what `to_json` wrote."""
        try:
            if not isinstance(data, dict):
                raise TypeError("not an object")
            scale = data["scale"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise TypeError(f"scale {scale!r} is not a number")
            return cls(float(scale), _int(data["zero_point"]), _int(data["qmin"]),
                       _int(data["qmax"]), str(data["dtype"]))
        except (KeyError, TypeError, ValueError) as e:
            raise _bad_record("input qparams", data, e) from None


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{v!r} is not an integer")
    return v


def _bad_record(what: str, data: object, e: Exception) -> CheckpointError:
    why = f"lacks {e}" if isinstance(e, KeyError) else str(e)
    return CheckpointError(
        f"the checkpoint's {what} {data!r} are damaged: {why}",
        hint="re-run `qatconv prepare` / `qatconv fold` to rewrite the metadata",
    )


# The input (activation) range each backend's int8 Linear reads. The one table to change.
# x86 / fbgemm: uint8 activations x int8 weights. AVX2 CPUs without VNNI multiply with
# vpmaddubsw, which adds two adjacent u8 x s8 products into an int16 and saturates at 32767:
# 255 * 128 * 2 overflows, 127 * 128 * 2 = 32512 does not. Hence 7-bit activations, as torch's
# x86 / fbgemm qconfigs do with reduce_range=True.
# qnnpack (XNNPACK): int8 activations x narrow -127..127 weights.
ACTIVATION_SCHEMES: dict[Backend, QuantScheme] = {
    Backend.x86: QuantScheme("quint8", 0, 127, symmetric=False, granularity="tensor"),
    Backend.fbgemm: QuantScheme("quint8", 0, 127, symmetric=False, granularity="tensor"),
    Backend.qnnpack: QuantScheme("qint8", -128, 127, symmetric=False, granularity="tensor"),
}


@dataclass(frozen=True)
class QuantConfig:
    """Fake-quant schemes for `backend`: per-channel symmetric weights at `weight_bits`, and
    (``activations=int8``) a per-tensor affine fake quant on each swapped Linear's input."""

    backend: Backend = Backend.x86
    weight_bits: int = 8
    activations: Activations = Activations.int8

    def __post_init__(self) -> None:
        if not 2 <= self.weight_bits <= 8:
            raise UsageError(
                f"--weight-bits must be between 2 and 8, got {self.weight_bits}",
                hint="int8 deployment uses 8; 4 and below are for low-bit experiments",
            )

    @property
    def quant_range(self) -> tuple[int, int]:
        """Integer range of the weights. qnnpack (XNNPACK) wants a symmetric, narrow range."""
        half = 2 ** (self.weight_bits - 1)
        if self.backend is Backend.qnnpack:
            return -(half - 1), half - 1
        return -half, half - 1

    @property
    def weight_scheme(self) -> QuantScheme:
        qmin, qmax = self.quant_range
        return QuantScheme("qint8", qmin, qmax, symmetric=True, granularity="channel")

    @property
    def activation_scheme(self) -> QuantScheme | None:
        """The input scheme of the swapped Linears; None when weight-only."""
        if self.activations is Activations.none:
            return None
        return ACTIVATION_SCHEMES[self.backend]


@dataclass(frozen=True)
class TrainConfig:
    """How `prepare` runs the data through the QAT model."""

    mode: Mode = Mode.calibrate
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-4
    loss: Loss = Loss.distill
    optimizer: Optimizer = Optimizer.adam
    freeze_bn_after: int | None = None
    freeze_observers_after: int | None = None
    recalibrate_bn: bool = False
    seed: int = 0
    device: Device = Device.cpu

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 2:
            raise UsageError(
                f"--batch-size must be at least 2, got {self.batch_size}",
                hint="BatchNorm needs two or more samples per batch to compute statistics",
            )
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        for flag, value in (
            ("--freeze-bn-after", self.freeze_bn_after),
            ("--freeze-observers-after", self.freeze_observers_after),
        ):
            if value is not None and value < 0:
                raise UsageError(f"{flag} must be >= 0, got {value}")
        if self.mode is Mode.calibrate and (
            self.freeze_bn_after is not None or self.freeze_observers_after is not None
        ):
            raise UsageError(
                "--freeze-bn-after / --freeze-observers-after only apply to --mode finetune",
                hint="calibrate takes no gradient steps; add --mode finetune",
            )

    @property
    def bn_freeze_step(self) -> int:
        """Step from which BN running stats are frozen (default: half the steps)."""
        return self.steps // 2 if self.freeze_bn_after is None else self.freeze_bn_after

    @property
    def observer_freeze_step(self) -> int:
        """Step from which weight observers are frozen (default: 3/4 of the steps)."""
        if self.freeze_observers_after is None:
            return (3 * self.steps) // 4
        return self.freeze_observers_after


def compressed_tensors_config(
    weight: QuantScheme,
    activations: QuantScheme | None,
    targets: list[str],
    ignore: list[str],
) -> dict[str, object]:
    """The scheme as a compressed-tensors ``quantization_config``, for tools of that ecosystem.

    The folded weights stay float with their scales beside them (``format: dense``, status
    ``frozen``: qparams final, weights not compressed). ``num_bits`` is the storage width (8);
    the exact integer ranges (x86's 0..127 activations) are in ``qparams[linear]``.
    """

    def args(s: QuantScheme, strategy: str, bits: int) -> dict[str, object]:
        return {"num_bits": bits, "type": "int", "symmetric": s.symmetric,
                "strategy": strategy, "dynamic": False, "group_size": None,
                "observer": "minmax", "actorder": None}

    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "frozen",
        "config_groups": {"group_0": {
            "targets": targets,
            "weights": args(weight, "channel", weight.bits),
            "input_activations": args(activations, "tensor", 8) if activations else None,
            "output_activations": None,
        }},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
