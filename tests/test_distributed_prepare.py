"""`prepare` on two gloo processes (``python -m torch.distributed.run --nproc-per-node 2`` and
``qatconv prepare --nproc 2``) against the same `prepare` in one process.

The reference is the one-process run on the same data, seed and global batch. With BatchNorm
statistics frozen from step 0 (and SGD, whose update is linear in the gradient) the runs differ
only by the order of floating-point sums: weights within 1e-6. With them unfrozen, the two
ranks normalize with float64 sums while one process uses torch's float32 kernel; those 1e-7
differences flip a few fake-quant roundings within three steps, so the bound is 1e-3 on every
tensor (the first step's loss agrees to 1e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qatconv import api
from qatconv.checkpoint import read_metadata
from qatconv.config import Mode, ModelConfig, Optimizer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'tests' / 'models' / 'rank_faults.py'}:FaultyMLP"
STEPS = 3


def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "d.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((200, 8)).astype(np.float32))
    return path


def flags(freeze_bn_after: int) -> list[str]:
    return ["--mode", "finetune", "--steps", str(STEPS), "--batch-size", "64", "--optimizer",
            "sgd", "--lr", "0.01", "--freeze-bn-after", str(freeze_bn_after),
            "--freeze-observers-after", str(STEPS)]


def run_ranks(tmp_path: Path, out: Path, *extra: str, launcher: str = "torchrun",
              model_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node", "2", "-m", "qatconv"] if launcher == "torchrun"
            else [sys.executable, "-m", "qatconv"])
    tail = ["--nproc", "2"] if launcher == "nproc" else []
    margs = [a for kv in model_args for a in ("--model-arg", kv)]
    cmd = [*head, "prepare", *tail, "--model", MODEL, *margs, "--data",
           str(data_file(tmp_path)), "-o", str(out), "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QATCONV_DIST_TIMEOUT": "60"}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=180,
                          cwd=tmp_path)


def one_process(tmp_path: Path, out: Path, freeze_bn_after: int) -> None:
    train = TrainConfig(Mode.finetune, steps=STEPS, batch_size=64, lr=0.01,
                        optimizer=Optimizer.sgd, freeze_bn_after=freeze_bn_after,
                        freeze_observers_after=STEPS)
    api.prepare(ModelConfig(MODEL), data_file(tmp_path), out, train=train)


def compare(a: Path, b: Path, atol: float) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)


def test_frozen_bn_two_ranks_equal_one_process_and_repeat_exactly(tmp_path: Path, cli) -> None:
    first, again = tmp_path / "2a.safetensors", tmp_path / "2b.safetensors"
    for out, launcher in ((first, "torchrun"), (again, "nproc")):
        r = run_ranks(tmp_path, out, *flags(0), launcher=launcher)
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads(r.stdout)  # rank 0 alone prints: one JSON object
        assert report["distributed"]["world_size"] == 2
    assert first.read_bytes() == again.read_bytes()
    one = tmp_path / "1.safetensors"
    one_process(tmp_path, one, freeze_bn_after=0)
    compare(first, one, atol=1e-6)  # weights, BN tensors and the written weight qparams
    meta1, meta2 = read_metadata(one), read_metadata(first)
    assert meta2["distributed"] == {"world_size": 2, "backend": "gloo",
                                    "batch_norm_statistics": "global batch (summed across ranks)"}
    assert meta2["metrics"]["loss_first"] == pytest.approx(meta1["metrics"]["loss_first"],
                                                           rel=1e-6)
    assert meta2["data_sha256"] == meta1["data_sha256"]
    check = cli("fold", first, "-o", tmp_path / "f.safetensors", "--check",
                data_file(tmp_path), "--json")
    assert check.code == 0, check.err
    assert check.json()["check"]["passed"]


def test_unfrozen_bn_two_ranks_within_the_stated_bound(tmp_path: Path) -> None:
    two, one = tmp_path / "2.safetensors", tmp_path / "1.safetensors"
    r = run_ranks(tmp_path, two, *flags(STEPS))
    assert r.returncode == 0, r.stderr[-2000:]
    one_process(tmp_path, one, freeze_bn_after=STEPS)
    compare(two, one, atol=1e-3)
    m1, m2 = read_metadata(one)["metrics"], read_metadata(two)["metrics"]
    assert m2["bn_frozen_at"] is None
    assert m2["loss_first"] == pytest.approx(m1["loss_first"], rel=1e-6)


def no_outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "safetensors" in p.name)


def test_a_rank_that_cannot_build_the_model_ends_every_rank_with_exit_3(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    r = run_ranks(tmp_path, out, *flags(0), launcher="nproc",
                  model_args=("fail_rank=1", 'how="build"'))
    assert r.returncode == 3, r.stderr[-2000:]
    assert "error: rank 1: " in r.stderr and "cannot build the model" in r.stderr
    err = json.loads(r.stdout)  # rank 0 reports rank 1's failure on stdout
    assert err["exit_code"] == 3 and err["error"].startswith("rank 1: ")
    assert no_outputs(tmp_path) == []


def test_a_killed_rank_ends_every_rank_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    start = time.monotonic()
    r = run_ranks(tmp_path, out, *flags(0), "--steps", "50", launcher="nproc",
                  model_args=("fail_rank=1", 'how="kill"', "at=12"))
    assert time.monotonic() - start < 60
    assert r.returncode == 128 + 9, r.stderr[-2000:]
    assert "rank 1" in r.stderr and "SIGKILL" in r.stderr
    # --json: one error object on stdout, the launcher's (rank 0 used to print a second one).
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout
    obj = json.loads(lines[0])
    assert obj["exit_code"] == 137 and "rank 1" in obj["error"]
    assert no_outputs(tmp_path) == []
