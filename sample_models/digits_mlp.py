"""A small MLP for the 8x8 UCI optical digits, with two Linear -> BatchNorm1d -> ReLU blocks.

Inputs are the 64 pixels of an 8x8 image scaled to [0, 1] (pixel / 16); outputs are 10 logits.
The trained weights are in ``digits_mlp.safetensors`` beside this file; the data splits are in
``digits.npz`` (raw uint8 pixels, labels and split indices) and ``digits_<split>.npz``
(qatconv's ``--data`` layout: ``inputs`` float32 [N, 64], ``targets`` int64 [N]).

Use from the command line as ``--model sample_models/digits_mlp.py:DigitsMLP``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
CHECKPOINT_PATH = HERE / "digits_mlp.safetensors"
DATA_PATH = HERE / "digits.npz"
SPLITS = ("train", "calib", "heldout")
PIXEL_MAX = 16.0


class DigitsMLP(nn.Module):
    """64 -> hidden1 -> hidden2 -> 10; each hidden layer is Linear -> BatchNorm1d -> ReLU.

    Args:
        hidden1: width of the first hidden layer.
        hidden2: width of the second hidden layer.
        num_classes: number of output logits.
    """

    in_features = 64

    def __init__(self, hidden1: int = 128, hidden2: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(self.in_features, hidden1)
        self.bn1 = nn.BatchNorm1d(hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.bn2 = nn.BatchNorm1d(hidden2)
        self.head = nn.Linear(hidden2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(x)

    @staticmethod
    def example_inputs() -> tuple[torch.Tensor]:
        """A deterministic (8, 64) batch in [0, 1], shaped like real inputs."""
        generator = torch.Generator().manual_seed(0)
        return (torch.randint(0, 17, (8, 64), generator=generator).float() / PIXEL_MAX,)


def split_path(name: str) -> Path:
    """Path of the ``--data`` file (``digits_<name>.npz``) for one split.

    Raises:
        ValueError: ``name`` is not one of ``train``, ``calib``, ``heldout``.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown digits split {name!r}; expected one of {', '.join(SPLITS)}")
    return HERE / f"digits_{name}.npz"


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of the shipped digits data from ``digits.npz``.

    Args:
        name: ``train`` (1,197 samples), ``calib`` (200) or ``heldout`` (400).

    Returns:
        ``(inputs, targets)``: float32 [N, 64] pixels / 16 in [0, 1], int64 [N] labels 0..9.

    Raises:
        ValueError: ``name`` is not one of the splits.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown digits split {name!r}; expected one of {', '.join(SPLITS)}")
    with np.load(DATA_PATH) as data:
        index = data[f"{name}_index"]
        pixels = data["pixels"][index]
        labels = data["labels"][index]
    inputs = torch.from_numpy(pixels.astype(np.float32) / np.float32(PIXEL_MAX))
    targets = torch.from_numpy(labels.astype(np.int64))
    return inputs, targets
