"""A small Linear+BatchNorm1d MLP that fails on one rank of a distributed run, for the tests in
tests/test_distributed_prepare.py. ``how``: "none", "build" (the model cannot be built on that
rank: bad input on one node), "kill" (SIGKILL in the forward pass ``at`` calls in: an OOM kill)."""

from __future__ import annotations

import os
import signal

import torch
from torch import nn


class FaultyMLP(nn.Module):
    def __init__(self, fail_rank: int = -1, how: str = "none", at: int = 0) -> None:
        super().__init__()
        here = int(os.environ.get("RANK", "0")) == fail_rank
        if here and how == "build":
            raise ValueError(f"rank {fail_rank} cannot build the model")
        self.kill_at = at if here and how == "kill" else -1
        self.calls = 0
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 16)
        self.bn2 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(x)
