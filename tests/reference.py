"""Independent references the tests compare qatconv with (never qatconv's own code paths).

- `pair_record`: the `PairRecord` of a Linear and a BatchNorm1d of a model, read off the modules.
"""

from __future__ import annotations

from torch import nn

from qatconv.pair_record import PairRecord


def pair_record(model: nn.Module, linear: str, bn: str) -> PairRecord:
    """The record of the pair (``linear``, ``bn``) of ``model``, as the pair finder writes it."""
    lin, norm = model.get_submodule(linear), model.get_submodule(bn)
    assert isinstance(lin, nn.Linear) and isinstance(norm, nn.BatchNorm1d)
    return PairRecord(linear, bn, linear, norm.eps, norm.momentum, lin.in_features,
                      lin.out_features, lin.bias is not None, norm.affine)
