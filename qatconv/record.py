"""A torch.fx graph recorded from one eager run, for models torch.fx cannot trace.

Real models branch on shapes (``if H == ws``), call numpy on sizes, assert on ``x.dim()``: all
fine in eager mode, all fatal to symbolic tracing. `record_graph` runs the model once on a sample
and writes down, per call, which module or op consumed which tensor, as an ``fx.Graph`` of the
same kinds of nodes tracing makes:

* ``call_module`` for each call of a module torch.fx would keep as a leaf (Linear, BatchNorm,
  the ``torch.nn`` modules), seen through forward hooks; the ops inside it are not recorded;
* ``call_function`` / ``call_method`` for every torch function or tensor method run between
  them, seen through a ``TorchFunctionMode`` (``x.T``/``x.shape`` become ``getattr`` nodes, as
  in a trace; the items of a returned tuple become ``operator.getitem`` nodes);
* ``get_attr`` for parameters and buffers read directly, and for tensors made outside torch
  (``torch.from_numpy``): a use the recording cannot follow is still a use;
* one ``output`` node whose arguments are every tensor leaf of the model's output.

Every node holding a tensor gets ``meta["tensor_meta"]`` (a `TensorMeta`), as shape propagation
gives a traced graph in `qatconv.pairs`, so the pair rules of `qatconv.pairs` run on this graph unchanged. The graph is
the dataflow of this input shape only: a branch the sample did not take is not in it.

Ghost BatchNorm (TabNet's GBN: ``cat([bn(c) for c in x.chunk(k, 0)])``) is one affine map per
feature in eval mode, so ``chunk -> bn per chunk -> cat`` is rewritten to one ``bn`` call on the
chunked tensor when every chunk goes to the same BN and the BN outputs go, in order, only to a
``cat`` along the batch axis.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from qatconv.outputs import iter_leaves

__all__ = ["Recording", "TensorMeta", "record_graph"]

_SPLITS = frozenset({"chunk", "split", "tensor_split", "unbind"})


@dataclass(frozen=True)
class Recording:
    """The graph of one eager run, and the input shapes it holds for."""

    graph: fx.Graph
    input_shapes: tuple[tuple[int, ...], ...]
    ghost_bns: tuple[str, ...]  # BN paths whose per-chunk calls were merged into one


class _Recorder:
    def __init__(self, work: nn.Module, is_leaf: Callable[[nn.Module, str], bool]) -> None:
        self.graph = fx.Graph()
        self.nodes: dict[int, fx.Node] = {}
        self.alive: list[torch.Tensor] = []  # ids stay unique while the tensors live
        self.depth = 0
        self.constants = 0
        self.path = {id(m): p for p, m in work.named_modules()}
        self.leaves = {id(m) for p, m in work.named_modules() if p and is_leaf(m, p)}
        self.attrs = {
            id(t): n
            for n, t in itertools.chain(work.named_parameters(), work.named_buffers())
        }

    # -- tensors <-> nodes
    def node_of(self, t: torch.Tensor) -> fx.Node:
        node = self.nodes.get(id(t))
        if node is None:
            name = self.attrs.get(id(t))
            if name is None:
                name = f"_recorded_constant_{self.constants}"
                self.constants += 1
            node = self.graph.get_attr(name)
            self.bind(t, node)
        return node

    def bind(self, t: torch.Tensor, node: fx.Node) -> None:
        self.nodes[id(t)] = node
        self.alive.append(t)
        node.meta["tensor_meta"] = TensorMeta(tuple(int(s) for s in t.shape), t.dtype)

    def to_args(self, obj: Any) -> Any:
        return fx.node.map_aggregate(
            obj, lambda v: self.node_of(v) if isinstance(v, torch.Tensor) else v
        )

    def bind_result(self, result: Any, node: fx.Node) -> None:
        if isinstance(result, torch.Tensor):
            self.bind(result, node)
        elif isinstance(result, (tuple, list)):
            for i, item in enumerate(result):
                if isinstance(item, torch.Tensor):
                    self.bind(item, self.graph.call_function(operator.getitem, (node, i)))

    # -- what gets recorded
    def record_call(self, func: Any, args: tuple, kwargs: dict, result: Any) -> None:
        tensors_in = [v for v in iter_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        if not tensors_in and not isinstance(result, (torch.Tensor, tuple, list)):
            return
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if name == "__get__" and isinstance(getattr(owner, "__name__", None), str):
            node = self.graph.call_function(getattr, (self.to_args(args[0]), owner.__name__))
        elif name == "__getitem__":
            node = self.graph.call_function(operator.getitem, self.to_args(args))
        elif getattr(torch.Tensor, name, None) is func:
            node = self.graph.call_method(name, self.to_args(args), self.to_args(kwargs))
        else:
            node = self.graph.call_function(func, self.to_args(args), self.to_args(kwargs))
        self.bind_result(result, node)

    def record_module(self, mod: nn.Module, args: tuple, kwargs: dict, result: Any) -> None:
        node = self.graph.call_module(self.path[id(mod)], self.to_args(args), self.to_args(kwargs))
        self.bind_result(result, node)


@dataclass(frozen=True)
class TensorMeta:
    """What ShapeProp's TensorMetadata gives the pair rules: the shape (and dtype). Both graph
    sources write it: this recording, and `qatconv.pairs`'s shape propagation of a trace."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _Mode(TorchFunctionMode):
    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.rec.depth == 0:
            self.rec.record_call(func, args, kwargs, result)
        return result


@contextmanager
def _module_hooks(work: nn.Module, rec: _Recorder) -> Iterator[None]:
    def enter(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        rec.depth += 1

    def leave(mod: nn.Module, args: tuple, kwargs: dict, result: Any) -> None:
        if rec.depth == 1:  # still above 0: what recording reads (shapes) is not recorded
            rec.record_module(mod, args, kwargs, result)
        rec.depth -= 1

    handles = []
    try:
        for mod in work.modules():
            if id(mod) in rec.leaves:
                handles.append(mod.register_forward_pre_hook(enter, with_kwargs=True))
                handles.append(mod.register_forward_hook(leave, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def record_graph(
    work: nn.Module, inputs: tuple, is_leaf: Callable[[nn.Module, str], bool]
) -> Recording:
    """Run ``work(*inputs)`` once (no grad) and return its dataflow as an ``fx.Graph``.

    Args:
        work: the model (a copy: running it may update buffers); called as it is (eval mode).
        inputs: the sample.
        is_leaf: which modules are recorded as one call (`torch.fx.Tracer.is_leaf_module`).

    Raises:
        Whatever the model raises on the sample.
    """
    rec = _Recorder(work, is_leaf)
    placeholders = []
    for i, x in enumerate(inputs):
        node = rec.graph.placeholder(f"input_{i}")
        if isinstance(x, torch.Tensor):
            rec.bind(x, node)
        placeholders.append(node)
    with torch.no_grad(), _module_hooks(work, rec), _Mode(rec):
        out = work(*inputs)
    leaves = tuple(rec.node_of(v) for v in iter_leaves(out) if isinstance(v, torch.Tensor))
    rec.graph.output(leaves)
    ghosts = _merge_ghost_bns(rec.graph, work)
    shapes = tuple(tuple(int(s) for s in x.shape) for x in inputs if isinstance(x, torch.Tensor))
    return Recording(rec.graph, shapes, ghosts)


# --------------------------------------------------------------------------- ghost BatchNorm


def _merge_ghost_bns(graph: fx.Graph, work: nn.Module) -> tuple[str, ...]:
    merged: list[str] = []
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target in _SPLITS or (
            node.op == "call_function" and getattr(node.target, "__name__", "") in _SPLITS
        ):
            path = _merge_one(graph, work, node)
            if path is not None:
                merged.append(path)
    return tuple(dict.fromkeys(merged))


def _split_dim(node: fx.Node) -> Any:
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    if node.target == "unbind" or getattr(node.target, "__name__", "") == "unbind":
        return node.args[1] if len(node.args) > 1 else 0
    return node.args[2] if len(node.args) > 2 else 0


def _merge_one(graph: fx.Graph, work: nn.Module, split: fx.Node) -> str | None:
    """Rewrite ``split -> getitem_i -> bn -> cat(dim 0)`` to ``bn(split input)``; the BN path."""
    if _split_dim(split) != 0 or split.target == "unbind":
        return None
    items = sorted(split.users, key=lambda u: u.args[1] if len(u.args) > 1 else -1)
    if not items or any(
        u.op != "call_function" or u.target is not operator.getitem for u in items
    ) or [u.args[1] for u in items] != list(range(len(items))):
        return None
    bns = []
    for item in items:
        users = list(item.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (item,):
            return None
        bns.append(users[0])
    targets = {str(b.target) for b in bns}
    if len(targets) != 1 or not isinstance(work.get_submodule(bns[0].target), nn.BatchNorm1d):
        return None
    cats = {u for b in bns for u in b.users}
    if len(cats) != 1 or any(len(b.users) != 1 for b in bns):
        return None
    cat = cats.pop()
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if getattr(cat.target, "__name__", "") not in ("cat", "concat", "concatenate") or dim != 0:
        return None
    if list(parts or ()) != bns:
        return None
    source = split.args[0]
    with graph.inserting_before(cat):
        bn = graph.call_module(bns[0].target, (source,))
    bn.meta = dict(cat.meta)
    bn.meta["ghost_chunks"] = len(bns)
    cat.replace_all_uses_with(bn)
    for n in [cat, *bns, *items, split]:
        graph.erase_node(n)
    return str(bns[0].target)
