"""Swap Linear+BatchNorm1d pairs for LinearBn1d and run calibration or fine-tuning.

`QatLinearBn1d` is a `torch.ao.nn.intrinsic.qat.LinearBn1d` (isinstance holds) whose forward
fixes what the torch module gets wrong:

- gamma == 0 channels: torch divides by ``gamma / std`` and produces NaN that poisons the BN
  stats and the observer. A zero-gamma channel's BN output is beta whatever its input, so its
  scale factor is taken as 1: exact, finite, and gradients still reach gamma.
- the scaled weight ``W * gamma / std`` is computed in float64 (cast to the weight's dtype),
  in the order `fold` uses, so the weight the observer sees is bit-identical to the folded one.
- inputs with more than two dims (token-wise pairs) are flattened around the module.
- the fake-quant op is skipped when both fake quant and observation are off, so the module also
  runs in float64 (for tests) and under `disable_fake_quant` + `disable_observer`.
- static W8A8 (``--activations int8``): ``input_fake_quant``, a per-tensor affine `FakeQuantize`
  on the input the int8 GEMM reads (token-wise inputs: one range over all tokens). Its observer
  records the exact min/max over the data in calibration, then follows torch's moving average
  of each batch's min/max while fine-tuning. Weight-only modules have no such submodule, so
  their state dict is what it always was.

The float model is never touched: tensors are cloned into the QAT modules.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qatconv import optim
from qatconv.config import Loss, Mode, Optimizer, QuantConfig, QuantScheme, TrainConfig
from qatconv.errors import BadInputError, DataError, QatconvError
from qatconv.modelcopy import copy_model
from qatconv.optim import Stepper
from qatconv.outputs import (
    Outputs,
    cat_outputs,
    first_output,
    flat_cat,
    flatten_outputs,
    forward_outputs,
    require_same_names,
)

if TYPE_CHECKING:
    from qatconv.data import Rows
    from qatconv.distributed import Replica
    from qatconv.pair_record import PairRecord

log = logging.getLogger(__name__)


def _import_qat() -> tuple[type, type, type, type, type, type]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.ao.nn.intrinsic.qat import LinearBn1d
            from torch.ao.quantization import (
                FakeQuantize,
                FakeQuantizeBase,
                MinMaxObserver,
                MovingAverageMinMaxObserver,
                MovingAveragePerChannelMinMaxObserver,
            )
    except ImportError as e:  # torch built without the ao QAT modules
        raise QatconvError(
            f"this torch ({torch.__version__}) has no torch.ao.nn.intrinsic.qat: {e}",
            hint="install a torch build with quantization support: pip install 'torch>=2.4'",
        ) from None
    return (
        LinearBn1d,
        FakeQuantizeBase,
        FakeQuantize,
        MovingAveragePerChannelMinMaxObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
    )


(
    _LinearBn1d,
    FakeQuantizeBase,
    _FakeQuantize,
    _PerChannelObserver,
    _MinMaxObserver,
    _MovingAverageObserver,
) = _import_qat()

_QDTYPES = {"qint8": torch.qint8, "quint8": torch.quint8}

# torch's default for QAT activation observers (default_fake_quant): each batch moves the
# range 1% of the way to its own min/max.
INPUT_AVERAGING_CONSTANT = 0.01


class _FakeQuantSTE(torch.autograd.Function):
    """``torch.fake_quantize_per_{channel,tensor}_affine`` on float32 in five elementwise passes.

    The same arithmetic as ATen's cachemask kernels: ``q = round_half_even(x * (1 / scale)) +
    zero_point``, the output ``(clamp(q, qmin, qmax) - zero_point) * scale``, and the
    straight-through gradient wherever ``qmin <= q <= qmax``; the tests check outputs, masks and
    gradients bit for bit against torch's ops. It ran 1.8x faster than the per-channel kernel
    on a 512 x 512 weight here, and its backward selects instead of multiplying by a bool mask.
    ``scale`` and ``zero_point`` come shaped to broadcast against ``x``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
        quant_min: int, quant_max: int,
    ) -> torch.Tensor:  # fmt: skip
        shifted = bool(zero_point.any())
        q = torch.round_(x * torch.reciprocal(scale))
        if shifted:
            q = q.add_(zero_point)
        out = q.clamp(quant_min, quant_max)
        ctx.save_for_backward(out == q)  # in range: the gradient passes
        if shifted:
            out = out.sub_(zero_point)
        return out.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, grad.new_zeros(())), None, None, None, None


class _FastFakeQuantize(_FakeQuantize):  # type: ignore[misc, valid-type]
    """torch's `FakeQuantize` (same observer, buffers and state dict) whose float32 fake quant
    on CPU runs through `_FakeQuantSTE`; any other dtype, device or channel axis uses torch's
    op."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        # CPU only: the bit-identity with torch's kernels is tested there (no GPU in CI).
        fast = X.dtype == torch.float32 and X.device.type == "cpu" and (
            not self.is_per_channel or (self.ch_axis == 0 and X.dim() == 2))  # fmt: skip
        if not fast or self.fake_quant_enabled[0] != 1:
            return super().forward(X)
        if self.observer_enabled[0] == 1:
            self.fake_quant_enabled.fill_(0)
            try:  # observe and update scale / zero_point exactly as torch does
                super().forward(X)
            finally:
                self.fake_quant_enabled.fill_(1)  # it was on: checked above
        obs = self.activation_post_process
        scale = self.scale.to(X.dtype)
        zero_point = self.zero_point.to(X.dtype)
        if self.is_per_channel:
            scale, zero_point = scale.unsqueeze(1), zero_point.unsqueeze(1)
        return _FakeQuantSTE.apply(X, scale, zero_point, obs.quant_min, obs.quant_max)


def make_qconfig(quant: QuantConfig) -> object:
    """QConfig with per-channel symmetric weight fake quant; activations are left float.

    The non-fused `FakeQuantize`: torch's fused per-channel kernel gives channels whose weights
    all share one sign an asymmetric zero point (quant_min or quant_max) despite
    `per_channel_symmetric`, which int8 symmetric kernels cannot run.
    """
    from torch.ao.quantization import QConfig

    qmin, qmax = quant.quant_range
    weight = _FastFakeQuantize.with_args(
        observer=_PerChannelObserver,
        quant_min=qmin,
        quant_max=qmax,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        # Memoryless: the scale follows the current weights, as the deployed fold will.
        averaging_constant=1.0,
    )
    return QConfig(activation=nn.Identity, weight=weight)


class InputObserver(_MovingAverageObserver):  # type: ignore[misc, valid-type]
    """Per-tensor min/max observer: exact running min/max while ``exact`` (calibration), a
    moving average of each batch's min/max otherwise (fine-tuning, torch's QAT default).

    Both keep their range in the same ``min_val`` / ``max_val`` buffers, so a fine-tune starts
    its moving average from the calibrated range.
    """

    exact: bool = False

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return _MinMaxObserver.forward(self, x_orig)
        return super().forward(x_orig)


def make_input_fake_quant(scheme: QuantScheme) -> nn.Module:
    """A per-tensor affine `FakeQuantize` for a Linear's input under ``scheme``.

    The zero point is an integer in [quant_min, quant_max], so 0.0 is exactly representable.
    """
    if scheme.granularity != "tensor" or scheme.symmetric:
        raise ValueError(f"input fake quant supports per-tensor affine schemes, got {scheme}")
    return _FastFakeQuantize(
        observer=InputObserver,
        quant_min=scheme.quant_min,
        quant_max=scheme.quant_max,
        dtype=_QDTYPES[scheme.dtype],
        qscheme=torch.per_tensor_affine,
        averaging_constant=INPUT_AVERAGING_CONSTANT,
    )


def bn_scale64(gamma: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """``gamma * rsqrt(running_var + eps)`` in float64: the fold's per-channel scale."""
    return gamma.double() * torch.rsqrt(running_var.double() + eps)


class QatLinearBn1d(_LinearBn1d):  # type: ignore[misc, valid-type]
    """LinearBn1d with exact zero-gamma handling, float64 weight scaling, N-d inputs and an
    optional input fake quant (static W8A8)."""

    input_fake_quant: nn.Module | None
    # Static W8A8 from a 16-bit checkpoint: the dtype the folded weight is stored in. The scaled
    # weight is rounded through it before the fake quant, so the simulation quantizes exactly
    # the weight an int8 runtime reads from the folded file.
    weight_storage_dtype: torch.dtype | None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.input_fake_quant = None  # a plain attribute until a module is assigned
        self.weight_storage_dtype = None

    def fold_scale64(self) -> torch.Tensor:
        """The fold's per-channel scale in float64; 1 for gamma == 0 channels (exact: their
        output is beta whatever the input)."""
        gamma = self.bn.weight
        scale64 = bn_scale64(gamma, self.bn.running_var, self.bn.eps)
        return torch.where(gamma == 0, torch.ones_like(scale64), scale64)

    def scaled_weight(self, scale64: torch.Tensor) -> torch.Tensor:
        """``W * scale64[:, None]`` in float64, in the weight's dtype: the folded weight (through
        `weight_storage_dtype` when set)."""
        w = self.weight.double() * scale64.unsqueeze(1)
        if self.weight_storage_dtype is not None:
            w = w.to(self.weight_storage_dtype)
        return w.to(self.weight.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        lead = input.shape[:-1]
        if input.dim() != 2:
            input = input.reshape(-1, input.shape[-1])
        ifq = self.input_fake_quant
        if ifq is not None and (bool(ifq.fake_quant_enabled[0]) or bool(ifq.observer_enabled[0])):
            input = ifq(input)
        bn = self.bn
        scale64 = self.fold_scale64()
        scale = scale64.to(input.dtype)
        if self.training and torch.is_grad_enabled():
            # A training step: the weight's dtype is precise enough for a gradient, and the
            # float64 product (with its backward) was most of a step's cost.
            scaled_weight = self.weight * scale.to(self.weight.dtype).unsqueeze(1)
        else:
            scaled_weight = self.scaled_weight(scale64)
        fq = self.weight_fake_quant
        if bool(fq.fake_quant_enabled[0]) or bool(fq.observer_enabled[0]):
            scaled_weight = fq(scaled_weight)
        out = F.linear(input, scaled_weight) / scale
        if self.bias is not None:
            out = out + self.bias
        out = bn(out)
        if len(lead) != 1:
            out = out.reshape(*lead, out.shape[-1])
        return out

    @classmethod
    def from_pair(
        cls,
        linear: nn.Linear,
        bn: nn.BatchNorm1d,
        qconfig: object,
        input_scheme: QuantScheme | None = None,
        share_weight: bool = False,
    ) -> QatLinearBn1d:
        """A QAT module holding clones of ``linear``'s and ``bn``'s tensors; with
        ``share_weight``, ``linear``'s own weight and bias Parameters (for a calibration, which
        never changes them: a second copy of every weight is the bulk of its memory); with
        ``input_scheme``, an ``input_fake_quant`` for static int8 activations."""
        mod = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bn.eps,
            bn.momentum,
            False,
            qconfig,
        )
        ref = linear.weight
        mod.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if share_weight:
                mod.weight = linear.weight
                mod.bias = linear.bias
            else:
                mod.weight.copy_(linear.weight)
                if linear.bias is not None:
                    mod.bias.copy_(linear.bias)
            if bn.affine:
                mod.bn.weight.copy_(bn.weight)
                mod.bn.bias.copy_(bn.bias)
            else:
                # affine=False is gamma = 1, beta = 0, fixed so the fold stays exact.
                mod.bn.weight.fill_(1.0)
                mod.bn.bias.zero_()
                mod.bn.weight.requires_grad_(False)
                mod.bn.bias.requires_grad_(False)
            mod.bn.running_mean.copy_(bn.running_mean)
            mod.bn.running_var.copy_(bn.running_var)
            mod.bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        mod.weight_fake_quant.to(device=ref.device)
        if input_scheme is not None:
            mod.input_fake_quant = make_input_fake_quant(input_scheme).to(device=ref.device)
        return mod


def swap_pairs_(
    model: nn.Module,
    pairs: Sequence[PairRecord],
    qconfig: object,
    input_scheme: QuantScheme | None = None,
    *,
    share_weights: bool = False,
    weight_storage_dtype: torch.dtype | None = None,
) -> dict[str, nn.Module]:
    """Put a `QatLinearBn1d` at each pair's Linear path and `nn.Identity` at its BN path.

    Args:
        model: modified in place (pass a deep copy to keep the float model).
        pairs: the pair records (their ``linear`` and ``bn`` paths).
        qconfig: from `make_qconfig`.
        input_scheme: the activation scheme (`QuantConfig.activation_scheme`); None for
            weight-only.
        share_weights: the QAT modules hold the Linears' own weight and bias Parameters
            instead of clones (`QatLinearBn1d.from_pair`).
        weight_storage_dtype: `QatLinearBn1d.weight_storage_dtype` (static W8A8 from a 16-bit
            checkpoint).

    Returns:
        The QAT modules by path.
    """
    swapped: dict[str, nn.Module] = {}
    for pair in pairs:
        linear = model.get_submodule(pair.linear)
        bn = model.get_submodule(pair.bn)
        if not isinstance(linear, nn.Linear) or not isinstance(bn, nn.BatchNorm1d):
            raise BadInputError(
                f"pair {pair.linear} -> {pair.bn} is not a Linear and a BatchNorm1d"
            )
        if bn.running_var is None or bn.running_mean is None:
            raise BadInputError(f"{pair.bn} tracks no running stats; it cannot be folded")
        qat = QatLinearBn1d.from_pair(linear, bn, qconfig, input_scheme, share_weights)
        qat.weight_storage_dtype = weight_storage_dtype
        _set_submodule(model, pair.linear, qat)
        _set_submodule(model, pair.bn, nn.Identity())
        swapped[pair.linear] = qat
    return swapped


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def qat_modules(model: nn.Module) -> Iterator[tuple[str, QatLinearBn1d]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QatLinearBn1d):
            yield name, mod


def set_fake_quant_(model: nn.Module, *, fake_quant: bool, observer: bool) -> None:
    """Switch fake quantization and observation on/off for every weight fake-quant."""
    for mod in model.modules():
        if isinstance(mod, FakeQuantizeBase):
            (mod.enable_fake_quant if fake_quant else mod.disable_fake_quant)()
            (mod.enable_observer if observer else mod.disable_observer)()


def input_fake_quants(model: nn.Module) -> list[nn.Module]:
    """The input fake quants of the swapped Linears (empty for a weight-only model)."""
    return [m.input_fake_quant for _, m in qat_modules(model) if m.input_fake_quant is not None]


def observe_input_ranges_(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> None:
    """Set every input fake quant's range to the exact min/max of its input over ``inputs``.

    One pass in eval mode with the weight fake quant on and the input fake quant off: each
    range is that of the tensor the Linear reads when the upstream activations are float.
    Ends with fake quant on and every observer off.
    """
    fqs = input_fake_quants(model)
    if not fqs:
        return
    model.eval()
    set_fake_quant_(model, fake_quant=True, observer=False)
    for fq in fqs:
        fq.disable_fake_quant()
        fq.enable_observer()
        fq.activation_post_process.reset_min_max_vals()
        fq.activation_post_process.exact = True
    try:
        with torch.no_grad():
            for i in range(0, len(inputs), batch_size):
                model(inputs[i : i + batch_size])
    finally:
        for fq in fqs:
            fq.activation_post_process.exact = False
    set_fake_quant_(model, fake_quant=True, observer=False)


def refresh_observers_(model: nn.Module) -> None:
    """Observe the current scaled weights once, so stored qparams match the final weights."""
    with torch.no_grad():
        for _, mod in qat_modules(model):
            fq = mod.weight_fake_quant
            if not bool(fq.observer_enabled[0]):
                continue
            fq(mod.scaled_weight(mod.fold_scale64()))


def match_fake_quant_shapes_(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Resize fresh fake-quant buffers (shape [1] / [0] before any forward) to the checkpoint's.

    Per-channel scales, zero points and observer ranges only get their shape on the first
    observation; a strict shape check before `load_state_dict` would otherwise reject them.
    """
    for name, buf in model.named_buffers():
        wanted = tensors.get(name) if ".weight_fake_quant." in f".{name}" else None
        if wanted is not None and buf.shape != wanted.shape:
            buf.resize_(wanted.shape)


@dataclass
class StepInfo:
    """Progress of a fine-tune, passed to the `on_step` callback."""

    step: int
    total: int
    loss: float
    samples_per_s: float


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    bn_frozen_at: int | None = None
    observers_frozen_at: int | None = None


def _batches(
    n: int, batch_size: int, gen: torch.Generator, min_rows: int = 2
) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches; the last short batch of an epoch is dropped if it has
    fewer than ``min_rows`` (2; the number of ranks when that is larger)."""
    # int32 when it fits: the same permutation as int64 (same draws), half the memory for data
    # read per batch, where this index is the one thing that grows with the row count.
    dtype = torch.int32 if n < 2**31 else torch.int64
    while True:
        perm = torch.randperm(n, generator=gen, dtype=dtype)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) >= min_rows:
                yield idx.long()


def _forward_batches(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> None:
    for i in range(0, len(inputs), batch_size):
        model(inputs[i : i + batch_size])


def calibrate_(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    batch_size: int,
    recalibrate_bn: bool,
) -> None:
    """Observe weight ranges; optionally re-estimate BN stats as exact averages over the data.

    Input ranges (static W8A8) are then the exact min/max over the data (`observe_input_ranges_`).

    BN stats are re-estimated one pair at a time in graph order, each with the upstream pairs
    already re-estimated, by accumulating float64 sums of the BN's input over all of the data.
    """
    model.eval()
    qats = list(qat_modules(model))
    with torch.no_grad():
        if recalibrate_bn:
            set_fake_quant_(model, fake_quant=False, observer=False)
            for _, mod in qats:
                _reestimate_bn_(model, mod, inputs, batch_size)
        set_fake_quant_(model, fake_quant=True, observer=True)
        refresh_observers_(model)
        set_fake_quant_(model, fake_quant=True, observer=False)
    observe_input_ranges_(model, inputs, batch_size)


def _reestimate_bn_(
    model: nn.Module, mod: QatLinearBn1d, inputs: torch.Tensor, batch_size: int
) -> None:
    acc: dict[str, torch.Tensor | int] = {"n": 0}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].double()
        acc["n"] = int(acc["n"]) + x.shape[0]
        acc["s"] = acc.get("s", 0) + x.sum(0)
        acc["ss"] = acc.get("ss", 0) + (x * x).sum(0)

    handle = mod.bn.register_forward_pre_hook(hook)
    try:
        _forward_batches(model, inputs, batch_size)
    finally:
        handle.remove()
    n = int(acc["n"])
    if n < 2:
        raise DataError("--recalibrate-bn needs at least 2 samples")
    mean = acc["s"] / n
    var = (acc["ss"] - n * mean * mean) / (n - 1)  # unbiased, as BatchNorm stores it
    mod.bn.running_mean.copy_(mean.to(mod.bn.running_mean.dtype))
    mod.bn.running_var.copy_(var.clamp_min(0).to(mod.bn.running_var.dtype))
    mod.bn.num_batches_tracked.fill_(1)


def loss_fn(loss: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss is Loss.cross_entropy:
        return F.cross_entropy
    return F.mse_loss


def _check_targets(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: Loss
) -> None:
    """Refuse targets the loss cannot use, before any step (torch would broadcast or crash)."""
    lo, hi = _value_range(targets)
    fqs = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    saved = [(m.fake_quant_enabled.clone(), m.observer_enabled.clone()) for m in fqs]
    was_training = model.training
    try:  # a side-effect-free forward: no observation, no BN update
        set_fake_quant_(model, fake_quant=False, observer=False)
        model.eval()
        with torch.no_grad():
            out = first_output(model(inputs[:2]), 2)
    finally:
        model.train(was_training)
        for m, (fq_on, obs_on) in zip(fqs, saved):
            m.fake_quant_enabled.copy_(fq_on)
            m.observer_enabled.copy_(obs_on)
    if loss is Loss.mse and tuple(targets.shape[1:]) != tuple(out.shape[1:]):
        hint = (
            "these look like class labels: use --loss cross-entropy"
            if not targets.is_floating_point()
            else "targets must have the model output's shape per sample"
        )
        raise DataError(
            f"--loss mse needs targets shaped like the outputs {tuple(out.shape[1:])} per "
            f"sample, the data has {tuple(targets.shape[1:])}",
            hint=hint,
        )
    if loss is Loss.cross_entropy:
        if targets.is_floating_point():
            if tuple(targets.shape[1:]) != tuple(out.shape[1:]):
                raise DataError(
                    "--loss cross-entropy needs class indices or per-class probabilities "
                    f"shaped like the outputs {tuple(out.shape[1:])}",
                )
        elif out.dim() < 2 or targets.dim() != 1 or lo < 0 or hi >= out.shape[1]:
            raise DataError(
                f"--loss cross-entropy needs class indices in [0, {out.shape[-1]}) per sample; "
                f"the targets span [{int(lo)}, {int(hi)}]",
                hint="check --target-column, or use --loss distill",
            )


def _value_range(values: torch.Tensor | Rows) -> tuple[float, float]:
    """Min and max of all values; `Rows` are read chunk by chunk."""
    if isinstance(values, torch.Tensor):
        return float(values.min()), float(values.max())
    chunks = [(float(c.min()), float(c.max())) for _, c in values.chunks() if c.numel()]
    return min(lo for lo, _ in chunks), max(hi for _, hi in chunks)


def _train_goal(
    model: nn.Module,
    teacher: nn.Module | None,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    config: TrainConfig,
) -> Any:
    """What the loss compares against: the teacher's outputs (distill) or the checked targets."""
    if config.loss is Loss.distill:
        if teacher is None:
            raise ValueError("distill needs the float model")
        teacher.eval()
        goal: Any = _distill_goal(teacher, inputs)
    else:
        if targets is None:
            raise DataError(
                f"--loss {config.loss.value} needs targets in the data file",
                hint="add `targets` to the data, or use --loss distill (label-free)",
            )
        goal = targets
        _check_targets(model, inputs, goal, config.loss)
        if config.loss is Loss.mse:
            goal = goal.to(inputs.dtype)
    return goal


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> Stepper:
    """Adam (torch's fused kernel where it runs: +30% steps/s on CPU for small MLPs) or SGD
    with momentum, built without importing torch._dynamo (see qatconv/optim.py)."""
    if config.optimizer is Optimizer.sgd:
        return optim.sgd(params, config.lr, momentum=0.9)
    return optim.adam(params, config.lr)


def _freeze_at_(
    step: int, qats: list[QatLinearBn1d], bn_at: int, obs_at: int, result: TrainResult
) -> None:
    """The freeze schedule: BN statistics at ``bn_at``, observers at ``obs_at``."""
    if step == bn_at:
        for m in qats:
            m.freeze_bn_stats()
        result.bn_frozen_at = step
    if step == obs_at:
        for m in qats:
            m.weight_fake_quant.disable_observer()
            if m.input_fake_quant is not None:
                m.input_fake_quant.disable_observer()
        result.observers_frozen_at = step


def finetune_(
    model: nn.Module,
    teacher: nn.Module | None,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    config: TrainConfig,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    replica: Replica | None = None,
) -> TrainResult:
    """Gradient steps on the QAT model with the BN and observer freeze schedule.

    Long because the step loop (shard, loss, finite check, update, report) reads best whole.

    Args:
        model: the QAT model (modified in place).
        teacher: the float model, for ``--loss distill`` (its outputs are the targets).
        inputs, targets: the training data (targets unused for distill).
        config: steps, batch size, lr, loss, optimizer, freeze schedule, seed.
        on_step: called after every step.
        replica: this rank of a distributed run: it computes its slice of each global batch
            under DDP; the losses reported are the global batch's.
    """
    if config.mode is not Mode.finetune:
        raise ValueError("finetune_ needs mode=finetune")
    if len(inputs) < 2:
        raise DataError(
            f"fine-tuning needs at least 2 samples (BatchNorm statistics), the data has "
            f"{len(inputs)}",
            hint="use more data, or --mode calibrate",
        )
    gen = torch.Generator().manual_seed(config.seed)
    criterion = loss_fn(config.loss)
    goal = _train_goal(model, teacher, inputs, targets, config)
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], config)
    qats = [m for _, m in qat_modules(model)]
    _start_input_ranges_(model, inputs, config.batch_size)
    model.train()
    set_fake_quant_(model, fake_quant=True, observer=True)
    result = TrainResult()
    bn_at, obs_at = config.bn_freeze_step, config.observer_freeze_step
    forward = model if replica is None else replica.wrap(model)
    world = 1 if replica is None else replica.world_size
    batches = _batches(len(inputs), config.batch_size, gen, max(2, world))
    start = time.perf_counter()
    for step in range(config.steps):
        _freeze_at_(step, qats, bn_at, obs_at, result)
        idx = next(batches)
        local = idx if replica is None else replica.shard(idx)
        x = inputs[local]
        loss = _step_loss(criterion, forward(x), _batch_goal(goal, local, teacher, x), local)
        if replica is not None:
            loss, shown = replica.weighted_loss(loss, len(local), len(idx))
        else:
            shown = float(loss.detach())
        if not math.isfinite(shown):
            raise BadInputError(
                f"loss became {shown} at step {step}",
                hint="lower --lr, or check the data for extreme values",
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.losses.append(shown)
        result.samples += len(idx)
        if on_step is not None:
            elapsed = time.perf_counter() - start
            on_step(StepInfo(step + 1, config.steps, result.losses[-1], result.samples / elapsed))
    result.seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        refresh_observers_(model)
    set_fake_quant_(model, fake_quant=True, observer=False)
    return result


def _start_input_ranges_(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> None:
    """Start a fine-tune's input ranges at the exact min/max over the data (static W8A8 only:
    a weight-only fine-tune stays exactly as it was)."""
    if not input_fake_quants(model):
        return
    with torch.no_grad():
        set_fake_quant_(model, fake_quant=True, observer=True)
        refresh_observers_(model)
    observe_input_ranges_(model, inputs, batch_size)


def _distill_goal(teacher: nn.Module, inputs: torch.Tensor | Rows) -> Outputs | None:
    """The float model's outputs on all of ``inputs``, computed once; None for `Rows` (data
    read per batch), whose outputs could be as large as the data: each batch is then distilled
    as it is read."""
    if not isinstance(inputs, torch.Tensor):
        return None
    with torch.no_grad():
        return forward_outputs(teacher, inputs, 1024)


def _batch_goal(
    goal: Outputs | torch.Tensor | Rows | None,
    idx: torch.Tensor,
    teacher: nn.Module | None,
    x: torch.Tensor,
) -> Outputs | torch.Tensor:
    """The targets of the batch ``idx``, whose inputs are ``x``."""
    if goal is None:
        assert teacher is not None
        with torch.no_grad():
            return flatten_outputs(teacher(x), batch=len(idx))
    if isinstance(goal, Outputs):
        return Outputs(goal.names, tuple(t[idx] for t in goal.tensors), goal.ignored)
    return goal[idx]


def _step_loss(
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    out: object,
    goal: Outputs | torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """Distillation: the sum of the per-output losses; labels: the loss on the first output.

    ``goal`` holds the targets of this batch (``idx``) only.
    """
    if isinstance(goal, torch.Tensor):
        return criterion(first_output(out, len(idx)), goal)
    got = flatten_outputs(out, batch=len(idx))
    require_same_names(goal, got, "the float model", "the QAT model")
    return sum((criterion(o, g) for o, g in zip(got.tensors, goal.tensors)),
               torch.zeros((), device=idx.device))


# Model outputs up to this many bytes (both models) are compared whole, as they always were;
# beyond it, through float64 sums per batch (the metric's last digits can then differ).
# 4 MiB: holding more small output tensors between the per-batch read buffers fragments the heap
# (measured: 32 MiB of held outputs grew a 1M-row metrics pass by 180 MB, 4 MiB by 22 MB).
METRICS_IN_MEMORY_BYTES = 4 << 20


def simulated_metrics(
    qat_model: nn.Module,
    float_model: nn.Module,
    inputs: torch.Tensor | Rows,
    batch_size: int = 1024,
    *,
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Agreement of the int8-simulated QAT model (fake quant on, eval) with the float model.

    Outputs are never held beyond `METRICS_IN_MEMORY_BYTES`: larger runs, and runs whose sums
    ``reduce_sums`` adds up across processes, are measured through float64 sums per batch.

    Returns ``relative_mse`` over all outputs always, ``top1_agreement`` when the model has one
    (N, classes) output, and ``outputs`` (the same per output name) when it has several.
    """
    qat_model.eval()
    float_model.eval()
    set_fake_quant_(qat_model, fake_quant=True, observer=False)
    held: list[tuple[Outputs, Outputs]] = []
    sums: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size]
            q = flatten_outputs(qat_model(x), batch=len(x))
            f = flatten_outputs(float_model(x), batch=len(x))
            held.append((q, f))
            nbytes = sum(t.numel() * t.element_size() for o in held[-1] for t in o.tensors)
            if reduce_sums is not None or sums is not None or (
                len(held) * nbytes > METRICS_IN_MEMORY_BYTES
            ):
                for hq, hf in held:
                    sums = _metric_sums(hq, hf) if sums is None else sums + _metric_sums(hq, hf)
                cat_outputs([f])  # the checks forward_outputs makes
                names = f.names
                held.clear()
    if sums is None:
        q, f = cat_outputs([q for q, _ in held]), cat_outputs([f for _, f in held])
        return _metrics_whole(q, f)
    return _metrics_from_sums(names, sums if reduce_sums is None else reduce_sums(sums))


def _metrics_whole(q: Outputs, f: Outputs) -> dict[str, Any]:
    require_same_names(f, q, "the float model", "the QAT model")
    metrics: dict[str, Any] = _agreement(flat_cat(q, torch.float64), flat_cat(f, torch.float64))
    if len(f) == 1:
        metrics.update(_top1(q.tensors[0], f.tensors[0]))
    else:
        metrics["outputs"] = {
            name: {**_agreement(a.double(), b.double()), **_top1(a, b)}
            for name, a, b in zip(f.names, q.tensors, f.tensors)
        }
    return metrics


def _metric_sums(q: Outputs, f: Outputs) -> torch.Tensor:
    """float64 per output leaf: ``[sum (q-f)^2, sum f^2, values, top-1 matches, rows]``."""
    require_same_names(f, q, "the float model", "the QAT model")
    rows = []
    for a, b in zip(q.tensors, f.tensors):
        a64, b64 = a.double(), b.double()
        top1 = a.dim() == 2 and a.shape[1] > 1
        rows.append([float(((a64 - b64) ** 2).sum()), float((b64 * b64).sum()), b.numel(),
                     float((a.argmax(1) == b.argmax(1)).sum()) if top1 else 0.0,
                     a.shape[0] if top1 else 0])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 5)


def _metrics_from_sums(names: Sequence[str], sums: torch.Tensor) -> dict[str, Any]:
    def agreement(row: torch.Tensor) -> dict[str, float]:
        sq_err, sq_ref, n, agree, rows = (float(v) for v in row)
        denom = sq_ref / n if n else 0.0
        out = {"relative_mse": sq_err / n / denom if denom > 0 else math.nan}
        return {**out, "top1_agreement": agree / rows} if rows else out

    metrics: dict[str, Any] = agreement(sums.sum(0))
    metrics.pop("top1_agreement", None)
    if len(names) == 1:
        metrics.update({k: v for k, v in agreement(sums[0]).items() if k == "top1_agreement"})
    else:
        metrics["outputs"] = {name: agreement(row) for name, row in zip(names, sums)}
    return metrics


def _agreement(q: torch.Tensor, f: torch.Tensor) -> dict[str, float]:
    denom = float((f * f).mean()) if f.numel() else 0.0
    return {"relative_mse": float(((q - f) ** 2).mean()) / denom if denom > 0 else math.nan}


def _top1(q: torch.Tensor, f: torch.Tensor) -> dict[str, float]:
    if q.dim() == 2 and q.shape[1] > 1:
        return {"top1_agreement": float((q.argmax(1) == f.argmax(1)).double().mean())}
    return {}


def deepcopy_model(model: nn.Module, share: Iterable[torch.Tensor] = ()) -> nn.Module:
    """A copy that survives weight_norm, parametrizations and hooks (`qatconv.modelcopy`);
    ``share``: tensors the copy holds as the same objects, not copies."""
    return copy_model(model, share=share)


def pair_tensors(model: nn.Module, pairs: Sequence[PairRecord]) -> list[torch.Tensor]:
    """The parameters and buffers of the pairs' Linear and BN modules (those `swap_pairs_`
    replaces: a copy about to be swapped need not copy them)."""
    out: list[torch.Tensor] = []
    for pair in pairs:
        for path in (pair.linear, pair.bn):
            mod = model.get_submodule(path)
            out += [*mod.parameters(), *mod.buffers()]
    return out
