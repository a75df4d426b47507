"""Models in the styles real libraries ship, for the output-structure and spec tests.

- `SimSiamHead`: returns ``(z, p)`` (a SimSiam projector and predictor).
- `MultiTask`: returns a dict of heads, one of them a dataclass holding a named tuple and a
  non-tensor leaf (``None``), and an integer tensor (argmax) that is not comparable.
- `WeightNormHead` / `ParamWeightNormHead`: a DINO-style head whose last Linear is weight-normed
  (hook-based ``nn.utils.weight_norm`` and ``nn.utils.parametrizations.weight_norm``).
- `build_*`: factories, as libraries build their models (``timm.create_model`` style).

This file prints at import, at construction and in forward, as chatty library code does: the
CLI must keep all of that off stdout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

print("structured.py: library v0.0 loaded (import notice on stdout)")


def block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU())


def randomize_bn_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Trained-looking BN statistics (an untrained BN is the identity and hides fold errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


class SimSiamHead(nn.Module):
    def __init__(self, dim: int = 12, hidden: int = 16) -> None:
        super().__init__()
        print("SimSiamHead: building (constructor notice on stdout)")
        self.projector = nn.Sequential(block(dim, hidden), nn.Linear(hidden, hidden),
                                       nn.BatchNorm1d(hidden))
        self.predictor = nn.Sequential(block(hidden, 8), nn.Linear(8, hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        print("SimSiamHead.forward (debug print on stdout)")
        z = self.projector(x)
        return z, self.predictor(z)

    @staticmethod
    def example_inputs() -> tuple[torch.Tensor]:
        return (torch.randn(8, 12, generator=torch.Generator().manual_seed(0)),)


class Pair(NamedTuple):
    mean: torch.Tensor
    logvar: torch.Tensor


@dataclass
class Heads:
    latent: Pair
    extra: object = None


class MultiTask(nn.Module):
    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.trunk = nn.Sequential(block(dim, 16), block(16, 16))
        self.cls = nn.Linear(16, 5)
        self.mean = nn.Linear(16, 3)
        self.logvar = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        h = self.trunk(x)
        logits = self.cls(h)
        return {"logits": logits, "label": logits.argmax(1),
                "heads": Heads(Pair(self.mean(h), self.logvar(h)), extra="note")}


class WeightNormHead(nn.Module):
    """A DINO head: MLP with BN, then a weight-normed last layer (hook-based weight_norm)."""

    def __init__(self, dim: int = 12, parametrized: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Sequential(block(dim, 16), nn.Linear(16, 16), nn.BatchNorm1d(16))
        last = nn.Linear(16, 6, bias=False)
        if parametrized:
            self.last_layer = nn.utils.parametrizations.weight_norm(last)
        else:
            self.last_layer = nn.utils.weight_norm(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.normalize(self.mlp(x), dim=-1)
        return self.last_layer(h)


def build_simsiam(width: int = 16) -> nn.Module:
    """A factory, the way libraries hand out their models."""
    return SimSiamHead(hidden=width)


def build_multitask() -> MultiTask:
    return MultiTask()


def build_weight_norm_head(parametrized: bool = False) -> nn.Module:
    return WeightNormHead(parametrized=parametrized)


def not_a_model() -> str:
    return "a string"


class BnSandwich(nn.Module):
    """BatchNorm1d -> Linear -> BatchNorm1d: an input-side fold, then the ordinary pair."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 16, bias=False)
        self.bn_out = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn_out(self.fc(self.bn_in(x)))))


class ConvThenMLP(nn.Module):
    """A BatchNorm2d (never folded by qatconv) before a healthy Linear -> BatchNorm1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(torch.relu(self.bn2d(self.conv(x))).flatten(1)))
