"""An ill-conditioned residual MLP: ``x = x + bn(fc(x))`` blocks with BN gammas near 1.

Each block roughly doubles the activations, and the head reads the difference of two nearly
equal halves, so the float32 model's rounding noise is large next to its outputs: the exact
fold of such a model differs from the unfused float32 model by about as much as that model
differs from its own float64 run.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLP(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 14) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim)) for _ in range(depth))
        self.head = nn.Linear(dim, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for block in self.blocks:
                fc, bn = block
                fc.weight.copy_(torch.randn(dim, dim, generator=g) / dim**0.5)
                fc.bias.copy_(0.1 * torch.randn(dim, generator=g))
                bn.bias.copy_(0.1 * torch.randn(dim, generator=g))
                bn.weight.copy_(1 + 1e-3 * torch.randn(dim, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(dim, generator=g))
                bn.running_mean.copy_(0.1 * torch.randn(dim, generator=g))
            w = torch.randn(4, dim // 2, generator=g)
            self.head.weight.copy_(torch.cat([w, -w * (1 + 1e-4)], 1))
            # Every tensor from the seeded generator: two instances are the same model.
            self.head.bias.copy_(0.1 * torch.randn(4, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, x], 1)  # two nearly equal halves: the head reads their difference
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)
