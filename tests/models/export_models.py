"""Small models for tests/test_export.py, each with its own numpy forward (the reference).

Every forward takes the folded float tensors and a ``linear`` callable that computes one Linear
(float, or an integer reference), so a test can swap the Linear arithmetic and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Linear = Callable[[str, np.ndarray], np.ndarray]


class Mlp(nn.Module):
    """16 -> fc1+bn1 -> relu -> fc2 (no bias)+bn2 -> relu -> fc3+bn3 -> head (a plain Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.fc2, self.bn2 = nn.Linear(32, 24, bias=False), nn.BatchNorm1d(24)
        self.fc3, self.bn3 = nn.Linear(24, 20), nn.BatchNorm1d(20)
        self.head = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(self.bn3(self.fc3(x)))

    @staticmethod
    def reference(x: np.ndarray, linear: Linear) -> np.ndarray:
        x = np.maximum(linear("fc1", x), 0)
        x = np.maximum(linear("fc2", x), 0)
        return linear("head", linear("fc3", x))


class Tokens(nn.Module):
    """Token-wise pairs: (B, 6, 12) -> fc1 on every token, BN over flatten(0, 1) -> relu ->
    fc2 + BN likewise -> mean over tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 8), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        y = torch.relu(self.bn1(y.flatten(0, 1)).reshape_as(y))
        z = self.fc2(y)
        z = torch.relu(self.bn2(z.flatten(0, 1)).reshape_as(z))
        return self.head(z.mean(1))

    @staticmethod
    def reference(x: np.ndarray, linear: Linear) -> np.ndarray:
        b, t, c = x.shape
        y = np.maximum(linear("fc1", x.reshape(b * t, c)), 0)
        z = np.maximum(linear("fc2", y), 0).reshape(b, t, -1)
        return linear("head", z.mean(1, dtype=np.float64))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics far from the identity, so folding matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()
