"""Adam and SGD with momentum for the fine-tune loop, without torch.optim's import of torch._dynamo.

Building the first ``torch.optim`` optimizer of a process imports ``torch._dynamo`` (with inductor
and torch.onnx): `torch.optim.Optimizer` wraps its methods in ``_disable_dynamo`` and
``_use_grad_for_differentiable``, which import it. That cost 1.5-2.6 s per process on the
development VM, more than 200 fine-tune steps of a 4 x Linear(512) MLP. The two classes here make
the same updates, bit for bit, and import nothing beyond torch:

- `FusedAdam` calls the ATen kernel that ``torch.optim.Adam(fused=True)`` calls
  (``torch._fused_adam_``), after adding 1 to the float32 step tensors, as ``_fused_adam`` in
  torch/optim/adam.py does.
- `MomentumSGD` is ``_single_tensor_sgd`` of torch/optim/sgd.py (what ``torch.optim.SGD`` runs
  for CPU tensors) with momentum, and no dampening, weight decay or Nesterov term.

`adam` and `sgd` return torch.optim's optimizer where these cannot serve: a torch without the
kernel, a device or dtype the kernel refuses, SGD off the CPU (torch.optim runs its multi-tensor
variant there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch

log = logging.getLogger(__name__)

_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
_EPS = 1e-8


class Stepper(Protocol):
    """What the fine-tune loop calls on an optimizer (torch.optim's optimizers qualify)."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> object: ...


class _Params:
    """The optimized parameters and ``zero_grad``, shared by both optimizers."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")  # as torch.optim says

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()


class FusedAdam(_Params):
    """``torch.optim.Adam(params, lr=lr, fused=True)`` with default betas, eps, no weight decay.

    As in torch, a parameter whose gradient is None is skipped, and its state (a float32 step
    count on its device, the two moments) is created at its first update.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: float) -> None:
        super().__init__(params)
        self.lr = lr
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if i not in self.state:
                self.state[i] = (torch.zeros((), dtype=torch.float32, device=p.device),
                                 torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format))
            lists = groups.setdefault((p.device, p.dtype), [[], [], [], [], []])
            for dst, t in zip(lists, (p, p.grad, *self.state[i][1:], self.state[i][0])):
                dst.append(t)
        for params, grads, exp_avgs, exp_avg_sqs, steps in groups.values():
            torch._foreach_add_(steps, 1)
            _fused_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, self.lr)


class MomentumSGD(_Params):
    """``torch.optim.SGD(params, lr=lr, momentum=momentum)`` as it runs on CPU tensors."""

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: float, momentum: float) -> None:
        super().__init__(params)
        self.lr, self.momentum = lr, momentum
        self.buffers: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            buf = self.buffers.get(i)
            if buf is None:
                buf = self.buffers[i] = p.grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(p.grad, alpha=1)
            p.add_(buf, alpha=-self.lr)


def _fused_adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
) -> None:
    torch._fused_adam_(  # type: ignore[attr-defined]
        params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr,
        beta1=_BETAS[0], beta2=_BETAS[1], weight_decay=0.0, eps=_EPS, maximize=False,
        grad_scale=None, found_inf=None,
    )


def _kernel_takes(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether ``torch._fused_adam_`` exists and runs for each device and dtype of ``params``
    (tried on one-element tensors, so a refusal never leaves a parameter half updated)."""
    if not hasattr(torch, "_fused_adam_"):
        return False
    for device, dtype in {(p.device, p.dtype) for p in params}:
        if not dtype.is_floating_point:
            return False
        one = [torch.zeros(1, device=device, dtype=dtype)]
        try:
            _fused_adam_(one, [t.clone() for t in one], [t.clone() for t in one],
                         [t.clone() for t in one],
                         [torch.ones((), dtype=torch.float32, device=device)], 1e-3)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            log.debug("torch._fused_adam_ refuses %s on %s: %s", dtype, device, e)
            return False
    return True


def adam(params: Sequence[torch.nn.Parameter], lr: float) -> Stepper:
    """Adam as ``torch.optim.Adam(fused=True)`` computes it; torch's non-fused Adam where the
    fused kernel is missing or refuses a parameter's device or dtype."""
    if _kernel_takes(params):
        return FusedAdam(params, lr)
    return torch.optim.Adam(params, lr=lr)


def sgd(params: Sequence[torch.nn.Parameter], lr: float, momentum: float) -> Stepper:
    """SGD with momentum as ``torch.optim.SGD`` computes it; torch's own off the CPU."""
    if all(p.device.type == "cpu" for p in params):
        return MomentumSGD(params, lr, momentum)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)
