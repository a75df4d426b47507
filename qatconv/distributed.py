"""`prepare` on several processes: torchrun's environment, one process group, the global batch
split across ranks, BatchNorm statistics and activation ranges reduced across ranks, and a
failure on any rank ending every rank with that rank's exit code.

How a run is laid out (see DESIGN.md, `prepare --nproc`):

- ``torchrun --nproc-per-node N -m qatconv prepare ...`` (or ``qatconv prepare --nproc N``, which
  runs that through `torch.distributed.run`) starts N ranks; each reads `Launch` from torchrun's
  environment and joins one process group: gloo on CPU, nccl on CUDA with one device per local
  rank. Every collective times out (``QATCONV_DIST_TIMEOUT`` seconds, default 300).
- Every rank draws the same seeded global batch as a one-process run and takes its contiguous
  slice (`Replica.shard`). DDP averages the gradients; each rank's loss is weighted by its share
  of the global batch, so the average equals the one-process gradient of the global batch.
- BatchNorm in training mode normalizes with the statistics of the global batch
  (`CrossRankBatchNorm1d`: per-channel sum, sum of squares and count summed across ranks by an
  all-reduce that autograd differentiates). torch's SyncBatchNorm runs on CUDA only; this one
  runs on both, so the path the CPU tests check is the path a GPU run takes.
- Activation observers see the global batch's min/max (`sync_input_observers_`); weight
  observers see the same weights on every rank (identical averaged gradients).
- A rank that fails publishes ``(rank, exit code, message)`` in the process group's store before
  it exits; a rank whose collective then breaks (or that torchrun stops with SIGTERM) reads it
  and exits with the same code. Only rank 0 prints results; the failing rank prints its error.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from qatconv.errors import QatconvError, UsageError, describe
from qatconv.threads import usable_cpus  # affinity and cgroup CPU quota

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

TIMEOUT_ENV = "QATCONV_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_ERROR_KEY = "qatconv/error"
# How long a rank whose collective broke waits for the failing rank's published error.
_PEER_ERROR_WAIT_S = 5.0


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch (read from the environment, no torch)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Launch | None:
        """The launch torchrun describes in ``env``; None for a plain one-process run.

        Raises:
            UsageError: torchrun's variables are present but not integers.
        """
        env = dict(os.environ) if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            world = int(env["WORLD_SIZE"])
            launch = cls(int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"])),
                         int(env.get("LOCAL_WORLD_SIZE", world)))
        except ValueError:
            raise UsageError(
                "RANK / WORLD_SIZE / LOCAL_RANK in the environment are not integers",
                hint="start distributed runs with torchrun or qatconv prepare --nproc N",
            ) from None
        return launch if world > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True unless this process is a rank other than 0 of a torchrun launch."""
    launch = Launch.from_env()
    return launch is None or launch.is_main


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


# ------------------------------------------------------------------------------------ failures


@dataclass(frozen=True)
class Failure:
    """The first failure of a run: which rank, its exit code and its error."""

    rank: int
    exit_code: int
    message: str
    hint: str | None = None

    def to_json(self) -> str:
        return json.dumps({"rank": self.rank, "exit_code": self.exit_code,
                           "message": self.message, "hint": self.hint})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Failure:
        obj = json.loads(raw)
        return cls(int(obj["rank"]), int(obj["exit_code"]), str(obj["message"]), obj.get("hint"))


class RankFailedError(QatconvError):
    """A distributed run failed on ``failure.rank``: every rank exits with its code.

    ``echo``: print the error line on this rank's stderr (the failing rank does); ``json``:
    this rank owns stdout (rank 0).
    """

    def __init__(self, failure: Failure, *, echo: bool, json: bool) -> None:
        super().__init__(f"rank {failure.rank}: {failure.message}", failure.hint)
        self.exit_code = failure.exit_code
        self.failure = failure
        self.echo = echo
        self.json = json


def exit_status(e: BaseException) -> tuple[int, str, str | None]:
    """Exit code, message and hint of an exception, as `qatconv.cli.main` reports it."""
    if isinstance(e, QatconvError):
        return e.exit_code, e.message, e.hint
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted; no output was written", None
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return 1, "out of memory", "use a smaller --batch-size, or more memory per process"
    if _is_peer_loss(e):
        lost = ("lost contact with another rank (it was killed, ran out of memory, or its "
                "machine went away)")
        return 1, lost, f"its log says why; collectives time out after {TIMEOUT_ENV} seconds"
    if isinstance(e, OSError):
        return 3, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", None
    return 1, f"internal error: {describe(e)}", \
        "this is a bug in qatconv: rerun with --debug and report the traceback"


# What gloo and NCCL say when a peer is gone or silent (they raise plain RuntimeErrors).
_PEER_LOSS_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "timed out",
                    "broken pipe")


def _is_peer_loss(e: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _PEER_LOSS_WORDS)
    )


def _store() -> Any:
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=_PEER_ERROR_WAIT_S))
    return store


def _wait_for_key(store: Any, seconds: float) -> None:
    """Poll (quietly: a timed-out `store.wait` logs a warning) until the key or the deadline."""
    import time

    deadline = time.monotonic() + seconds
    try:
        while not store.check([_ERROR_KEY]) and time.monotonic() < deadline:
            time.sleep(0.05)
    except BaseException as e:  # noqa: BLE001 - a second SIGTERM or a dead store: stop waiting
        log.debug("stopped waiting for another rank's error: %r", e)


# Set by `launch_local` for its ranks.
_LAUNCHER_ENV = "QATCONV_LOCAL_LAUNCHER"


def resolve_failure(launch: Launch, e: BaseException) -> RankFailedError:
    """The run's first failure, given that this rank stopped with ``e``.

    An error of this rank's own is published unless another rank's came first; a broken
    collective (or torchrun's SIGTERM after another rank died) adopts the published one.
    """
    own = Failure(launch.rank, *exit_status(e))
    peer_loss = isinstance(e, KeyboardInterrupt) or _is_peer_loss(e)
    try:
        store = _store()
        if peer_loss:
            _wait_for_key(store, _PEER_ERROR_WAIT_S)
        first = Failure.from_json(store.compare_set(_ERROR_KEY, "", own.to_json()))
    except BaseException as store_error:  # noqa: BLE001 - the store went away with its host
        log.debug("cannot reach the store: %r", store_error)
        first = own
    # A rank killed by a signal publishes nothing; under `--nproc` the local launcher learns
    # its signal and prints the run's one JSON error, so rank 0 must not print a second one.
    by_launcher = peer_loss and first.rank == launch.rank and os.environ.get(_LAUNCHER_ENV) == "1"
    return RankFailedError(first, echo=first.rank == launch.rank,
                           json=launch.is_main and not by_launcher)


# ------------------------------------------------------------------------------------- session


@dataclass(frozen=True)
class Replica:
    """This rank's part in a distributed run, and the collectives it joins (all time out)."""

    launch: Launch
    device: torch.device
    group: Any  # the process group for statistics (DDP uses the default one)
    timeout: float

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch of sample indices."""
        return idx.tensor_split(self.world_size)[self.rank]

    def row_range(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice ``[lo, hi)`` of ``n`` data rows (for passes over data)."""
        lo = n * self.rank // self.world_size
        return lo, n * (self.rank + 1) // self.world_size

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (on this rank's device); returns ``t``."""
        import torch.distributed as dist

        moved = t.to(self.device)
        dist.all_reduce(moved, group=self.group)
        t.copy_(moved)
        return t

    def weighted_loss(
        self, loss: torch.Tensor, n_local: int, n_global: int
    ) -> tuple[torch.Tensor, float]:
        """The loss to differentiate on this rank, and the global batch's loss.

        DDP averages gradients over ranks; weighting each rank's mean loss by
        ``world * n_local / n_global`` makes that average the gradient of the global mean.
        """
        import torch

        weight = self.world_size * n_local / n_global
        shown = torch.stack([loss.detach().double() * n_local / n_global])
        return loss * weight, float(self.sum_(shown)[0])

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DistributedDataParallel (buffers are kept per rank: the BN and
        observer statistics are synchronized by the modules themselves)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def synchronize_statistics_(self, qat_modules: Sequence[nn.Module]) -> None:
        """BatchNorm statistics and activation ranges of the global batch on every rank."""
        sync_batch_norm_(qat_modules, self.group)
        sync_input_observers_(qat_modules, self.group)

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint records about the run that wrote it."""
        return {
            "world_size": self.world_size,
            "backend": "nccl" if self.device.type == "cuda" else "gloo",
            "batch_norm_statistics": "global batch (summed across ranks)",
        }

    def barrier(self) -> None:
        import torch

        self.sum_(torch.zeros(1))


def _init(launch: Launch, device_name: str) -> Replica:
    import torch
    import torch.distributed as dist

    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= launch.local_rank:
            raise UsageError(
                f"rank {launch.rank} wants CUDA device {launch.local_rank}, torch sees "
                f"{torch.cuda.device_count()}",
                hint="start at most one process per GPU on each machine",
            )
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, usable_cpus() // launch.local_world_size))
    timeout = timeout_s()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout),
                            device_id=device if cuda else None)
    group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout))
    return Replica(launch, device, group, timeout)


@contextmanager
def session(device_name: str = "cpu") -> Iterator[Replica | None]:
    """Join the process group torchrun describes (None outside torchrun) for the block.

    Any exception leaving the block becomes a `RankFailedError` carrying the run's first
    failure, so every rank exits with the failing rank's code.
    """
    launch = Launch.from_env()
    if launch is None:
        yield None
        return
    import torch.distributed as dist

    try:
        replica = _init(launch, device_name)
        yield replica
        replica.barrier()
    except RankFailedError:
        raise
    except BaseException as e:
        if dist.is_initialized():
            raise resolve_failure(launch, e) from e
        if _is_peer_loss(e):  # the group never formed: nobody to tell, nothing to adopt
            raise QatconvError(
                f"rank {launch.rank}: could not join the other ranks: {describe(e)}",
                hint="check that every rank started and can reach the rendezvous endpoint",
            ) from e
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001 - a broken group cannot be torn down cleanly
                log.debug("destroy_process_group: %s", e)


# --------------------------------------------------------------- statistics across ranks


@functools.cache
def _sum_function() -> type:
    import torch
    import torch.distributed as dist

    class SumAcrossRanks(torch.autograd.Function):
        """All-reduce (sum) that autograd differentiates: the gradient is summed too."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
            ctx.group = group
            out = x.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(out, group=group)
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return SumAcrossRanks.apply(grad, ctx.group), None

    return SumAcrossRanks


def _sum_across_ranks(t: torch.Tensor, group: Any) -> torch.Tensor:
    return t if group is None else _sum_function().apply(t, group)


def batch_norm_across_ranks(x: torch.Tensor, bn: nn.BatchNorm1d, group: Any) -> torch.Tensor:
    """Training-mode BatchNorm1d of ``x`` (N, C) with the statistics of every rank's rows.

    Per-channel sum, sum of squares and the row count are summed across ranks in float64;
    the mean and biased variance normalize, the unbiased variance updates the running stats
    (as `torch.nn.functional.batch_norm` does). ``group`` None: this process alone.
    """
    import torch

    c = x.shape[1]
    x64 = x.double()
    local = torch.cat([x64.sum(0), (x64 * x64).sum(0), x64.new_full((1,), x.shape[0])])
    total = _sum_across_ranks(local, group)
    n = total[2 * c]
    if float(n.detach()) < 2:
        raise ValueError(f"BatchNorm needs more than 1 value per channel, the batch has {n}")
    mean = total[:c] / n
    var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(f * mean.detach().to(bn.running_mean.dtype))
            unbiased = var.detach() * n.detach() / (n.detach() - 1)
            bn.running_var.mul_(1 - f).add_(f * unbiased.to(bn.running_var.dtype))
    y = ((x64 - mean) * torch.rsqrt(var + bn.eps)).to(x.dtype)
    return y * bn.weight + bn.bias if bn.affine else y


def _cross_rank_bn_class() -> type:
    from torch import nn

    class CrossRankBatchNorm1d(nn.BatchNorm1d):
        """A BatchNorm1d whose training-mode statistics are those of the global batch."""

        group: Any = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or x.dim() != 2:
                return super().forward(x)
            return batch_norm_across_ranks(x, self, self.group)

    return CrossRankBatchNorm1d


def sync_batch_norm_(qat_modules: Sequence[nn.Module], group: Any) -> None:
    """Make the BatchNorm of each QAT module normalize with the global batch's statistics.

    The module's class changes in place (its parameters, buffers and state dict keys stay
    the same objects), so optimizers and `freeze_bn_stats` keep working.
    """
    cls = _cross_rank_bn_class()
    for mod in qat_modules:
        bn = mod.bn  # type: ignore[attr-defined]
        bn.__class__ = cls
        bn.group = group


def sync_input_observers_(qat_modules: Sequence[nn.Module], group: Any) -> None:
    """Make each activation observer see the min/max of the global batch.

    A forward pre-hook replaces the observed tensor by ``[global min, global max]`` (the
    local extremes reduced across ranks): min/max observers, plain or moving-average, then
    update exactly as a one-process run over the whole batch does.
    """
    import torch
    import torch.distributed as dist

    def hook(_obs: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        x = args[0].detach()
        if x.numel():
            lo, hi = torch.aminmax(x)
            both = torch.stack([-lo, hi]).float()
        else:
            both = torch.full((2,), float("-inf"), device=x.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        return (torch.stack([-both[0], both[1]]).to(x.dtype),)

    for mod in qat_modules:
        fq = getattr(mod, "input_fake_quant", None)
        if fq is not None:
            fq.activation_post_process.register_forward_pre_hook(hook)


# -------------------------------------------------------------------------- local launcher


def launch_local(nproc: int, argv: Sequence[str]) -> None:
    """Run ``python -m qatconv ARGV`` as ``nproc`` local ranks through `torch.distributed.run`.

    Raises:
        UsageError: ``nproc`` < 1.
        RankFailedError: a rank failed; its exit code (128 + signal when it was killed).
    """
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    os.environ[_LAUNCHER_ENV] = "1"  # the ranks inherit it: see resolve_failure
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = run.parse_args(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
                           "--monitor-interval", "0.1", "-m", "qatconv", *argv])
    try:
        run.run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal: no rank could say why
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ \
                else str(-code)
            raise RankFailedError(
                Failure(rank, 128 - code, f"killed by {name}",
                        "SIGKILL usually means out of memory: lower --batch-size"),
                echo=True, json=True,
            ) from None
        raise RankFailedError(Failure(rank, code, f"failed with exit code {code}"),
                              echo=False, json=False) from None


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the ranks must not launch again)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out

