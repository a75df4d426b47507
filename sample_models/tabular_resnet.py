"""A residual MLP for tabular data: stem Linear -> BN -> ReLU, residual blocks, Linear head.

Each residual block computes ``x + relu(bn2(lin2(relu(bn1(lin1(x))))))``, so it holds two
Linear -> BatchNorm1d pairs. The forward is hand-written (not ``nn.Sequential``), which is what
qatconv's torch.fx pair finder has to handle in real models.

``tabular_resnet.safetensors`` holds weights trained briefly (defaults: 16 features, width 32,
2 blocks, 3 classes) on a synthetic, seeded dataset; ``tabular_calib.npz`` holds 256 samples of
it in qatconv's ``--data`` layout (``inputs`` float32 [N, 16], ``targets`` int64 [N]).

Use from the command line as ``--model sample_models/tabular_resnet.py:TabularResNet``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
CHECKPOINT_PATH = HERE / "tabular_resnet.safetensors"
CALIB_PATH = HERE / "tabular_calib.npz"


class ResidualBlock(nn.Module):
    """``x + relu(bn2(lin2(relu(bn1(lin1(x))))))`` at a constant width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, width)
        self.bn1 = nn.BatchNorm1d(width)
        self.lin2 = nn.Linear(width, width)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.lin1(x)))
        return x + torch.relu(self.bn2(self.lin2(h)))


class TabularResNet(nn.Module):
    """Stem, ``blocks`` residual blocks, and a Linear head.

    Args:
        in_features: number of input columns.
        width: hidden width of the stem and every block.
        blocks: number of residual blocks.
        out_features: number of outputs (class logits).
    """

    def __init__(
        self, in_features: int = 16, width: int = 32, blocks: int = 2, out_features: int = 3
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.stem = nn.Linear(in_features, width)
        self.stem_bn = nn.BatchNorm1d(width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(blocks))
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """A deterministic (8, in_features) standard-normal batch."""
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(8, self.in_features, generator=generator),)


def load_calib() -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``tabular_calib.npz``.

    Returns:
        ``(inputs, targets)``: float32 [256, 16] and int64 [256] class labels 0..2.
    """
    with np.load(CALIB_PATH) as data:
        return torch.from_numpy(data["inputs"]), torch.from_numpy(data["targets"])
