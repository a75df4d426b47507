"""Validated, frozen settings for each pipeline step (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from qatconv.errors import UsageError


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
class QuantConfig:
    """Weight fake-quant scheme: per-channel symmetric at `weight_bits` for `backend`."""

    backend: Backend = Backend.x86
    weight_bits: int = 8

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
