"""A copy of a user's model that survives what real models hold.

``copy.deepcopy`` refuses a module that keeps a non-leaf tensor as a plain attribute: the
hook-based ``torch.nn.utils.weight_norm`` stores ``weight = g * v / ||v||`` on the module, so a
weight-normed model cannot be deep-copied after a forward with autograd on (or, for some torch
versions, before any forward at all). Such an attribute is recomputed from the parameters by the
next forward, so the copy may take a detached value of it. Parametrized modules
(``torch.nn.utils.parametrizations.weight_norm``) and modules with hooks deep-copy as they are;
a model that still cannot be copied is rebuilt by the caller's ``rebuild`` (from its spec) and
given the original's state.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from qatconv.errors import BadInputError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def copy_model(
    model: nn.Module,
    rebuild: Callable[[], nn.Module] | None = None,
    *,
    share: Iterable[torch.Tensor] = (),
) -> nn.Module:
    """An independent copy of ``model`` (parameters, buffers, hooks, parametrizations).

    Args:
        model: the model to copy; left as it was.
        rebuild: builds a fresh instance of the same architecture (e.g. from the model spec);
            used with ``load_state_dict`` when the model cannot be copied otherwise.
        share: tensors of ``model`` the copy holds as the same objects instead of copies
            (the caller promises not to modify them, or to replace their modules).

    Raises:
        BadInputError: the model cannot be copied and no ``rebuild`` was given.
    """
    memo = {id(t): t for t in share}
    try:
        return copy.deepcopy(model, dict(memo))
    except RuntimeError as first:
        log.debug("deepcopy failed (%s); retrying with detached non-leaf attributes", first)
        error: Exception = first
    try:
        with _detached_attributes(model):
            return copy.deepcopy(model, dict(memo))
    except RuntimeError as e:
        error = e
    if rebuild is None:
        raise BadInputError(
            f"the model cannot be copied: {first_line(error)}",
            hint="pass the model as --model SPEC so qatconv can build a second instance",
        ) from error
    fresh = rebuild()
    fresh.load_state_dict(model.state_dict())
    return fresh.train(model.training)


@contextmanager
def _detached_attributes(model: nn.Module) -> Iterator[None]:
    """Swap every plain tensor attribute that has an autograd history for a detached one."""
    import torch

    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                saved.append((module, name, value))
                object.__setattr__(module, name, value.detach())
    try:
        yield
    finally:
        for module, name, value in saved:
            object.__setattr__(module, name, value)
