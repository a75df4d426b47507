"""Model outputs of any structure, flattened one way wherever they are compared, distilled or measured.

A model may return a tensor, or tuples, lists, dicts, dataclasses and named tuples of tensors,
nested (a SimSiam head returns ``(z, p)``, a multi-task model a dict of heads). `flatten_outputs`
walks such a structure in a fixed order and names each tensor leaf by its path (``[0]``,
``['logits']``, ``.z``, ``[1]['boxes']``); the whole output of a plain tensor model is named
``output``. Leaves that cannot be compared as per-sample floating-point values (``None``, ints,
strings, integer tensors, tensors without the batch axis) are listed in ``ignored`` with the
reason, so the caller can say so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qatconv.errors import BadInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

WHOLE = "output"  # the name of the only leaf of a model that returns one tensor


@dataclass(frozen=True)
class Outputs:
    """The comparable tensor leaves of one model output, by name, in a fixed order."""

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    ignored: tuple[str, ...] = ()  # "name (why)" per leaf left out

    def __post_init__(self) -> None:
        if len(self.names) != len(self.tensors):
            raise ValueError("one name per tensor")

    def __len__(self) -> int:
        return len(self.tensors)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return zip(self.names, self.tensors)

    def note(self) -> str | None:
        """One sentence naming the ignored leaves, or None when every leaf is compared."""
        if not self.ignored:
            return None
        return (f"model output leaves ignored in comparisons: {', '.join(self.ignored[:6])}"
                + (f" (+{len(self.ignored) - 6} more)" if len(self.ignored) > 6 else ""))


def flatten_outputs(out: object, batch: int | None = None) -> Outputs:
    """Flatten a model output into its floating-point tensor leaves.

    Args:
        out: what ``model(x)`` returned.
        batch: the number of samples in ``x``; when given, a tensor leaf whose first axis is
            not that long is not per-sample and is ignored.

    Returns:
        Outputs with the leaves in a fixed order (sequence order, dict insertion order,
        dataclass field order).
    """
    import torch

    names: list[str] = []
    tensors: list[torch.Tensor] = []
    ignored: list[str] = []
    for path, leaf in _walk(out, ""):
        name = path or WHOLE
        if not isinstance(leaf, torch.Tensor):
            ignored.append(f"{name} ({type(leaf).__name__})")
        elif not leaf.is_floating_point():
            ignored.append(f"{name} ({str(leaf.dtype).removeprefix('torch.')} tensor)")
        elif batch is not None and (leaf.dim() == 0 or leaf.shape[0] != batch):
            ignored.append(f"{name} (shape {tuple(leaf.shape)}: not one row per sample)")
        else:
            names.append(name)
            tensors.append(leaf)
    return Outputs(tuple(names), tuple(tensors), tuple(ignored))


def iter_leaves(obj: object) -> Iterator[object]:
    """Every leaf of a nested output (or argument) structure, in `flatten_outputs` order."""
    for _, leaf in _walk(obj, ""):
        yield leaf


def _walk(obj: object, path: str) -> Iterator[tuple[str, object]]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        for key, value in zip(obj._fields, obj):
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _walk(value, f"{path}[{key!r}]")
    else:
        yield path, obj


def forward_outputs(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024) -> Outputs:
    """Run ``model`` over ``inputs`` in batches; each leaf concatenated over the batches.

    Raises:
        BadInputError: the model returns no floating-point tensor per sample, or its output
            changes structure from one batch to the next.
    """
    parts: list[Outputs] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        parts.append(flatten_outputs(model(chunk), batch=len(chunk)))
    return cat_outputs(parts)


def cat_outputs(parts: list[Outputs]) -> Outputs:
    """The outputs of consecutive batches as one: each leaf concatenated.

    Raises:
        BadInputError: as `forward_outputs`.
    """
    import torch

    if not parts:
        return Outputs((), ())
    first = parts[0]
    for p in parts[1:]:
        require_same_names(first, p, "the first batch", "a later batch")
    if not first.names:
        raise BadInputError(
            "the model output holds no floating-point tensor with one row per sample"
            + (f" ({', '.join(first.ignored[:4])})" if first.ignored else ""),
            hint="qatconv compares, distills and measures tensor outputs (or tuples, lists, "
            "dicts, dataclasses of them)",
        )
    tensors = tuple(torch.cat([p.tensors[i] for p in parts]) for i in range(len(first)))
    return Outputs(first.names, tensors, first.ignored)


def require_same_names(a: Outputs, b: Outputs, a_label: str, b_label: str) -> None:
    """Raise when two flattened outputs do not hold the same leaves (they cannot be compared)."""
    if a.names != b.names:
        raise BadInputError(
            f"the model outputs differ in structure: {a_label} returns "
            f"{', '.join(a.names) or 'no tensor'}, {b_label} returns "
            f"{', '.join(b.names) or 'no tensor'}",
            hint="the model must return the same structure for every input",
        )


def first_output(out: object, batch: int) -> torch.Tensor:
    """The first per-sample floating-point tensor of an output (what labels are compared with).

    Raises:
        BadInputError: the output holds no such tensor.
    """
    flat = flatten_outputs(out, batch=batch)
    if not flat.tensors:
        raise BadInputError(
            "the model output holds no floating-point tensor with one row per sample",
            hint="--loss mse / cross-entropy compare the targets with the model's first output",
        )
    return flat.tensors[0]


def flat_cat(outputs: Outputs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every value of every leaf in one 1-D tensor (for whole-output statistics)."""
    import torch

    if not outputs.tensors:
        return torch.zeros(0, dtype=dtype or torch.float32)
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in outputs.tensors])
