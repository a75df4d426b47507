"""qatconv.distributed on its own: torchrun's environment, the cross-rank BatchNorm against
torch's BatchNorm on the whole batch, the activation-range hook, the weighted loss.

Two-rank checks run two gloo processes (torch.multiprocessing, a file rendezvous) that each
hold a slice of one batch; the reference is one process holding all of it.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatconv import distributed as qd
from qatconv.errors import UsageError


def test_launch_from_env() -> None:
    assert qd.Launch.from_env({}) is None
    assert qd.Launch.from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert qd.Launch.from_env(env) == qd.Launch(3, 4, 1, 2)
    assert not qd.Launch(3, 4, 1, 2).is_main
    with pytest.raises(UsageError, match="not integers"):
        qd.Launch.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_strip_nproc() -> None:
    argv = ["prepare", "--nproc", "2", "--data", "d.npy", "--nproc=3", "-o", "o"]
    assert qd.strip_nproc(argv) == ["prepare", "--data", "d.npy", "-o", "o"]


def test_timeout_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(qd.TIMEOUT_ENV, raising=False)
    assert qd.timeout_s() == qd.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(qd.TIMEOUT_ENV, "12.5")
    assert qd.timeout_s() == 12.5
    monkeypatch.setenv(qd.TIMEOUT_ENV, "0")
    with pytest.raises(UsageError):
        qd.timeout_s()


def test_shard_and_rows_cover_the_batch_once() -> None:
    idx = torch.randperm(11)
    for world in (1, 2, 3, 4):
        replicas = [qd.Replica(qd.Launch(r, world, r, world), torch.device("cpu"), None, 1.0)
                    for r in range(world)]
        assert torch.equal(torch.cat([r.shard(idx) for r in replicas]), idx)
        ranges = [r.row_range(11) for r in replicas]
        assert ranges[0][0] == 0 and ranges[-1][1] == 11
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def _bn_pair(c: int, momentum: float | None, dtype: torch.dtype) -> tuple[nn.BatchNorm1d, ...]:
    torch.manual_seed(0)
    ref = nn.BatchNorm1d(c, momentum=momentum).to(dtype).train()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    mine = nn.BatchNorm1d(c, momentum=momentum).to(dtype).train()
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_alone_equals_torch(momentum: float | None) -> None:
    """One process: output, running stats and gradients equal torch's BatchNorm1d (float64:
    to 1e-12; the formulas differ only in summation order)."""
    ref, mine = _bn_pair(5, momentum, torch.float64)
    x = (torch.randn(9, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(9, 5, dtype=torch.float64)
    for _ in range(2):  # two steps: the cumulative average (momentum None) counts batches
        y_ref = ref(x)
        y = qd.batch_norm_across_ranks(x2, mine, None)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, atol=1e-12, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(mine, name), getattr(ref, name), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------- two ranks


def _two_rank_worker(rank: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        x = torch.randn(9, 4) * 2 + 0.5
        g = torch.randn(9, 4)
        part = slice(0, 5) if rank == 0 else slice(5, 9)  # uneven slices: 5 and 4 rows
        _, bn = _bn_pair(4, 0.1, torch.float32)
        xs = x[part].clone().requires_grad_()
        y = qd.batch_norm_across_ranks(xs, bn, dist.group.WORLD)
        (y * g[part]).sum().backward()
        grads = torch.stack([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)  # what DDP does with the parameter gradients (before 1/world)

        obs = torch.ao.quantization.MovingAverageMinMaxObserver(averaging_constant=0.5)
        holder = nn.Module()
        holder.input_fake_quant = nn.Module()
        holder.input_fake_quant.activation_post_process = obs
        qd.sync_input_observers_([holder], dist.group.WORLD)
        obs(x[part])
        obs(x[part] * 3)
        torch.save({"y": y.detach(), "x_grad": xs.grad, "param_grads": grads,
                    "running": (bn.running_mean, bn.running_var),
                    "range": (obs.min_val, obs.max_val)}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """Two ranks holding 5 and 4 rows of a batch: BN output, input and parameter gradients,
    running stats and activation ranges equal one BatchNorm1d / observer on all 9 rows
    (float32 statistics vs float64 sums: within 1e-5)."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    x = torch.randn(9, 4) * 2 + 0.5
    g = torch.randn(9, 4)
    ref, _ = _bn_pair(4, 0.1, torch.float32)
    xr = x.clone().requires_grad_()
    (ref(xr) * g).sum().backward()
    obs = torch.ao.quantization.MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs(x)
    obs(x * 3)

    env = os.environ.copy()
    try:
        mp.spawn(_two_rank_worker, args=(f"file://{tmp_path / 'rdzv'}", str(tmp_path)),
                 nprocs=2, join=True)
    finally:
        os.environ.clear()
        os.environ.update(env)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    y = torch.cat([got[0]["y"], got[1]["y"]])
    y_ref = F.batch_norm(x, None, None, ref.weight.detach(), ref.bias.detach(), training=True,
                         eps=ref.eps)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([got[0]["x_grad"], got[1]["x_grad"]]), xr.grad,
                               atol=1e-5, rtol=1e-5)
    for r in range(2):
        torch.testing.assert_close(got[r]["param_grads"],
                                   torch.stack([ref.weight.grad, ref.bias.grad]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["running"][0], ref.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[r]["running"][1], ref.running_var, atol=1e-6, rtol=1e-6)
        assert float(got[r]["range"][0]) == float(obs.min_val)  # exact: min/max of floats
        assert float(got[r]["range"][1]) == float(obs.max_val)
