"""Fold Linear+BatchNorm1d pairs into plain Linears: the public face of the fold modules.

The work is split along its seams, as `torch.nn.utils.fusion` keeps math apart from modules:

- `fold_math`: the float64 arithmetic (`fold_weights`, `fold_bn_into_linear_input`);
- `fold_plan`: `FoldPair` / `FoldReport`, validating pairs against a tensor table, and the
  in-memory fold (`fold_state_dict`);
- `fold_stream`: the streaming fold file to file (`fold_file`: shards, write queue, buffers);
- `fold_bn_before`: BatchNorm1d -> Linear folds on a float state dict (`fold_bn_before_linear_`).
"""

from __future__ import annotations

from qatconv.fold_bn_before import fold_bn_before_linear_
from qatconv.fold_math import fold_bn_into_linear_input, fold_weights
from qatconv.fold_plan import FoldPair, FoldReport, fold_state_dict
from qatconv.fold_stream import fold_file

__all__ = [
    "FoldPair",
    "FoldReport",
    "fold_bn_before_linear_",
    "fold_bn_into_linear_input",
    "fold_file",
    "fold_state_dict",
    "fold_weights",
]
