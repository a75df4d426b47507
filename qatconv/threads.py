"""Compute threads: how many CPUs this process may use, and how many torch threads to run.

torch starts one intra-op thread per core the machine has. On a shared machine (a CI runner, a
container with a CPU quota, a job pinned to a few cores) those threads wait for cores that are
busy or not ours, and small-model work crawls: the digits fine-tune took 70 s instead of 7 s
next to one busy process. So:

- `usable_cpus` counts the CPUs this process may really use: its affinity mask, capped by a
  cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) on its cgroup or any ancestor.
- `choose` picks the count: ``--threads N`` when given, else ``OMP_NUM_THREADS`` when set, else
  one thread for models whose widest Linear is small (`SMALL_LAYER_MACS`, measured with
  `bench/threads.py`), else the usable CPUs.
- `apply` sets torch's intra-op and inter-op pools and ``OMP_NUM_THREADS`` for subprocesses.

Nothing here imports torch at module level: the CLI calls `request` before torch is loaded.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
PROC = Path("/proc/self/cgroup")
CGROUP_FS = Path("/sys/fs/cgroup")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota_v2(cgroup: str, fs: Path) -> float | None:
    """The smallest ``cpu.max`` quota on the cgroup's path (``max`` = none), in CPUs."""
    limits = []
    path = fs / cgroup.lstrip("/")
    for d in (path, *path.parents):
        text = _read(d / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period and float(period) > 0:
                limits.append(float(quota) / float(period))
        if d == fs:
            break
    return min(limits) if limits else None


def _quota_v1(cgroup: str, mount: Path) -> float | None:
    """The smallest ``cpu.cfs_quota_us / cpu.cfs_period_us`` on the cgroup's path (-1 = none)."""
    limits = []
    path = mount / cgroup.lstrip("/")
    for d in (path, *path.parents):
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota and period and float(quota) > 0 and float(period) > 0:
            limits.append(float(quota) / float(period))
        if d == mount:
            break
    return min(limits) if limits else None


def cgroup_cpu_quota(proc_cgroup: Path = PROC, fs: Path = CGROUP_FS) -> float | None:
    """The CPU quota (in CPUs, may be fractional) of this process's cgroup, None when unlimited.

    Args:
        proc_cgroup: the ``/proc/self/cgroup`` file to read (a parameter for tests).
        fs: where the cgroup filesystems are mounted.
    """
    text = _read(proc_cgroup)
    if not text:
        return None
    limits = []
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and (fs / "cgroup.controllers").exists():
            limits.append(_quota_v2(path, fs))
        elif "cpu" in controllers.split(","):
            mount = next((m for m in (fs / controllers, fs / "cpu,cpuacct", fs / "cpu")
                          if m.is_dir()), None)
            if mount is not None:
                limits.append(_quota_v1(path, mount))
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def usable_cpus(proc_cgroup: Path = PROC, fs: Path = CGROUP_FS) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up)."""
    n = _affinity()
    quota = cgroup_cpu_quota(proc_cgroup, fs)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


# A model whose widest Linear has fewer weights than this runs on one thread by default.
# bench/threads.py (QAT fine-tune steps of 4 x Linear(W, W) + BN at batch 256, 2 threads vs 1,
# interleaved, OMP_WAIT_POLICY=PASSIVE) on the 2-core development VM, quiet: 2.20x the one-thread
# time at W 256 (66K weights), 1.03x at 512 (262K), 0.65x at 1024 (1M), 0.54x at 2048; so the
# crossover lies between 262K and 1M weights. Next to a core kept busy, 2 threads cost 1.05-1.16x
# at every width (with torch's default spin-waiting: 2-34x, hence PASSIVE).
SMALL_LAYER_WEIGHTS = 1024 * 1024


@dataclass(frozen=True)
class ThreadChoice:
    """How many compute threads a command uses, and why."""

    threads: int
    usable_cpus: int
    reason: str  # "--threads", "OMP_NUM_THREADS", "small layers", "usable CPUs"

    def to_json(self) -> dict[str, Any]:
        return {"threads": self.threads, "usable_cpus": self.usable_cpus, "reason": self.reason}

    def describe(self) -> str:
        why = {
            "--threads": "as --threads asked",
            "OMP_NUM_THREADS": "from OMP_NUM_THREADS",
            "small layers": "the layers are small: one thread is faster; --threads N to change",
            "usable CPUs": "one per usable CPU",
        }[self.reason]
        return (f"compute threads: {self.threads} of {self.usable_cpus} usable CPU(s) "
                f"({why})")


def env_threads(env: Mapping[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` as a count (its first entry), None when unset or not a number >= 1."""
    try:
        n = int((os.environ if env is None else env).get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        return None
    return n if n >= 1 else None


def choose(
    widest: int | None,
    *,
    requested: int | None = None,
    from_env: int | None = None,
    usable: int | None = None,
) -> ThreadChoice:
    """The thread count for a model whose widest Linear has ``widest`` weights.

    Args:
        widest: in_features * out_features of the model's widest Linear (None: unknown).
        requested: ``--threads N``; wins over everything.
        from_env: the user's ``OMP_NUM_THREADS`` (`env_threads`); wins over the defaults.
        usable: CPUs this process may use [default: `usable_cpus()`].
    """
    usable = usable or usable_cpus()
    if requested is not None:
        return ThreadChoice(requested, usable, "--threads")
    if from_env is not None:
        return ThreadChoice(from_env, usable, "OMP_NUM_THREADS")
    if widest is not None and widest < SMALL_LAYER_WEIGHTS:
        return ThreadChoice(1, usable, "small layers")
    return ThreadChoice(usable, usable, "usable CPUs")


def widest_linear(model: nn.Module) -> int | None:
    """in_features * out_features of the widest ``nn.Linear`` in ``model`` (None: no Linear)."""
    from torch import nn

    sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    return max(sizes) if sizes else None


def apply(n: int) -> None:
    """Run torch's intra-op (and, when still possible, inter-op) pool on ``n`` threads.

    Also exports ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` so that worker processes started
    from here (``--nproc``) inherit the count.
    """
    for var in ENV_VARS:
        os.environ[var] = str(n)
    _State.exported = str(n)
    if "torch" not in sys.modules:
        return  # torch reads the variables when it loads
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only once per process, and not after inter-op work started
        pass


class _State:
    managed = False
    exported: str | None = None  # the OMP_NUM_THREADS that `apply` set (not the user's word)
    requested: int | None = None
    from_env: int | None = None
    choice: ThreadChoice | None = None


def manage(requested: int | None) -> None:
    """Let qatconv pick the compute threads of this process (the CLI's commands call this first).

    With ``requested`` the count is fixed now (before torch loads, where it has not yet); else
    it is chosen per model by `fit_to_model`. Library calls that never call this leave torch's
    settings alone. Also makes idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY``
    PASSIVE, unless set): a thread spinning for a busy core costs that core's owner, and the
    spin ends only when the scheduler moves the other thread in.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _State.managed, _State.requested, _State.choice = True, requested, None
    if os.environ.get("OMP_NUM_THREADS") != _State.exported:  # the user's, not ours
        _State.from_env = env_threads()
    if requested is not None:
        _State.choice = choose(None, requested=requested)
        apply(requested)


def fit_to_model(model: nn.Module) -> ThreadChoice | None:
    """Choose and apply the thread count for ``model`` when `manage` was called, else None."""
    if not _State.managed:
        return None
    if _State.requested is None:
        _State.choice = choose(widest_linear(model), from_env=_State.from_env)
        apply(_State.choice.threads)
    return _State.choice


def current() -> ThreadChoice | None:
    """The last choice made under `manage` (None: not managed, or no model built yet)."""
    return _State.choice
