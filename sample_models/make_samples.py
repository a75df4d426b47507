"""Regenerate every shipped file in sample_models/ from scratch, deterministically.

Run from the repository root::

    python -m sample_models.make_samples            # reads scikit-learn's bundled digits.csv.gz
    python -m sample_models.make_samples --digits-csv path/to/digits.csv.gz

scikit-learn is needed only to locate its bundled ``digits.csv.gz`` (a dev tool, not a runtime
dependency of qatconv). Training runs on the CPU with one thread, fixed seeds and deterministic
algorithms, and the .npz files are written with fixed zip timestamps, so two runs on the same
machine and library versions give byte-identical files (``--check`` verifies that).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

if __package__ in (None, ""):
    # Run as a script path: make `sample_models` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
NUM_DIGITS = 1797
SPLIT_SIZES = {"train": 1197, "calib": 200, "heldout": 400}
SPLIT_SEED = 20240501
DIGITS_SEED = 0
TABULAR_SEED = 1
TABULAR_TRAIN = 2048
TABULAR_CALIB = 256
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
PIXEL_MAX = 16  # digits pixels are block counts 0..16; inputs are pixel / 16

OUTPUTS = (
    "digits.npz",
    "digits_train.npz",
    "digits_calib.npz",
    "digits_heldout.npz",
    "digits_mlp.safetensors",
    "tabular_calib.npz",
    "tabular_resnet.safetensors",
)


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a compressed .npz like ``np.savez_compressed``, but byte-reproducible.

    ``np.savez_compressed`` stamps each member with the current time; here every member gets
    the zip epoch, so the same arrays always give the same bytes.
    """
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: nn.Module) -> None:
    """Save an eval-mode model's state dict as safetensors with ``format: pt`` metadata."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only
    os.replace(tmp, path)


def default_digits_csv() -> Path:
    """scikit-learn's bundled copy of the UCI optical digits test set."""
    from importlib.resources import files

    return Path(str(files("sklearn.datasets.data").joinpath("digits.csv.gz")))


def read_digits_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``digits.csv.gz``: 1,797 rows of 64 pixels (0..16) and a label (0..9)."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (NUM_DIGITS, 65):
        raise ValueError(f"{path}: expected a {NUM_DIGITS}x65 table, got {table.shape}")
    pixels, labels = table[:, :64], table[:, 64]
    if pixels.min() < 0 or pixels.max() > PIXEL_MAX or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must be 0..16 and labels 0..9")
    return pixels.astype(np.uint8), labels.astype(np.uint8)


def split_indices() -> dict[str, np.ndarray]:
    """A fixed seeded shuffle cut into train/calib/heldout; each split sorted, int64."""
    order = np.random.default_rng(SPLIT_SEED).permutation(NUM_DIGITS)
    splits: dict[str, np.ndarray] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = np.sort(order[start : start + size]).astype(np.int64)
        start += size
    return splits


def train_classifier(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> None:
    """Plain Adam + cross-entropy in train mode (BN stats update), then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    n = inputs.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        # drop_last: a 1-sample batch would make BatchNorm1d fail in train mode
        for start in range(0, n - batch_size + 1, batch_size):
            idx = perm[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[idx]), targets[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
        log.debug("epoch %d loss %.4f", epoch, total / n)
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    return float((model(inputs).argmax(dim=1) == targets).float().mean())


def make_digits(csv_path: Path, out_dir: Path) -> dict[str, float]:
    # imported here so the sys.path bootstrap above runs first when run as a script path
    from sample_models.digits_mlp import DigitsMLP

    pixels, labels = read_digits_csv(csv_path)
    splits = split_indices()
    save_npz(
        out_dir / "digits.npz",
        {"pixels": pixels, "labels": labels, **{f"{k}_index": v for k, v in splits.items()}},
    )
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, index in splits.items():
        inputs = pixels[index].astype(np.float32) / np.float32(PIXEL_MAX)
        targets = labels[index].astype(np.int64)
        save_npz(out_dir / f"digits_{name}.npz", {"inputs": inputs, "targets": targets})
        tensors[name] = torch.from_numpy(inputs), torch.from_numpy(targets)

    torch.manual_seed(DIGITS_SEED)
    model = DigitsMLP()
    train_classifier(model, *tensors["train"], epochs=40, batch_size=64, lr=2e-3, seed=DIGITS_SEED)
    save_checkpoint(out_dir / "digits_mlp.safetensors", model)
    return {f"digits_{name}_accuracy": accuracy(model, *t) for name, t in tensors.items()}


def make_tabular(out_dir: Path) -> dict[str, float]:
    """Synthetic 3-class data: a random teacher on latent Gaussians, observed through a random
    mixing with per-column scales and offsets (so BN statistics are far from mean 0 / var 1)."""
    from sample_models.tabular_resnet import TabularResNet

    g = torch.Generator().manual_seed(TABULAR_SEED)
    n_in, n_latent, n_classes = 16, 8, 3
    mixing = torch.randn(n_latent, n_in, generator=g)
    scale = torch.exp(torch.randn(n_in, generator=g))
    offset = 3.0 * torch.randn(n_in, generator=g)
    teacher1 = torch.randn(n_latent, 16, generator=g)
    teacher2 = torch.randn(16, n_classes, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, n_latent, generator=g)
        noise = 0.1 * torch.randn(n, n_in, generator=g)
        x = (z @ mixing + noise) * scale + offset
        y = (torch.tanh(z @ teacher1) @ teacher2).argmax(dim=1)
        return x.float(), y.long()

    train_x, train_y = draw(TABULAR_TRAIN)
    calib_x, calib_y = draw(TABULAR_CALIB)
    save_npz(out_dir / "tabular_calib.npz", {"inputs": calib_x.numpy(), "targets": calib_y.numpy()})

    torch.manual_seed(TABULAR_SEED)
    model = TabularResNet()
    train_classifier(model, train_x, train_y, epochs=15, batch_size=64, lr=2e-3, seed=TABULAR_SEED)
    save_checkpoint(out_dir / "tabular_resnet.safetensors", model)
    return {
        "tabular_train_accuracy": accuracy(model, train_x, train_y),
        "tabular_calib_accuracy": accuracy(model, calib_x, calib_y),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_all(out_dir: Path, digits_csv: Path | None = None) -> dict[str, float]:
    """Regenerate every shipped file into ``out_dir``; returns the measured accuracies."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = make_digits(digits_csv or default_digits_csv(), out_dir)
    metrics.update(make_tabular(out_dir))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--digits-csv",
        type=Path,
        default=None,
        help="digits.csv.gz (default: scikit-learn's bundled copy)",
    )
    parser.add_argument("--output-dir", type=Path, default=HERE)
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir twice and compare sha256 with output-dir",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.check:
        import tempfile

        ok = True
        with tempfile.TemporaryDirectory() as tmp:
            for run in ("a", "b"):
                make_all(Path(tmp) / run, args.digits_csv)
            for name in OUTPUTS:
                digests = {sha256(Path(tmp) / r / name) for r in ("a", "b")}
                shipped = args.output_dir / name
                if shipped.exists():
                    digests.add(sha256(shipped))
                same = len(digests) == 1
                ok &= same
                log.info("%-28s %s", name, "identical" if same else "DIFFERS")
        return 0 if ok else 1

    metrics = make_all(args.output_dir, args.digits_csv)
    for key, value in metrics.items():
        log.info("%-28s %.4f", key, value)
    for name in OUTPUTS:
        path = args.output_dir / name
        log.info("%-28s %8d bytes  sha256 %s", name, path.stat().st_size, sha256(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
