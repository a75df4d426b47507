"""Outputs of any structure (tuples, dicts, dataclasses, named tuples) are compared, distilled
and measured leaf by leaf; model code that prints never reaches stdout under --json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from qatconv import api, qat
from qatconv.errors import BadInputError
from qatconv.outputs import flat_cat, flatten_outputs, forward_outputs

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
sys.path.insert(0, str(MODELS))
import structured as st

FILE = MODELS / "structured.py"


def _files(tmp_path: Path, model: torch.nn.Module, name: str) -> tuple[Path, Path, torch.Tensor]:
    st.randomize_bn_(model)
    weights = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(3))
    data = tmp_path / f"{name}.npz"
    np.savez(data, inputs=x.numpy())
    return weights, data, x


def test_flatten_names_every_leaf_and_says_which_it_ignores() -> None:
    out = {"logits": torch.ones(4, 5), "label": torch.zeros(4, dtype=torch.long),
           "heads": st.Heads(st.Pair(torch.ones(4, 3), torch.ones(4, 3)), extra=None),
           "seq": [torch.ones(4, 2), (torch.ones(2), "text")]}
    flat = flatten_outputs(out, batch=4)
    assert flat.names == ("['logits']", "['heads'].latent.mean", "['heads'].latent.logvar",
                          "['seq'][0]")
    assert flat.ignored == ("['label'] (int64 tensor)", "['heads'].extra (NoneType)",
                            "['seq'][1][0] (shape (2,): not one row per sample)",
                            "['seq'][1][1] (str)")
    assert flat.note() is not None and "['label']" in flat.note()
    assert flatten_outputs(torch.ones(3, 2)).names == ("output",)


def test_forward_outputs_concatenates_each_leaf_over_batches() -> None:
    model = st.MultiTask().eval()
    x = torch.randn(10, 12)
    with torch.no_grad():
        whole = model(x)
        got = forward_outputs(model, x, batch_size=3)
    assert got.names == ("['logits']", "['heads'].latent.mean", "['heads'].latent.logvar")
    torch.testing.assert_close(got.tensors[0], whole["logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.tensors[2], whole["heads"].latent.logvar, atol=1e-6, rtol=0)
    with pytest.raises(BadInputError, match="no floating-point tensor"):
        forward_outputs(torch.nn.Flatten(0), torch.randn(4, 2))  # (8,): not per sample


def test_distillation_sums_the_per_output_losses() -> None:
    """The loss of a step is mse(z) + mse(p), computed here by hand from the two models."""
    teacher = st.randomize_bn_(st.SimSiamHead()).eval()
    student = st.randomize_bn_(st.SimSiamHead(), seed=2).eval()
    x = torch.randn(20, 12)
    idx = torch.tensor([3, 1, 7])
    with torch.no_grad():
        goal = forward_outputs(teacher, x, 8)
        z_t, p_t = teacher(x)
        z_s, p_s = student(x[idx])
        got = qat._step_loss(F.mse_loss, student(x[idx]), qat._batch_goal(goal, idx, None, x),
                             idx)
    want = F.mse_loss(z_s, z_t[idx]) + F.mse_loss(p_s, p_t[idx])
    assert abs(float(got) - float(want)) <= 1e-6 * float(want)


def test_metrics_report_each_output_and_all_of_them() -> None:
    f_model = st.randomize_bn_(st.SimSiamHead()).eval()
    q_model = st.randomize_bn_(st.SimSiamHead(), seed=2).eval()
    x = torch.randn(30, 12)
    m = qat.simulated_metrics(q_model, f_model, x, batch_size=7)
    with torch.no_grad():
        (zf, pf), (zq, pq) = f_model(x), q_model(x)
    rel = {name: float(((q.double() - f.double()) ** 2).mean() / (f.double() ** 2).mean())
           for name, q, f in (("[0]", zq, zf), ("[1]", pq, pf))}
    for name, value in rel.items():
        assert m["outputs"][name]["relative_mse"] == pytest.approx(value, rel=1e-9)
    every_f = torch.cat([zf.reshape(-1), pf.reshape(-1)]).double()
    every_q = torch.cat([zq.reshape(-1), pq.reshape(-1)]).double()
    overall = float(((every_q - every_f) ** 2).mean() / (every_f**2).mean())
    assert m["relative_mse"] == pytest.approx(overall, rel=1e-9)
    assert "top1_agreement" in m["outputs"]["[0]"]  # (N, classes) outputs get top-1 too


@pytest.mark.parametrize("name", ["build_simsiam", "build_multitask"])
def test_tuple_and_dict_models_prepare_fold_and_check(tmp_path: Path, cli: Any,
                                                      name: str) -> None:
    """prepare (finetune, distill) -> model-free fold --check on models returning structures;
    the folded model matches the unfused float model leaf by leaf; stdout stays one object
    although the model file prints at import, construction and in forward."""
    model = getattr(st, name)()
    weights, data, x = _files(tmp_path, model, name)
    spec = f"{FILE}:{name}"
    q = tmp_path / "qat.safetensors"
    r = cli("prepare", "--model", spec, "--weights", weights, "--data", data, "-o", q,
            "--mode", "finetune", "--steps", "3", "--lr", "1e-5", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert "SimSiamHead" not in r.out and "library v0.0" not in r.out
    assert rep["metrics"]["relative_mse"] < 1e-2 and len(rep["metrics"]["outputs"]) >= 2
    said = [n for n in rep["notes"] if "ignored in comparisons" in n]
    if name == "build_multitask":  # the argmax labels and the string are left out, and said so
        assert len(said) == 1
        assert "['label'] (int64 tensor)" in said[0] and "['heads'].extra (str)" in said[0]
    else:
        assert said == []
    out = tmp_path / "folded.safetensors"
    r = cli("fold", q, "-o", out, "--check", data, "--json")
    assert r.code == 0, r.err
    assert r.json()["check"]["passed"]
    assert ("--check: model output leaves ignored" in r.err) is (name == "build_multitask")
    # Independent reference: a plain float fold, loaded into a fresh instance, vs the float model.
    plain = tmp_path / "plain.safetensors"
    assert cli("fold", "--model", spec, "--weights", weights, "-o", plain, "--quiet").code == 0
    folded = api.load_folded(getattr(st, name)().eval(), plain)
    with torch.no_grad():
        want = flatten_outputs(model.eval()(x), len(x))
        got = flatten_outputs(folded(x), len(x))
    assert got.names == want.names
    torch.testing.assert_close(flat_cat(got), flat_cat(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parametrized", [False, True])
def test_weight_norm_models_fold_check_and_prepare(tmp_path: Path, cli: Any,
                                                   parametrized: bool) -> None:
    model = st.build_weight_norm_head(parametrized)
    weights, data, x = _files(tmp_path, model, "wn")
    spec = f"{FILE}:build_weight_norm_head"
    arg = ["--model-arg", f"parametrized={json.dumps(parametrized)}"]
    out = tmp_path / "folded.safetensors"
    r = cli("fold", "--model", spec, *arg, "--weights", weights, "-o", out, "--check", data,
            "--json")
    assert r.code == 0, r.err
    assert r.json()["check"]["passed"] and len(r.json()["pairs"]) == 2
    folded = api.load_folded(st.build_weight_norm_head(parametrized).eval(), out)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    q = tmp_path / "qat.safetensors"
    r = cli("prepare", "--model", spec, *arg, "--weights", weights, "--data", data, "-o", q,
            "--quiet")
    assert r.code == 0, r.err
    assert cli("fold", q, "-o", tmp_path / "f2.safetensors", "--check", data,
               "--quiet").code == 0


def test_copy_model_survives_hook_based_weight_norm() -> None:
    from qatconv.modelcopy import copy_model

    model = st.WeightNormHead()
    model(torch.randn(4, 12))  # leaves a non-leaf `weight` on the module: deepcopy refuses it
    with pytest.raises(RuntimeError):
        import copy

        copy.deepcopy(model)
    twin = copy_model(model).eval()
    assert model.last_layer.weight.grad_fn is not None  # the original is left as it was
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(twin(x), model.eval()(x))
        twin.last_layer.weight_g.mul_(2)  # independent parameters
        assert not torch.equal(twin(x), model(x))


def test_json_error_is_the_only_thing_on_stdout_when_model_code_prints(tmp_path: Path,
                                                                       cli: Any) -> None:
    weights, data, _ = _files(tmp_path, st.SimSiamHead(), "s")
    r = cli("prepare", "--model", f"{FILE}:not_a_model", "--data", data, "-o",
            tmp_path / "q.safetensors", "--json")
    assert r.code == 3
    assert r.json()["exit_code"] == 3 and "not an nn.Module" in r.json()["error"]
    r = cli("inspect", weights, "--model", f"{FILE}:SimSiamHead", "--data", data, "--json")
    assert r.code == 0, r.err
    assert r.json()["format"] == "safetensors" and "(constructor notice on stdout)" in r.err
