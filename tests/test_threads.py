"""qatconv.threads: usable CPUs from affinity and cgroup quotas, the default count, --threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from qatconv import threads


@pytest.fixture
def clean_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what `manage`/`apply` change: torch's pool, the env variables, the module state."""
    before = torch.get_num_threads()
    for var in (*threads.ENV_VARS, "OMP_WAIT_POLICY"):
        monkeypatch.setenv(var, "x")  # registers the current value for restoring
        monkeypatch.delenv(var)
    for name in ("managed", "exported", "requested", "from_env", "choice"):
        monkeypatch.setattr(threads._State, name, getattr(threads._State, name))
    threads._State.managed, threads._State.exported = False, None
    threads._State.requested = threads._State.from_env = threads._State.choice = None
    yield
    torch.set_num_threads(before)


def _cgroup_v2(tmp: Path, limits: dict[str, str], own: str = "/a/b") -> tuple[Path, Path]:
    fs = tmp / "fs"
    (fs / own.lstrip("/")).mkdir(parents=True)
    (fs / "cgroup.controllers").write_text("cpu memory\n")
    for rel, text in limits.items():
        (fs / rel.lstrip("/") / "cpu.max").write_text(text + "\n")
    proc = tmp / "cgroup"
    proc.write_text(f"0::{own}\n")
    return proc, fs


def test_v2_quota_is_the_smallest_on_the_path(tmp_path: Path) -> None:
    proc, fs = _cgroup_v2(tmp_path, {"/a/b": "max 100000", "/a": "150000 100000"})
    assert threads.cgroup_cpu_quota(proc, fs) == pytest.approx(1.5)
    proc, fs = _cgroup_v2(tmp_path / "2", {"/a/b": "50000 100000", "/a": "300000 100000"})
    assert threads.cgroup_cpu_quota(proc, fs) == pytest.approx(0.5)


def test_v2_without_a_limit_is_none(tmp_path: Path) -> None:
    proc, fs = _cgroup_v2(tmp_path, {"/a/b": "max 100000"})
    assert threads.cgroup_cpu_quota(proc, fs) is None


def test_v1_cfs_quota(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    leaf = fs / "cpu,cpuacct" / "job"
    leaf.mkdir(parents=True)
    (leaf / "cpu.cfs_quota_us").write_text("250000\n")
    (leaf / "cpu.cfs_period_us").write_text("100000\n")
    (fs / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: unlimited
    (fs / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/job\n3:cpu,cpuacct:/job\n")
    assert threads.cgroup_cpu_quota(proc, fs) == pytest.approx(2.5)


def test_usable_cpus_caps_affinity_by_the_quota_rounded_up(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    proc, fs = _cgroup_v2(tmp_path, {"/a/b": "50000 100000"})
    assert threads.usable_cpus(proc, fs) == 1  # half a CPU still runs one thread
    proc, fs = _cgroup_v2(tmp_path / "2", {"/a/b": "max 100000"})
    assert threads.usable_cpus(proc, fs) == affinity
    assert threads.usable_cpus(tmp_path / "missing", tmp_path) == affinity


def test_usable_cpus_follows_the_affinity_mask() -> None:
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert threads.usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.parametrize(
    ("text", "expected"), [("4", 4), ("3,2", 3), ("0", None), ("many", None), ("", None)]
)
def test_env_threads(text: str, expected: int | None) -> None:
    assert threads.env_threads({"OMP_NUM_THREADS": text}) == expected


def test_choose_order() -> None:
    small, wide = 128 * 64, 1024 * 1024
    assert threads.choose(wide, requested=3, from_env=5, usable=8).threads == 3
    assert threads.choose(small, from_env=5, usable=8) == threads.ThreadChoice(
        5, 8, "OMP_NUM_THREADS")
    assert threads.choose(small, usable=8) == threads.ThreadChoice(1, 8, "small layers")
    assert threads.choose(wide - 1, usable=8).threads == 1
    assert threads.choose(wide, usable=8) == threads.ThreadChoice(8, 8, "usable CPUs")
    assert threads.choose(None, usable=8).threads == 8  # no Linear: nothing to call small


def test_fit_to_model_only_when_managed(clean_threads: None) -> None:
    torch.set_num_threads(2)
    assert threads.fit_to_model(nn.Linear(4, 4)) is None
    assert torch.get_num_threads() == 2  # a library call leaves the user's torch alone


def test_default_runs_small_models_on_one_thread(clean_threads: None) -> None:
    threads.manage(None)
    choice = threads.fit_to_model(nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 10)))
    assert choice == threads.ThreadChoice(1, threads.usable_cpus(), "small layers")
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"  # inherited by worker processes
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    wide = nn.Linear(1024, 1024, device="meta")
    assert threads.fit_to_model(wide) == threads.ThreadChoice(
        threads.usable_cpus(), threads.usable_cpus(), "usable CPUs")
    assert torch.get_num_threads() == threads.usable_cpus()


def test_user_env_wins_over_the_default_and_ours_does_not(clean_threads: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threads.manage(None)
    assert threads.fit_to_model(nn.Linear(8, 8)).reason == "OMP_NUM_THREADS"  # type: ignore[union-attr]
    threads.manage(None)  # a second command in the same process: the env is still the user's
    assert threads.fit_to_model(nn.Linear(8, 8)).threads == 2  # type: ignore[union-attr]
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.manage(None)
    assert threads.fit_to_model(nn.Linear(8, 8)).threads == 1  # type: ignore[union-attr]
    threads.manage(None)  # now OMP_NUM_THREADS=1 is the one `apply` exported, not the user's
    big = nn.Linear(1024, 1024, device="meta")
    assert threads.fit_to_model(big).reason == "usable CPUs"  # type: ignore[union-attr]


def test_cli_threads_flag(cli, samples: Path, tmp_path: Path, clean_threads: None) -> None:  # type: ignore[no-untyped-def]
    args = ["prepare", "--model", samples / "digits_mlp.py:DigitsMLP", "--weights",
            samples / "digits_mlp.safetensors", "--data", samples / "digits_calib.npz"]
    r = cli(*args, "-o", tmp_path / "a.safetensors", "--threads", "2")
    assert r.code == 0, r.err
    assert "compute threads: 2 of" in r.err and "as --threads asked" in r.err
    assert torch.get_num_threads() == 2
    r = cli(*args, "-o", tmp_path / "b.safetensors")
    assert r.code == 0, r.err
    assert "compute threads: 1 of" in r.err and "small" in r.err
    assert torch.get_num_threads() == 1
    r = cli(*args, "-o", tmp_path / "c.safetensors", "--threads", "0")
    assert r.code == 2 and "--threads" in r.err


@pytest.mark.parametrize("command", ["prepare", "fold", "demo", "export"])
def test_help_lists_threads(cli, command: str) -> None:  # type: ignore[no-untyped-def]
    r = cli(command, "--help")
    assert r.code == 0 and "--threads" in r.out
