"""Pairs of models torch.fx cannot trace, found on a recorded eager run (`qatconv.record`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qatconv import api
from qatconv.pairs import _scan_graph, _Tracer, find_pairs
from qatconv.record import record_graph

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "models"))
import untraceable as u
from levit_like import LeViTLike

FILE = HERE / "models" / "untraceable.py"

TABNET_PAIRS = sorted(
    [f"{t}.specifics.glu_layers.{k}" for t in ("initial_splitter", "feat_transformers.0",
                                               "feat_transformers.1", "feat_transformers.2")
     for k in (0, 1)]
    + [f"att_transformers.{s}" for s in range(3)]
)


def _pairs(scan: Any) -> list[str]:
    return sorted(p.linear.removesuffix(".fc") for p in scan.pairs)


def test_tabnet_folds_its_11_safe_pairs_and_not_the_shared_linears() -> None:
    model = u.randomize_bn_(u.TabNetLike()).eval()
    scan = find_pairs(model, (torch.randn(8, 10),))
    assert not scan.traced and "array" in scan.trace_error
    assert scan.recorded_shapes == ((8, 10),)
    assert _pairs(scan) == TABNET_PAIRS and all(p.verified for p in scan.pairs)
    assert all(p.bn.endswith(".bn.bn") for p in scan.pairs)  # the GBN's BatchNorm1d
    shared = [s for s in scan.skipped if s.linear and ".shared." in s.linear]
    assert len(shared) == 8 and {s.code for s in shared} == {"linear-reused"}
    assert [s.bn for s in scan.skipped if s.linear is None] == ["initial_bn"]
    # 8 rows in chunks of 4: every GBN called its BN twice, merged into one call.
    assert len(scan.ghost_bns) == 19
    assert find_pairs(model, None).pairs == ()  # without data: the Sequential fallback
    assert find_pairs(model, None).recorded_shapes is None


def test_ghost_bn_is_merged_only_when_every_chunk_goes_through_it() -> None:
    class HalfGhost(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.fc(x).chunk(int(np.ceil(x.shape[0] / 4)), 0)
            return torch.cat([self.bn(a), b], 0)  # the second chunk skips the BN

    class Ghost(HalfGhost):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = self.fc(x).split(int(np.int64(3)), dim=0)
            return torch.cat([self.bn(p) for p in parts], dim=0)

    class WrongAxis(HalfGhost):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = self.fc(x).chunk(int(np.ceil(x.shape[0] / 4)), 0)
            return torch.cat([self.bn(p) for p in parts], dim=1)  # side by side: not a batch

    x = torch.randn(8, 4)
    scan = find_pairs(u.randomize_bn_(Ghost()).eval(), (x,))
    assert [(p.linear, p.bn) for p in scan.pairs] == [("fc", "bn")] and scan.ghost_bns == ("bn",)
    for model in (HalfGhost(), WrongAxis()):
        scan = find_pairs(u.randomize_bn_(model).eval(), (x,))
        assert scan.pairs == () and scan.ghost_bns == ()
        assert [s.code for s in scan.skipped] in (["not-adjacent"], ["bn-reused"])


def test_window_vit_and_dice_dnn() -> None:
    vit = u.randomize_bn_(u.WindowViT()).eval()
    for hw in (2, 4):  # one window (the `if H == ws` branch), and a partitioned one
        scan = find_pairs(vit, (torch.randn(8, hw, hw, 8),))
        assert [p.linear for p in scan.pairs] == [
            f"blocks.{b}.mlp.{k}.linear" for b in (0, 1) for k in (0, 2)]
        assert all(p.token_wise and p.verified for p in scan.pairs)
        assert scan.recorded_shapes == ((8, hw, hw, 8),)
    dnn = u.randomize_bn_(u.DiceDNN()).eval()
    scan = find_pairs(dnn, (torch.randn(8, 10),))
    assert [(p.linear, p.bn) for p in scan.pairs] == [(f"linears.{i}", f"bn.{i}") for i in range(3)]
    assert {s.bn: s.code for s in scan.skipped} == {
        f"activation_layers.{i}.bn": "not-adjacent" for i in range(3)}
    scan = find_pairs(u.randomize_bn_(u.DiceDNN(use_bn=False)).eval(), (torch.randn(8, 10),))
    assert scan.pairs == ()
    assert {s.bn: s.code for s in scan.skipped} == {
        f"activation_layers.{i}.bn": "multiple-users" for i in range(3)}


def test_recorded_graph_gives_the_traced_graphs_answer_on_traceable_models() -> None:
    """On models torch.fx can trace, the recorded graph is judged as the traced one is."""
    sys.path.insert(0, str(HERE.parent))
    from sample_models.digits_mlp import DigitsMLP
    from sample_models.tabular_resnet import TabularResNet

    cases = [(LeViTLike(), LeViTLike.example_inputs()), (DigitsMLP(), (torch.randn(8, 64),)),
             (TabularResNet(), TabularResNet().example_inputs())]
    for model, x in cases:
        model = u.randomize_bn_(model).eval()
        traced = find_pairs(model, x)
        assert traced.traced
        rec = record_graph(model, tuple(x), _Tracer().is_leaf_module)
        recorded = _scan_graph(model, rec.graph, True, False, frozenset())
        assert recorded.pairs == traced.pairs, type(model).__name__
        assert [(s.linear, s.bn, s.code) for s in recorded.skipped] == [
            (s.linear, s.bn, s.code) for s in traced.skipped]
        assert recorded.bn_before_linear == traced.bn_before_linear


@pytest.mark.parametrize("name", ["TabNetLike", "WindowViT", "DiceDNN"])
def test_untraceable_models_fold_and_match_the_float_model(tmp_path: Path, cli: Any,
                                                           name: str) -> None:
    model = u.randomize_bn_(getattr(u, name)()).eval()
    shape = (8, 4, 4, 8) if name == "WindowViT" else (8, 10)
    x = torch.randn(40, *shape[1:], generator=torch.Generator().manual_seed(2))
    weights, data = tmp_path / "w.pt", tmp_path / "x.npz"
    torch.save(model.state_dict(), weights)  # TabNet ties its shared Linears' weights
    np.savez(data, inputs=x.numpy())
    out = tmp_path / "f.safetensors"
    r = cli("fold", "--model", f"{FILE}:{name}", "--weights", weights, "-o", out,
            "--check", data, "--json")
    assert r.code == 0, r.err
    expected = {"TabNetLike": 11, "WindowViT": 4, "DiceDNN": 3}[name]
    assert len(r.json()["pairs"]) == expected and r.json()["check"]["passed"]
    said = [n for n in r.json()["notes"] if "recorded eager run" in n]
    assert said and f"verified for input shape {(8, *shape[1:])} only" in said[0]
    from qatconv.checkpoint import read_metadata

    assert read_metadata(out)["pair_finder"]["method"] == "recorded"
    folded = api.load_folded(getattr(u, name)().eval(), out)
    with torch.no_grad():
        for rows in (40, 13, 5):  # other batch sizes: other ghost-BN chunkings
            want, got = model(x[:rows]), folded(x[:rows])
            want = want[0] if isinstance(want, tuple) else want
            got = got[0] if isinstance(got, tuple) else got
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    q = tmp_path / "q.safetensors"
    r = cli("prepare", "--model", f"{FILE}:{name}", "--weights", weights, "--data", data,
            "-o", q, "--json")
    assert r.code == 0, r.err
    assert len(r.json()["pairs"]) == expected
    assert cli("fold", q, "-o", tmp_path / "f2.safetensors", "--check", data).code == 0
