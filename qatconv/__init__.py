"""qatconv: fold Linear+BatchNorm1d pairs through PyTorch QAT into deployable safetensors.

The public API is re-exported lazily so that `import qatconv` (and `qatconv --help`) does not
import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "find_pairs",
    "fold",
    "inspect_path",
    "load_folded",
    "prepare",
]


def __getattr__(name: str) -> Any:
    if name in ("fold", "inspect_path", "load_folded", "prepare"):
        from qatconv import api

        return getattr(api, name)
    if name == "find_pairs":
        from qatconv.pairs import find_pairs

        return find_pairs
    raise AttributeError(f"module 'qatconv' has no attribute {name!r}")
