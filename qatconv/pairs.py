"""Find the Linear -> BatchNorm1d pairs that may fold, and say why the others may not.

Analysis only: `find_pairs` never changes the model it is given. It traces a copy (torch.fx
writes tensor constants onto the traced root), runs shape propagation on a deep copy in eval
mode without gradients, and returns a `PairScan`.

Rules (README.md, "Find pairs"). A `Linear` L and a `BatchNorm1d` B pair when, in the graph
traced in eval mode:

* B's input is L's output, directly or through shape-only ops that keep the feature axis last
  (`flatten(0, 1)`, `flatten(s, e)` with `e <= -2`, `reshape`/`view` whose last size is
  L.out_features or `x.size(-1)` / `x.shape[-1]` of the chain, `contiguous()`, `nn.Identity`,
  `nn.Flatten(0, 1)`, as tensor methods, torch functions or modules). Other order-preserving
  reshapes (`view(x.size(0), -1)`, `unsqueeze(0)`, ...) are accepted only when a sample shows
  that they leave L.out_features as the last dimension. Ops that move axes (transpose,
  permute, ...) are never accepted;
* L's output and every intermediate have no other user (shape queries such as `x.size()` or
  `x.shape` do not count: they read no values);
* L and B each run exactly once: call sites are counted per module object (a module reached
  under two names counts once per call under either name, a Linear inside another called
  leaf module counts too), a module reachable under two paths, parameters tied to another
  module, or tensors read directly by `forward` (`self.fc.weight`) count as reuse;
* B is exactly `nn.BatchNorm1d`, tracks running stats and has both running buffers;
  L is an `nn.Linear` (or a subclass that keeps `nn.Linear.forward`), initialized, with no
  parametrization and no forward hooks;
* B.num_features == L.out_features;
* with a sample, B's input is 2D `(N, C)` with C == L.out_features (a 3D input to
  BatchNorm1d normalizes dim 1, not the Linear's features). Without a sample the pair folds
  with `verified=False`, or with `strict=True` goes to `skipped` as `unverified`.

When a pair fails several rules, the first failing rule in this order gives the code:
unsupported-bn, unsupported-linear, shape-op-changes-axis, linear-reused, bn-reused,
multiple-users, no-running-stats, feature-mismatch, wrong-axis, unverified. Every
BatchNorm1d the graph calls appears exactly once in `pairs` or `skipped`; other BatchNorm
classes (SyncBatchNorm, lazy or custom subclasses, BatchNorm2d) appear only when fed by a
Linear (`unsupported-bn`).

`bn_before_linear` lists BatchNorm1d -> Linear (BN output consumed only by that Linear, both
run once, running stats, B.num_features == L.in_features, BN input 2D when a sample is given);
a BN that already folds into a preceding Linear is not listed there.

When tracing fails and a sample is given, the model runs once on it in eager mode while
`qatconv.record` writes down which module or op consumed which tensor, as an fx graph of the
same node kinds; the same rules run on that graph (`traced=False`, `recorded_shapes` holds the
sample's shapes: the dataflow is proven for inputs of those shapes only). A BatchNorm1d called
on batch chunks whose outputs are concatenated back (ghost BN) is merged into one call there
(`ghost_bns`). When tracing fails without a sample (or the recording cannot be made), adjacent
`Linear, BatchNorm1d` children of every `nn.Sequential` are used instead (`traced=False`, `trace_error` holds the first line of the error). Modules
reachable under two paths are skipped as reused. With a sample, forward hooks on a deep copy
check that each module runs once, that the BN's input is the Linear's output tensor and that
it is 2D; such pairs are `verified`. Sole use of the Linear's output cannot be checked
without a graph. BatchNorm1d modules with unknown input are skipped as `untraced`.

`PairScan.to_json()` schema (version 1; keys never change meaning)::

    {
      "version": 1,
      "traced": bool,
      "trace_error": str | null,
      "pairs": [{"linear": str, "bn": str, "qat": str, "eps": float,
                 "momentum": float | null, "in_features": int, "out_features": int,
                 "bias": bool, "affine": bool,
                 "verified": bool, "token_wise": bool, "via": [str, ...]}],
      "skipped": [{"linear": str | null, "bn": str | null, "code": str, "reason": str}],
      "bn_before_linear": [{"bn": str, "linear": str, "verified": bool}],
      "recorded": null | {"input_shapes": [[int, ...], ...], "ghost_bns": [str, ...]}
    }

`via` names the shape ops between Linear and BN: the method or function name
(`"flatten"`, `"reshape"`) or, for a module, its path.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import itertools
import logging
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from qatconv.errors import DataError, describe
from qatconv.pair_record import PairRecord
from qatconv.record import TensorMeta

__all__ = [
    "SKIP_CODES",
    "BnBeforeLinear",
    "Pair",
    "PairScan",
    "SkippedPair",
    "find_pairs",
]

log = logging.getLogger(__name__)

JSON_VERSION = 1

SKIP_CODES: dict[str, str] = {
    "unsupported-bn": (
        "The normalization after the Linear is not exactly torch.nn.BatchNorm1d (SyncBatchNorm, "
        "a lazy or custom subclass, a hooked BN), which LinearBn1d cannot take."
    ),
    "unsupported-linear": (
        "The Linear overrides forward, is still uninitialized (LazyLinear), is parametrized or "
        "has forward hooks, so its output is not known to be x @ W.T + b."
    ),
    "shape-op-changes-axis": (
        "A shape op between Linear and BatchNorm1d moves the Linear's feature axis away from "
        "the last position (transpose, permute, flatten of the last dim), or cannot be shown "
        "to keep it there without a sample input."
    ),
    "linear-reused": (
        "The Linear runs more than once, is reachable under two paths, shares its parameters "
        "or is read directly by forward, so folding the BN into it would change its other uses."
    ),
    "bn-reused": (
        "The BatchNorm1d runs more than once, is reachable under two paths or shares its "
        "tensors, so it cannot disappear into one Linear."
    ),
    "multiple-users": (
        "The Linear's output (or a reshape of it on the way to the BN) is also used elsewhere, "
        "and that use would see normalized values after folding."
    ),
    "no-running-stats": (
        "The BatchNorm1d has no running statistics (track_running_stats=False), so eval mode "
        "normalizes with batch statistics and there is nothing fixed to fold."
    ),
    "feature-mismatch": (
        "BatchNorm1d.num_features differs from Linear.out_features, so the BN does not "
        "normalize the Linear's output features."
    ),
    "wrong-axis": (
        "On the sample input the BatchNorm1d does not get a 2D (N, C) tensor whose C is the "
        "Linear's feature axis (a 3D input is normalized along dim 1), so it normalizes "
        "another axis."
    ),
    "unverified": (
        "No sample input was given, so the BN's axis could not be checked by shape "
        "propagation, and strict mode skips what it cannot prove."
    ),
    "not-adjacent": (
        "The BatchNorm1d is not fed by a Linear, directly or through shape-only ops; only "
        "Linear -> BatchNorm1d folds."
    ),
    "untraced": (
        "The model could not be traced by torch.fx and this BatchNorm1d is not right after a "
        "Linear inside an nn.Sequential, so its input is unknown."
    ),
}


@dataclass(frozen=True)
class Pair:
    """A Linear -> BatchNorm1d pair that folds; paths as in `named_modules()`."""

    linear: str
    bn: str
    eps: float
    momentum: float | None
    in_features: int
    out_features: int
    bias: bool
    affine: bool
    verified: bool
    token_wise: bool
    via: tuple[str, ...] = ()

    def to_record(self) -> PairRecord:
        """The pair record stored in checkpoint metadata."""
        return PairRecord(self.linear, self.bn, self.linear, self.eps, self.momentum,
                          self.in_features, self.out_features, self.bias, self.affine)


@dataclass(frozen=True)
class SkippedPair:
    """A BatchNorm (and the Linear feeding it, when there is one) that does not fold."""

    linear: str | None
    bn: str | None
    code: str
    reason: str


@dataclass(frozen=True)
class BnBeforeLinear:
    """A BatchNorm1d whose output feeds only one Linear (foldable into that Linear's input)."""

    bn: str
    linear: str
    verified: bool


@dataclass(frozen=True)
class PairScan:
    """What `find_pairs` found: pairs that fold, skipped ones with reasons, how it looked."""

    pairs: tuple[Pair, ...]
    skipped: tuple[SkippedPair, ...]
    bn_before_linear: tuple[BnBeforeLinear, ...]
    traced: bool
    trace_error: str | None = None
    # Set when the pairs come from a recorded eager run (`qatconv.record`): they hold for
    # inputs of these shapes only.
    recorded_shapes: tuple[tuple[int, ...], ...] | None = None
    ghost_bns: tuple[str, ...] = ()  # BNs called per batch chunk, merged into one call

    @property
    def finder(self) -> str:
        """How the pairs were found: ``traced``, ``recorded`` (one eager run) or ``sequential``."""
        if self.traced:
            return "traced"
        return "recorded" if self.recorded_shapes is not None else "sequential"

    def finder_note(self) -> str | None:
        """One sentence on how an untraceable model's pairs were found (None when traced)."""
        if self.traced:
            return None
        if self.recorded_shapes is not None:
            shapes = ", ".join(str(tuple(s)) for s in self.recorded_shapes)
            ghosts = (f"; {len(self.ghost_bns)} ghost BatchNorm(s) called per batch chunk"
                      if self.ghost_bns else "")
            return (f"torch.fx could not trace the model ({self.trace_error}); the pairs come "
                    f"from one recorded eager run on the sample and are verified for input "
                    f"shape {shapes} only{ghosts}")
        return (f"torch.fx could not trace the model ({self.trace_error}); the pairs come from "
                "adjacent nn.Sequential children (give data to record an eager run instead)")

    def finder_json(self) -> dict[str, Any]:
        """The metadata record of how the pairs were found."""
        return {"method": self.finder, "trace_error": self.trace_error,
                "input_shapes": None if self.recorded_shapes is None
                else [list(s) for s in self.recorded_shapes],
                "ghost_bns": list(self.ghost_bns)}

    @property
    def unverified(self) -> tuple[Pair, ...]:
        """Pairs that fold but whose BN axis was not checked on a sample."""
        return tuple(p for p in self.pairs if not p.verified)

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form documented in this module's docstring."""
        return {
            "version": JSON_VERSION,
            "traced": self.traced,
            "trace_error": self.trace_error,
            "pairs": [
                {
                    **p.to_record().to_json(),
                    "verified": p.verified,
                    "token_wise": p.token_wise,
                    "via": list(p.via),
                }
                for p in self.pairs
            ],
            "skipped": [
                {"linear": s.linear, "bn": s.bn, "code": s.code, "reason": s.reason}
                for s in self.skipped
            ],
            "bn_before_linear": [
                {"bn": b.bn, "linear": b.linear, "verified": b.verified}
                for b in self.bn_before_linear
            ],
            "recorded": None if self.recorded_shapes is None else {
                "input_shapes": [list(s) for s in self.recorded_shapes],
                "ghost_bns": list(self.ghost_bns),
            },
        }


def find_pairs(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor | None = None,
    *,
    strict: bool = False,
) -> PairScan:
    """Find the Linear -> BatchNorm1d pairs of `model` that fold, and why others do not.

    Args:
        model: the float model; it is not modified (a copy is traced and run).
        example_inputs: a sample for `model(*example_inputs)`; a tensor means `(tensor,)`.
            With it, the BN's normalized axis is checked by shape propagation.
        strict: skip (code `unverified`) pairs whose axis could not be checked.

    Returns:
        A `PairScan`; see the module docstring for the rules and the JSON schema.

    Raises:
        DataError: the sample does not run through the model.
    """
    inputs = _as_inputs(example_inputs)
    lazy = _lazy_paths(model)  # before running a sample materializes the copy's lazy modules
    with _working_model(model, full=inputs is not None) as work:
        try:
            gm = _trace(work)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means: record or fallback
            error = describe(exc)
            recording = _record(work, inputs, error) if inputs is not None else None
            if recording is None:
                log.info("torch.fx could not trace the model (%s); using nn.Sequential order",
                         error)
                return _scan_untraced(work, inputs, strict, error, lazy)
            scan = _scan_graph(work, recording.graph, True, strict, lazy)
            return dataclasses.replace(scan, traced=False, trace_error=error,
                                       recorded_shapes=recording.input_shapes,
                                       ghost_bns=recording.ghost_bns)
        if inputs is not None:
            _propagate_shapes(gm, inputs)
        return _scan_graph(work, gm.graph, inputs is not None, strict, lazy)


def _record(work: nn.Module, inputs: tuple, error: str) -> Any:
    """The graph of one eager run on the sample (`qatconv.record`); None when it cannot be made."""
    from qatconv.record import record_graph

    try:
        return record_graph(work, inputs, _Tracer().is_leaf_module)
    except Exception as exc:  # noqa: BLE001 - the model's own error, or one of recording
        recording_error = exc
    try:  # the sample must run through the plain model: else it is the data's fault
        with torch.no_grad():
            work(*inputs)
    except Exception as exc:
        raise _sample_does_not_run(exc) from exc
    log.info("recording an eager run failed (%s) after torch.fx failed (%s)",
             describe(recording_error), error)
    return None


# --------------------------------------------------------------------------- helpers


def _as_inputs(example_inputs: tuple[Any, ...] | list[Any] | torch.Tensor | None) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _lazy_paths(model: nn.Module) -> frozenset[str]:
    return frozenset(
        path
        for path, mod in model.named_modules()
        if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params()
    )


@contextmanager
def _working_model(model: nn.Module, *, full: bool) -> Iterator[nn.Module]:
    """Yield an eval-mode copy of `model` to trace and run.

    Without a sample only the module structure is copied (tensors shared, nothing runs); with
    one the buffers are copied too, so running it (eval mode) cannot touch the caller's
    tensors, while the parameters, the bulk of a model's memory, stay shared: an eval forward
    does not write them (lazy ones, which the sample materializes, are copied). When the model
    cannot be copied, the model itself is used and its training flags and root attributes
    (torch.fx adds `_tensor_constant*` there) are restored afterwards.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if not isinstance(p, nn.parameter.UninitializedParameter):
            memo[id(p)] = p
    if not full:
        for t in model.buffers():
            memo[id(t)] = t
    try:
        work = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - un-copyable attribute: borrow the model itself
        log.info("model cannot be copied (%s); analysing it in place", describe(exc))
        work = None
    if work is not None:
        work.eval()
        yield work
        return
    flags = [(m, m.training) for m in model.modules()]
    root_attrs = set(vars(model))
    try:
        model.eval()
        yield model
    finally:
        for m, training in flags:
            m.training = training
        for key in set(vars(model)) - root_attrs:
            delattr(model, key)


class _Tracer(fx.Tracer):
    """symbolic_trace's tracer, keeping every Linear and BatchNorm a leaf (user subclasses too)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Linear, _BatchNorm)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(work: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(work)
    return fx.GraphModule(tracer.root, graph, type(work).__name__)


def _module_paths(work: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    for name, mod in work.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
    return paths


def _tensor_names(work: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, t in itertools.chain(
        work.named_parameters(remove_duplicate=False), work.named_buffers(remove_duplicate=False)
    ):
        names.setdefault(id(t), []).append(name)
    return names


def _own_tensors(mod: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        (n, t)
        for n, t in itertools.chain(
            mod.named_parameters(recurse=False), mod.named_buffers(recurse=False)
        )
        if t is not None
    ]


def _kind(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return "Linear"
    return "BatchNorm1d" if isinstance(mod, _BatchNorm) else type(mod).__name__


def _sharing_problem(
    mod: nn.Module,
    path: str,
    paths: dict[int, list[str]],
    names: dict[int, list[str]],
    read_ids: dict[int, str],
) -> str | None:
    """Why `mod` is reachable or used beyond its own module (None when it is not)."""
    kind = _kind(mod)
    others = [p for p in paths.get(id(mod), [path]) if p != path]
    if others:
        return f"{kind} '{path}' is also reachable as {_quoted(others)} in the module tree"
    prefixes = tuple(f"{p}." for p in paths.get(id(mod), [path]))
    for local, t in _own_tensors(mod):
        foreign = [n for n in names.get(id(t), []) if not n.startswith(prefixes)]
        if foreign:
            return f"{kind} '{path}' shares its {local} with {_quoted(foreign)}"
        if id(t) in read_ids:
            return f"{kind} '{path}' has its {local} read directly by forward ('{read_ids[id(t)]}')"
    return None


def _quoted(items: list[str]) -> str:
    return ", ".join(f"'{i}'" for i in items)


def _linear_problem(lin: nn.Linear, path: str, lazy: frozenset[str]) -> str | None:
    if path in lazy or isinstance(lin.weight, nn.parameter.UninitializedParameter):
        return f"Linear '{path}' is not initialized yet (lazy module); run one forward first"
    if type(lin).forward is not nn.Linear.forward:
        return f"Linear '{path}' is a {type(lin).__name__} with its own forward"
    if torch.nn.utils.parametrize.is_parametrized(lin):
        return f"Linear '{path}' has a parametrized weight"
    if lin._forward_hooks or lin._forward_pre_hooks:
        return f"Linear '{path}' has forward hooks that folding would bypass or change"
    return None


def _bn_problem(bn: nn.Module, path: str, lazy: frozenset[str]) -> str | None:
    if path in lazy:
        return f"'{path}' is a lazy BatchNorm that is not initialized yet"
    if type(bn) is not nn.BatchNorm1d:
        return f"'{path}' is a {type(bn).__name__}, not exactly torch.nn.BatchNorm1d"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return f"BatchNorm1d '{path}' has forward hooks that folding would drop"
    return None


def _unsupported(
    bn: nn.Module, bpath: str, lin: nn.Linear, lpath: str, lazy: frozenset[str]
) -> SkippedPair | None:
    """The first of the module-kind rules (`unsupported-bn`, `unsupported-linear`) a pair fails."""
    problem = _bn_problem(bn, bpath, lazy)
    if problem:
        return SkippedPair(lpath, bpath, "unsupported-bn",
                           f"{problem}; Linear '{lpath}' is left unfused")
    problem = _linear_problem(lin, lpath, lazy)
    if problem:
        return SkippedPair(lpath, bpath, "unsupported-linear",
                           f"{problem}; BatchNorm1d '{bpath}' is left unfused")
    return None


def _has_running_stats(bn: nn.Module) -> bool:
    return bool(
        bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
    )


def _make_pair(
    lin: nn.Linear,
    lpath: str,
    bn: nn.BatchNorm1d,
    bpath: str,
    verified: bool,
    token_wise: bool,
    via: tuple[str, ...],
) -> Pair:
    return Pair(
        linear=lpath,
        bn=bpath,
        eps=float(bn.eps),
        momentum=None if bn.momentum is None else float(bn.momentum),
        in_features=int(lin.in_features),
        out_features=int(lin.out_features),
        bias=lin.bias is not None,
        affine=bool(bn.affine),
        verified=verified,
        token_wise=token_wise,
        via=via,
    )


# --------------------------------------------------------------------------- graph scan

_ORDER_PRESERVING = frozenset(
    {
        "flatten",
        "reshape",
        "view",
        "contiguous",
        "unsqueeze",
        "squeeze",
        "unflatten",
        "reshape_as",
        "view_as",
        "identity",
    }
)
_AXIS_MOVING = frozenset(
    {
        "transpose",
        "permute",
        "t",
        "movedim",
        "moveaxis",
        "swapaxes",
        "swapdims",
        "T",
        "mT",
        "H",
        "mH",
        "adjoint",
    }
)
_SHAPE_FUNCTIONS: dict[Any, str] = {
    torch.flatten: "flatten",
    torch.reshape: "reshape",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
    torch.unflatten: "unflatten",
    torch.transpose: "transpose",
    torch.permute: "permute",
    torch.t: "t",
    torch.movedim: "movedim",
    torch.moveaxis: "moveaxis",
    torch.swapaxes: "swapaxes",
    torch.swapdims: "swapdims",
    torch.adjoint: "adjoint",
}
_QUERY_METHODS = frozenset(
    {"size", "dim", "numel", "ndimension", "nelement", "get_device", "is_contiguous", "__len__"}
)
_QUERY_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})


@dataclass(frozen=True)
class _ShapeOp:
    name: str  # normalized op name ("flatten", "identity", ...)
    label: str  # what `Pair.via` shows
    rest: tuple[Any, ...]  # arguments after the tensor
    kwargs: dict[str, Any]


def _shape_op(node: fx.Node, work: nn.Module) -> _ShapeOp | None:
    """Describe `node` when it is a shape-only op on its first argument, else None."""
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
        if name not in _ORDER_PRESERVING | _AXIS_MOVING:
            return None
        if name == "view" and any(isinstance(a, torch.dtype) for a in node.args[1:]):
            return None  # view(dtype) reinterprets bits
        return _ShapeOp(name, name, tuple(node.args[1:]), dict(node.kwargs))
    if node.op == "call_function":
        if node.target is builtins.getattr and len(node.args) == 2 and node.args[1] in _AXIS_MOVING:
            return _ShapeOp(str(node.args[1]), str(node.args[1]), (), {})
        name = _SHAPE_FUNCTIONS.get(node.target)
        if name is None:
            return None
        return _ShapeOp(name, name, tuple(node.args[1:]), dict(node.kwargs))
    if node.op == "call_module" and isinstance(node.target, str):
        mod = work.get_submodule(node.target)
        if type(mod) is nn.Identity:
            return _ShapeOp("identity", node.target, (), {})
        if type(mod) is nn.Flatten:
            return _ShapeOp("flatten", node.target, (mod.start_dim, mod.end_dim), {})
        if type(mod) is nn.Unflatten:
            return _ShapeOp("unflatten", node.target, (mod.dim, mod.unflattened_size), {})
    return None


def _arg(op: _ShapeOp, index: int, key: str, default: Any) -> Any:
    if len(op.rest) > index:
        return op.rest[index]
    return op.kwargs.get(key, default)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_feature_size(v: Any, out_features: int, chain: set[fx.Node]) -> bool:
    """Whether `v` is statically the feature size: the int itself, or size(-1) of the chain."""
    if _is_int(v):
        return v == out_features
    if not isinstance(v, fx.Node):
        return False
    if v.op == "call_method" and v.target == "size":
        dim = v.args[1] if len(v.args) > 1 else v.kwargs.get("dim")
        return dim == -1 and v.args[0] in chain
    if v.op == "call_function" and v.target is operator.getitem and v.args[1] == -1:
        src = v.args[0]
        if not isinstance(src, fx.Node):
            return False
        if src.op == "call_function" and src.target is builtins.getattr:
            return src.args[1] == "shape" and src.args[0] in chain
        if src.op == "call_method" and src.target == "size" and len(src.args) == 1:
            return src.args[0] in chain
    return False


def _static_kind(op: _ShapeOp, out_features: int, chain: set[fx.Node]) -> str:
    """'keep' (feature axis stays last), 'moves', or 'maybe' (a sample must decide)."""
    if op.name in _AXIS_MOVING:
        return "moves"
    if op.name in ("identity", "contiguous"):
        return "keep"
    if op.name == "flatten":
        start, end = _arg(op, 0, "start_dim", 0), _arg(op, 1, "end_dim", -1)
        if _is_int(start) and _is_int(end) and (end <= -2 or (start, end) == (0, 1)):
            return "keep"
        return "maybe"
    if op.name in ("reshape", "view"):
        if len(op.rest) == 1 and isinstance(op.rest[0], (tuple, list)):
            shape = tuple(op.rest[0])
        elif op.rest:
            shape = op.rest
        else:
            shape = tuple(op.kwargs.get("shape", op.kwargs.get("size", ())))
        if shape and _is_feature_size(shape[-1], out_features, chain):
            return "keep"
        return "maybe"
    if op.name == "unsqueeze":
        dim = _arg(op, 0, "dim", None)
        if _is_int(dim):
            if dim == 0 or dim <= -2:
                return "keep"
            if dim == -1:
                return "moves"
        return "maybe"
    if op.name in ("squeeze", "unflatten"):
        dim = _arg(op, 0, "dim", None)
        return "keep" if _is_int(dim) and dim <= -2 else "maybe"
    return "maybe"


def _input_node(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    for key in ("input", "self", "x"):
        if key in node.kwargs:
            return node.kwargs[key]
    return next(iter(node.kwargs.values()), None)


def _is_shape_query(user: fx.Node, node: fx.Node) -> bool:
    if (
        user.op == "call_method"
        and user.target in _LIKE_METHODS
        and len(user.args) == 2
        and user.args[0] is not node
        and user.args[1] is node
        and node not in user.kwargs.values()
    ):
        # `y.reshape_as(x)`: x only lends its shape (timm LeViT's `bn(x.flatten(0, 1))
        # .reshape_as(x)`), and folding does not change the Linear output's shape.
        return True
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target in _QUERY_METHODS
    if user.op == "call_function":
        if user.target is builtins.getattr:
            return len(user.args) == 2 and user.args[1] in _QUERY_ATTRS
        return user.target is torch.numel
    return False


# Modules that pass their input through unchanged in eval mode.
_EVAL_IDENTITY = (nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.Identity)

# Tensor methods whose second argument is only read for its shape.
_LIKE_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _is_shape_query(u, node)]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f"the tensor method {node.target}()"
    if node.op == "call_function":
        return f"the function {getattr(node.target, '__name__', str(node.target))}()"
    if node.op == "get_attr":
        return f"the attribute '{node.target}'"
    return f"node {node.name}"


@dataclass
class _Chain:
    linear: fx.Node | None
    via: list[fx.Node]  # Linear side first
    stop: Any  # what the walk stopped at when no Linear was found


def _walk_back(bn_node: fx.Node, work: nn.Module) -> _Chain:
    via: list[fx.Node] = []
    cur = _input_node(bn_node)
    while isinstance(cur, fx.Node):
        if cur.op == "call_module" and isinstance(work.get_submodule(str(cur.target)), nn.Linear):
            return _Chain(cur, via[::-1], None)
        if _shape_op(cur, work) is None:
            break
        via.append(cur)
        cur = _input_node(cur)
    return _Chain(None, via[::-1], cur)


class _GraphFacts:
    """Call sites, aliases and tensor sharing of a traced model."""

    def __init__(self, work: nn.Module, graph: fx.Graph, lazy: frozenset[str]) -> None:
        self.work = work
        self.lazy = lazy
        self.paths = _module_paths(work)
        self.names = _tensor_names(work)
        self.sites: dict[int, list[str]] = {}
        self.read_ids: dict[int, str] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                for sub in work.get_submodule(node.target).modules():
                    self.sites.setdefault(id(sub), []).append(node.target)
            elif node.op == "get_attr":
                obj = _resolve(work, node.target)
                if isinstance(obj, torch.Tensor):
                    self.read_ids.setdefault(id(obj), node.target)
                elif isinstance(obj, nn.Module):
                    for t in itertools.chain(obj.parameters(), obj.buffers()):
                        self.read_ids.setdefault(id(t), node.target)

    def reuse(self, mod: nn.Module, path: str) -> str | None:
        sites = self.sites.get(id(mod), [])
        if len(sites) > 1:
            names = list(dict.fromkeys(sites))
            called_as = f" (called as {_quoted(names)})" if names != [path] else ""
            return f"{_kind(mod)} '{path}' runs {len(sites)} times in the model's graph{called_as}"
        return _sharing_problem(mod, path, self.paths, self.names, self.read_ids)


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*inputs)
    except Exception as exc:
        raise _sample_does_not_run(exc) from exc


class _ShapeRecorder(fx.Interpreter):
    """What ``torch.fx.passes.shape_prop.ShapeProp`` records that the pair rules read: each node
    that computes tensors gets ``meta["tensor_meta"]``, a `TensorMeta` (or, for a tuple or list
    of tensors, the same structure of them). ShapeProp imports sympy and
    torch.fx.experimental.symbolic_shapes (0.65-1.0 s a process) for its fake-tensor mode,
    which a run on a real sample never uses."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        found = False

        def meta(value: Any) -> Any:
            nonlocal found
            if not isinstance(value, torch.Tensor):
                return value
            found = True
            return TensorMeta(tuple(int(s) for s in value.shape), value.dtype)

        tensor_meta = fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tensor_meta
        return result


def _scan_graph(
    work: nn.Module, graph: fx.Graph, sampled: bool, strict: bool, lazy: frozenset[str]
) -> PairScan:
    """The pair rules on a graph: traced (shapes propagated when sampled) or recorded."""
    facts = _GraphFacts(work, graph, lazy)

    # one entry per BatchNorm module, at its first call site that a Linear feeds (else the first)
    bn_sites: dict[int, list[fx.Node]] = {}
    order: list[int] = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(work.get_submodule(node.target), _BatchNorm):
            key = id(work.get_submodule(node.target))
            if key not in bn_sites:
                bn_sites[key] = []
                order.append(key)
            bn_sites[key].append(node)

    pairs: list[Pair] = []
    skipped: list[SkippedPair] = []
    for key in order:
        sites = bn_sites[key]
        chains = [(n, _walk_back(n, work)) for n in sites]
        fed = [(n, c) for n, c in chains if c.linear is not None]
        bn_node, chain = fed[0] if fed else chains[0]
        result = _judge(work, facts, bn_node, chain, sampled, strict)
        if result is None:
            continue
        if isinstance(result, Pair):
            pairs.append(result)
        else:
            skipped.append(result)

    folded_bns = {p.bn for p in pairs}
    before = _bn_before_linear(work, graph, facts, folded_bns, sampled)
    return PairScan(tuple(pairs), tuple(skipped), before, traced=True, trace_error=None)


def _judge(
    work: nn.Module,
    facts: _GraphFacts,
    bn_node: fx.Node,
    chain: _Chain,
    sampled: bool,
    strict: bool,
) -> Pair | SkippedPair | None:
    """Apply the pair rules, in order, to the BN at ``bn_node`` and the chain feeding it."""
    bpath = str(bn_node.target)
    bn = work.get_submodule(bpath)
    if chain.linear is None:
        return _judge_unfed(work, bn, bpath, chain)
    lpath = str(chain.linear.target)
    lin = work.get_submodule(lpath)
    out = int(lin.out_features)
    skipped = (
        _unsupported(bn, bpath, lin, lpath, facts.lazy)
        or _judge_shape_ops(work, chain, lpath, bpath, out, sampled)
        or _reuse_skip("linear-reused", facts.reuse(lin, lpath), lpath, bpath)
        or _reuse_skip("bn-reused", facts.reuse(bn, bpath), lpath, bpath)
        or _judge_users(work, chain, bn_node, lpath, bpath)
        or _stats_rule(lin, lpath, bn, bpath)
    )
    if skipped:
        return skipped
    if sampled:
        bn_in = _input_node(bn_node)
        shape = _shape(bn_in) if isinstance(bn_in, fx.Node) else None
        wrong = _axis_rule(shape, out, lpath, bpath)
        if wrong:
            return wrong
        lin_shape = _shape(chain.linear)
        token_wise = lin_shape is not None and len(lin_shape) != 2
    else:
        token_wise = any(
            (op := _shape_op(n, work)) is not None and op.name not in ("identity", "contiguous")
            for n in chain.via
        )
        if strict:
            return _skip("unverified", lpath, bpath, why="no sample input")
    via = tuple(_label(n, work) for n in chain.via)
    return _make_pair(lin, lpath, bn, bpath, sampled, token_wise, via)


def _judge_unfed(work: nn.Module, bn: nn.Module, bpath: str, chain: _Chain) -> SkippedPair | None:
    """A BN no Linear feeds: a skip for a BatchNorm1d, nothing for other BNs."""
    if type(bn) is not nn.BatchNorm1d:
        return None  # BatchNorm2d after a conv, SyncBatchNorm elsewhere: not our business
    what = _describe(chain.stop)
    if chain.via:
        what += " (through " + ", ".join(_label(n, work) for n in chain.via) + ")"
    return _skip("not-adjacent", None, bpath, what=what)


def _judge_shape_ops(
    work: nn.Module, chain: _Chain, lpath: str, bpath: str, out: int, sampled: bool
) -> SkippedPair | None:
    """The shape-only ops between the Linear and the BN must keep the feature axis last."""
    seen: set[fx.Node] = {chain.linear} if chain.linear is not None else set()
    for node in chain.via:
        op = _shape_op(node, work)
        assert op is not None  # _walk_back only collects shape ops
        kind = _static_kind(op, out, seen)
        if kind == "moves":
            return _skip("shape-op-changes-axis", lpath, bpath, op=op.label,
                         how="moves the Linear's feature axis away from the last position")
        if kind == "maybe":
            shape = _shape(node) if sampled else None
            if shape is None:
                return _skip("shape-op-changes-axis", lpath, bpath, op=op.label,
                             how="cannot be shown to keep the feature axis last without a "
                             "sample input")
            if not shape or shape[-1] != out:
                return _skip("shape-op-changes-axis", lpath, bpath, op=op.label,
                             how=f"turns the {out} features into a last dimension of "
                             f"{shape[-1] if shape else 'nothing'} (shape {tuple(shape)})")
        seen.add(node)
    return None


def _judge_users(
    work: nn.Module, chain: _Chain, bn_node: fx.Node, lpath: str, bpath: str
) -> SkippedPair | None:
    """The Linear's output (and each step after it) must feed only the next step."""
    assert chain.linear is not None
    steps = [chain.linear, *chain.via]
    for node, nxt in zip(steps, [*chain.via, bn_node], strict=True):
        users = _value_users(node)
        if users != [nxt]:
            others = [_describe(u) for u in users if u is not nxt]
            where = "output" if node is chain.linear else f"output after {_label(node, work)}()"
            return _skip("multiple-users", lpath, bpath, where=where, others=", ".join(others))
    return None


# The message of each skip, by code (a suffix names a variant of the same rule): the traced
# scan (`_judge`) and the fallback scan (`_judge_untraced`) use the same words for one rule.
_SKIP_MESSAGES: dict[str, str] = {
    "not-adjacent": "BatchNorm1d '{bn}' is fed by {what}, not by a Linear; only Linear -> "
                    "BatchNorm1d folds",
    "not-adjacent-sample": "on the sample, BatchNorm1d '{bn}' does not receive the output of "
                           "Linear '{linear}', although they are neighbours in an nn.Sequential",
    "shape-op-changes-axis": "{op}() between Linear '{linear}' and BatchNorm1d '{bn}' {how}",
    "linear-reused": "{problem}; folding BatchNorm1d '{bn}' into it would change its other uses",
    "linear-reused-calls": "Linear '{linear}' runs {n} times on the sample; folding "
                           "BatchNorm1d '{bn}' into it would change its other calls",
    "bn-reused": "{problem}; it cannot fold into Linear '{linear}' alone",
    "bn-reused-calls": "BatchNorm1d '{bn}' runs {n} times on the sample; it cannot fold into "
                       "Linear '{linear}' alone",
    "multiple-users": "the {where} of Linear '{linear}' is also used by {others}, which would "
                      "see the normalized values of BatchNorm1d '{bn}' after folding",
    "no-running-stats": "BatchNorm1d '{bn}' has no running statistics "
                        "(track_running_stats=False), so it cannot fold into Linear '{linear}'",
    "feature-mismatch": "BatchNorm1d '{bn}' has num_features={features} but Linear '{linear}' "
                        "has out_features={out}",
    "wrong-axis": "on the sample, BatchNorm1d '{bn}' gets shape {shape} from Linear "
                  "'{linear}': it normalizes dim 1, not the Linear's {out} features "
                  "(needs a 2D (N, C) input)",
    "unverified": "{why}, so the axis BatchNorm1d '{bn}' normalizes after Linear '{linear}' "
                  "cannot be checked; strict mode skips it",
}


def _skip(message: str, lpath: str | None, bpath: str, **fields: object) -> SkippedPair:
    """A skip worded by ``_SKIP_MESSAGES[message]``; its code is ``message`` without a
    ``-sample`` / ``-calls`` variant suffix."""
    code = message.removesuffix("-sample").removesuffix("-calls")
    return SkippedPair(lpath, bpath, code,
                       _SKIP_MESSAGES[message].format(linear=lpath, bn=bpath, **fields))


def _reuse_skip(code: str, problem: str | None, lpath: str, bpath: str) -> SkippedPair | None:
    return _skip(code, lpath, bpath, problem=problem) if problem else None


def _stats_rule(lin: nn.Module, lpath: str, bn: nn.Module, bpath: str) -> SkippedPair | None:
    """The BN must track running statistics and normalize the Linear's out_features."""
    if not _has_running_stats(bn):
        return _skip("no-running-stats", lpath, bpath)
    if int(bn.num_features) != int(lin.out_features):
        return _skip("feature-mismatch", lpath, bpath, features=bn.num_features,
                     out=int(lin.out_features))
    return None


def _axis_rule(
    shape: tuple[int, ...] | None, out: int, lpath: str, bpath: str
) -> SkippedPair | None:
    """On a sample, the BN's input must be (N, out): it normalizes dim 1."""
    if shape is None or len(shape) != 2 or shape[-1] != out:
        return _skip("wrong-axis", lpath, bpath, shape=shape, out=out)
    return None


def _label(node: fx.Node, work: nn.Module) -> str:
    op = _shape_op(node, work)
    return op.label if op is not None else node.name


def _bn_before_linear(
    work: nn.Module,
    graph: fx.Graph,
    facts: _GraphFacts,
    folded_bns: set[str],
    sampled: bool,
) -> tuple[BnBeforeLinear, ...]:
    found: list[BnBeforeLinear] = []
    seen: set[int] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = work.get_submodule(node.target)
        if type(bn) is not nn.BatchNorm1d or id(bn) in seen or node.target in folded_bns:
            continue
        seen.add(id(bn))
        bpath = str(node.target)
        lazy = facts.lazy
        if _bn_problem(bn, bpath, lazy) or facts.reuse(bn, bpath) or not _has_running_stats(bn):
            continue
        users = _value_users(node)
        prev = node
        # Dropout and Identity are the identity in eval mode, the mode a folded model runs in
        # (timm's NormLinear head is BN -> Dropout -> Linear).
        while (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(work.get_submodule(users[0].target), _EVAL_IDENTITY)
            and _input_node(users[0]) is prev
        ):
            prev = users[0]
            users = _value_users(prev)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        user = users[0]
        lin = work.get_submodule(user.target)
        lpath = str(user.target)
        if not isinstance(lin, nn.Linear) or _input_node(user) is not prev:
            continue
        if _linear_problem(lin, lpath, lazy) or facts.reuse(lin, lpath):
            continue
        if int(bn.num_features) != int(lin.in_features):
            continue
        if sampled:
            bn_in = _input_node(node)
            shape = _shape(bn_in) if isinstance(bn_in, fx.Node) else None
            if shape is None or len(shape) != 2 or shape[-1] != bn.num_features:
                continue
        found.append(BnBeforeLinear(bpath, lpath, sampled))
    return tuple(found)


# --------------------------------------------------------------------------- fallback scan


def _scan_untraced(
    work: nn.Module, inputs: tuple | None, strict: bool, error: str, lazy: frozenset[str]
) -> PairScan:
    paths = _module_paths(work)
    names = _tensor_names(work)
    canonical = {key: ps[0] for key, ps in paths.items()}

    candidates: list[tuple[nn.Module, nn.Module]] = []  # (linear, bn) adjacent in a Sequential
    preceded: dict[int, nn.Module] = {}  # bn id -> previous sibling in some Sequential
    for _, seq in work.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = [m for m in seq._modules.values() if m is not None]
        for prev, cur in itertools.pairwise(kids):
            if isinstance(cur, _BatchNorm):
                preceded.setdefault(id(cur), prev)
                if isinstance(prev, nn.Linear):
                    candidates.append((prev, cur))

    calls: dict[int, list[Any]] = {}
    if inputs is not None:
        calls = _hook_calls(work, candidates, inputs)

    pairs: list[Pair] = []
    skipped: list[SkippedPair] = []
    judged: set[int] = set()
    for lin, bn in candidates:
        if id(bn) in judged:
            continue
        judged.add(id(bn))
        lpath, bpath = canonical[id(lin)], canonical[id(bn)]
        result = _judge_untraced(
            lin, lpath, bn, bpath, paths, names, calls if inputs is not None else None, strict, lazy
        )
        (pairs if isinstance(result, Pair) else skipped).append(result)  # type: ignore[arg-type]

    for path, mod in work.named_modules():
        if type(mod) is not nn.BatchNorm1d or id(mod) in judged:
            continue
        prev = preceded.get(id(mod))
        if prev is not None:
            skipped.append(
                SkippedPair(
                    None,
                    path,
                    "not-adjacent",
                    f"BatchNorm1d '{path}' follows module '{canonical[id(prev)]}' "
                    f"({type(prev).__name__}) in its nn.Sequential, not a Linear",
                )
            )
        else:
            skipped.append(
                SkippedPair(
                    None,
                    path,
                    "untraced",
                    f"the model could not be traced ({error}) and BatchNorm1d '{path}' is not right "
                    "after a Linear in an nn.Sequential, so its input is unknown",
                )
            )
    return PairScan(tuple(pairs), tuple(skipped), (), traced=False, trace_error=error)


def _hook_calls(
    work: nn.Module, candidates: list[tuple[nn.Module, nn.Module]], inputs: tuple
) -> dict[int, list[Any]]:
    """Run the sample once; per module id, the Linear outputs / BN inputs seen, in order."""
    calls: dict[int, list[Any]] = {}
    handles = []

    def after_linear(mod: nn.Module, args: Any, output: Any) -> None:
        calls.setdefault(id(mod), []).append(output)

    def before_bn(mod: nn.Module, args: Any) -> None:
        calls.setdefault(id(mod), []).append(args[0] if args else None)

    try:
        for lin, bn in candidates:
            if id(lin) not in calls:
                calls[id(lin)] = []
                handles.append(lin.register_forward_hook(after_linear))
            if id(bn) not in calls:
                calls[id(bn)] = []
                handles.append(bn.register_forward_pre_hook(before_bn))
        with torch.no_grad():
            work(*inputs)
    except Exception as exc:
        raise _sample_does_not_run(exc) from exc
    finally:
        for h in handles:
            h.remove()
    return calls


def _judge_untraced(
    lin: nn.Linear,
    lpath: str,
    bn: nn.Module,
    bpath: str,
    paths: dict[int, list[str]],
    names: dict[int, list[str]],
    calls: dict[int, list[Any]] | None,
    strict: bool,
    lazy: frozenset[str],
) -> Pair | SkippedPair:
    """The pair rules of `_judge` for neighbours in an nn.Sequential (no graph), same order."""
    outs, ins = (calls.get(id(lin), []), calls.get(id(bn), [])) if calls is not None else ([], [])
    skipped = (
        _unsupported(bn, bpath, lin, lpath, lazy)
        or _reuse_skip("linear-reused", _sharing_problem(lin, lpath, paths, names, {}), lpath,
                       bpath)
        or _reuse_skip("bn-reused", _sharing_problem(bn, bpath, paths, names, {}), lpath, bpath)
        or (_skip("linear-reused-calls", lpath, bpath, n=len(outs)) if len(outs) > 1 else None)
        or (_skip("bn-reused-calls", lpath, bpath, n=len(ins)) if len(ins) > 1 else None)
        or _stats_rule(lin, lpath, bn, bpath)
    )
    if skipped:
        return skipped
    verified = False
    if len(outs) == 1 and len(ins) == 1:
        if ins[0] is not outs[0]:
            return _skip("not-adjacent-sample", lpath, bpath)
        shape = tuple(ins[0].shape) if isinstance(ins[0], torch.Tensor) else None
        wrong = _axis_rule(shape, int(lin.out_features), lpath, bpath)
        if wrong:
            return wrong
        verified = True
    if not verified and strict:
        why = "no sample input" if calls is None else "the sample did not run both modules"
        return _skip("unverified", lpath, bpath, why=why)
    return _make_pair(lin, lpath, bn, bpath, verified, False, ())


def _sample_does_not_run(exc: Exception) -> DataError:
    """The error for a sample the plain model itself rejects (the data's fault, not a scan's)."""
    return DataError(
        f"the sample input does not run through the model: {describe(exc)}",
        hint="give example inputs that `model(*inputs)` accepts (shape, dtype, device)",
    )
