"""The command line contract: --version, --help examples, --json, exit codes 0/2/3/4 and the
one-line `error:` (+ at most one `hint:`) output. In-process through `qatconv.cli.main`."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qatconv import __version__

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SPEC = str(SAMPLES / "digits_mlp.py:DigitsMLP")
WEIGHTS = SAMPLES / "digits_mlp.safetensors"
CALIB = SAMPLES / "digits_calib.npz"

NO_BN_MODEL = '''
from __future__ import annotations

import torch
from torch import nn


class NoBN(nn.Module):
    """Linear -> ReLU -> Linear: nothing to fold."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))
'''


from conftest import Run


def assert_error_lines(r: Run, code: int) -> None:
    """Exit ``code``; stderr is exactly one `error:` line and at most one `hint:` line."""
    assert r.code == code, (r.code, r.err)
    lines = r.err.strip("\n").splitlines()
    assert "Traceback" not in r.err
    assert 1 <= len(lines) <= 2, r.err
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), r.err
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), r.err


@pytest.fixture(scope="module")
def qat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qatconv import api
    from qatconv.config import ModelConfig

    path = tmp_path_factory.mktemp("cli") / "qat.safetensors"
    api.prepare(ModelConfig(spec=SPEC, weights=WEIGHTS), CALIB, path)
    return path


@pytest.fixture
def no_bn(tmp_path: Path) -> dict[str, Path]:
    model_file = tmp_path / "nobn.py"
    model_file.write_text(NO_BN_MODEL)
    g = torch.Generator().manual_seed(0)
    weights = tmp_path / "nobn.safetensors"
    save_file({"fc1.weight": torch.randn(16, 64, generator=g), "fc1.bias": torch.randn(16),
               "fc2.weight": torch.randn(10, 16, generator=g), "fc2.bias": torch.zeros(10)},
              weights)
    return {"spec": Path(f"{model_file}:NoBN"), "weights": weights}


# ------------------------------------------------------------------------- version, help


def test_version(cli: Any) -> None:
    r = cli("--version")
    assert r.code == 0
    assert r.out.strip() == f"qatconv {__version__}"


@pytest.mark.parametrize("command", ["inspect", "prepare", "fold", "demo"])
def test_help_shows_an_example(cli: Any, command: str) -> None:
    r = cli(command, "--help")
    assert r.code == 0, r.err
    text = r.out + r.err
    assert "Example" in text
    assert f"qatconv {command} " in text  # an example command line, not just the usage line


def test_root_help_lists_commands_and_exit_codes(cli: Any) -> None:
    r = cli("--help")
    assert r.code == 0
    for command in ("inspect", "prepare", "fold", "demo"):
        assert command in r.out
    assert "Exit codes" in r.out


# ------------------------------------------------------------------------------------ --json


def test_inspect_json_is_one_object(cli: Any) -> None:
    r = cli("inspect", WEIGHTS, "--json")
    assert r.code == 0, r.err
    obj = r.json()
    assert obj["format"] == "safetensors"
    assert obj["tensors"] == len(load_file(WEIGHTS))


def test_inspect_json_with_model_lists_pairs(cli: Any) -> None:
    r = cli("inspect", WEIGHTS, "--model", SPEC, "--data", CALIB, "--json")
    assert r.code == 0, r.err
    pairs = r.json()["pairs"]["pairs"]
    assert [(p["linear"], p["bn"]) for p in pairs] == [("fc1", "bn1"), ("fc2", "bn2")]


def test_prepare_json_is_one_object(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    r = cli("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB, "-o", out, "--json")
    assert r.code == 0, r.err
    obj = r.json()
    assert Path(obj["output"]) == out and out.exists()
    assert [p["linear"] for p in obj["pairs"]] == ["fc1", "fc2"]
    assert 0.0 <= obj["metrics"]["relative_mse"] < 1e-3


def test_fold_json_is_one_object(cli: Any, tmp_path: Path, qat_ckpt: Path) -> None:
    out = tmp_path / "f.safetensors"
    r = cli("fold", qat_ckpt, "-o", out, "--check", CALIB, "--json")
    assert r.code == 0, r.err
    obj = r.json()
    assert obj["source_stage"] == "qat"
    assert [Path(f) for f in obj["files"]] == [out]
    assert obj["check"]["passed"] is True and obj["check"]["samples"] == 200
    assert set(obj["removed"]) >= {"fc1.bn.running_var", "fc2.weight_fake_quant.scale"}


def test_plain_fold_without_check_reports_unverified_pairs(cli: Any, tmp_path: Path) -> None:
    r = cli("fold", "--model", SPEC, "--weights", WEIGHTS, "-o", tmp_path / "f.safetensors",
            "--json")
    assert r.code == 0, r.err
    assert r.json()["unverified"] == ["fc1", "fc2"]
    assert "warning:" in r.err and "--check" in r.err


def test_human_output_goes_to_stderr_plain_and_quiet_silences_it(
    cli: Any, tmp_path: Path
) -> None:
    args = ["prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB,
            "--mode", "finetune", "--steps", "4", "--batch-size", "32"]
    r = cli(*args, "-o", tmp_path / "a.safetensors")
    assert r.code == 0, r.err
    assert r.out == ""
    assert "fc1" in r.err and "a.safetensors" in r.err
    assert "\x1b[" not in r.err  # no colour codes when stderr is not a terminal
    r = cli(*args, "-o", tmp_path / "b.safetensors", "--quiet")
    assert r.code == 0 and r.out == "" and r.err == ""


# ----------------------------------------------------------------------- exit codes: 2


@pytest.mark.parametrize("args", [
    ["prepare", "--model", SPEC, "--data", str(CALIB)],  # no -o
    ["fold", str(WEIGHTS)],  # no -o
    ["prepare", "--bogus"],
    ["prepare", "--model", SPEC, "--data", str(CALIB), "-o", "x.safetensors", "--mode", "train"],
], ids=["prepare-no-output", "fold-no-output", "unknown-option", "bad-choice"])
def test_click_usage_errors_exit_2(cli: Any, args: list[str]) -> None:
    r = cli(*args)
    assert_error_lines(r, 2)


def test_weight_bits_out_of_range_exits_2(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    r = cli("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB, "-o", out,
            "--weight-bits", "9")
    assert_error_lines(r, 2)
    assert "--weight-bits" in r.err
    assert not out.exists()


def test_fold_with_both_inputs_exits_2(cli: Any, tmp_path: Path, qat_ckpt: Path) -> None:
    r = cli("fold", qat_ckpt, "--weights", WEIGHTS, "--model", SPEC, "-o",
            tmp_path / "f.safetensors")
    assert_error_lines(r, 2)


# ----------------------------------------------------------------------- exit codes: 3


def test_missing_model_file_exits_3(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    r = cli("prepare", "--model", f"{tmp_path / 'nope.py'}:Net", "--weights", WEIGHTS,
            "--data", CALIB, "-o", out)
    assert_error_lines(r, 3)
    assert "nope.py" in r.err
    assert not out.exists()


def test_existing_output_needs_force(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    args = ["prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB, "-o", out]
    r = cli(*args)
    assert_error_lines(r, 3)
    assert "--force" in r.err
    assert out.read_bytes() == b"keep me"
    r = cli(*args, "--force")
    assert r.code == 0, r.err
    assert load_file(out)  # replaced by a real checkpoint


def test_output_that_is_an_input_is_refused(cli: Any, tmp_path: Path, qat_ckpt: Path) -> None:
    before = qat_ckpt.read_bytes()
    r = cli("fold", qat_ckpt, "-o", qat_ckpt, "--force")
    assert_error_lines(r, 3)
    assert qat_ckpt.read_bytes() == before
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(WEIGHTS.read_bytes())
    r = cli("prepare", "--model", SPEC, "--weights", weights, "--data", CALIB, "-o", weights,
            "--force")
    assert_error_lines(r, 3)
    assert weights.read_bytes() == WEIGHTS.read_bytes()


def test_no_pairs_exits_3_and_allow_no_pairs_writes(
    cli: Any, tmp_path: Path, no_bn: dict[str, Path]
) -> None:
    spec, weights = str(no_bn["spec"]), no_bn["weights"]
    q = tmp_path / "q.safetensors"
    r = cli("prepare", "--model", spec, "--weights", weights, "--data", CALIB, "-o", q)
    assert_error_lines(r, 3)
    assert "no Linear+BatchNorm1d pair" in r.err
    assert "--allow-no-pairs" in r.err
    assert not q.exists()
    f = tmp_path / "f.safetensors"
    r = cli("fold", "--model", spec, "--weights", weights, "-o", f)
    assert_error_lines(r, 3)
    assert not f.exists()

    r = cli("prepare", "--model", spec, "--weights", weights, "--data", CALIB, "-o", q,
            "--allow-no-pairs", "--json")
    assert r.code == 0, r.err
    assert r.json()["pairs"] == []
    assert set(load_file(q)) == set(load_file(weights))
    r = cli("fold", "--model", spec, "--weights", weights, "-o", f, "--allow-no-pairs")
    assert r.code == 0, r.err
    src, got = load_file(weights), load_file(f)
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)


def test_corrupt_checkpoint_exits_3(cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = cli("inspect", bad)
    assert_error_lines(r, 3)


def test_malformed_data_exits_3(cli: Any, tmp_path: Path) -> None:
    data = tmp_path / "wrong.npz"
    np.savez(data, inputs=np.zeros((8, 5), dtype=np.float32))  # the model wants 64 features
    out = tmp_path / "q.safetensors"
    r = cli("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", data, "-o", out)
    assert_error_lines(r, 3)
    assert not out.exists()


# ----------------------------------------------------------------------- exit codes: 4


def test_inspect_strict_exits_4_on_a_zero_gamma_channel(cli: Any, tmp_path: Path) -> None:
    state = load_file(WEIGHTS)
    state["bn2.weight"][[3, 7]] = 0.0
    ckpt = tmp_path / "gamma0.safetensors"
    save_file(state, ckpt, metadata={"format": "pt"})
    assert cli("inspect", ckpt).code == 0
    r = cli("inspect", ckpt, "--strict", "--json")
    assert r.code == 4
    health = {h["bn"]: h for h in r.json()["bn_health"]}
    assert health["bn2"]["zero_gamma"] == 2 and health["bn1"]["zero_gamma"] == 0
    lines = r.err.strip().splitlines()
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: ")
    assert "Traceback" not in r.err
    # With the model and data the same problem is found.
    r = cli("inspect", ckpt, "--model", SPEC, "--data", CALIB, "--strict", "--quiet")
    assert_error_lines(r, 4)


def test_inspect_strict_exits_4_on_an_unverified_pair(cli: Any) -> None:
    r = cli("inspect", WEIGHTS, "--model", SPEC, "--strict", "--quiet")
    assert_error_lines(r, 4)
    assert "unverified" in r.err
    # Proving the axis on data removes the problem.
    r = cli("inspect", WEIGHTS, "--model", SPEC, "--data", CALIB, "--strict", "--quiet")
    assert r.code == 0, r.err


def test_fold_check_failure_exits_4(cli: Any, tmp_path: Path, qat_ckpt: Path) -> None:
    """The QAT file's metadata claims eps = 0.5 while the model's BNs use 1e-5: a wrong fold."""
    from safetensors import safe_open

    with safe_open(str(qat_ckpt), "pt") as f:
        meta = json.loads(f.metadata()["qatconv"])
    for p in meta["pairs"]:
        p["eps"] = 0.5
    lying = tmp_path / "lying.safetensors"
    save_file(load_file(qat_ckpt), lying, metadata={"format": "pt", "qatconv": json.dumps(meta)})
    out = tmp_path / "f.safetensors"
    r = cli("fold", lying, "-o", out, "--check", CALIB, "--quiet")
    assert_error_lines(r, 4)
    assert "differs" in r.err
    assert not out.exists(), "a failed command must not leave its output"
    # The honest checkpoint passes the same check.
    assert cli("fold", qat_ckpt, "-o", out, "--check", CALIB, "--quiet").code == 0


def test_errors_under_json_print_one_error_object(cli: Any, tmp_path: Path) -> None:
    r = cli("fold", tmp_path / "missing.safetensors", "-o", tmp_path / "f.safetensors", "--json")
    assert_error_lines(r, 3)
    line = r.err.splitlines()[0]
    obj = r.json()
    assert obj == {"error": line.removeprefix("error: "), "hint": obj["hint"], "exit_code": 3}
    assert obj["hint"] and f"hint: {obj['hint']}" in r.err
    # A usage error (click rejects the flag) is one object too, with exit code 2.
    r = cli("fold", "-o", tmp_path / "f.safetensors", "--no-such-flag", "--json")
    assert r.code == 2 and r.json()["exit_code"] == 2 and "--no-such-flag" in r.json()["error"]


def test_sharded_fold_json_output_names_the_index(
    cli: Any, tmp_path: Path, qat_ckpt: Path
) -> None:
    out = tmp_path / "model.safetensors"
    r = cli("fold", qat_ckpt, "-o", out, "--max-shard-size", "20KB", "--json")
    assert r.code == 0, r.err
    obj = r.json()
    assert len(obj["files"]) >= 3 and all(Path(f).exists() for f in obj["files"])
    assert Path(obj["output"]).exists(), obj["output"]


def test_mse_loss_with_class_targets_is_bad_input(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    r = cli("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB, "-o", out,
            "--mode", "finetune", "--steps", "3", "--loss", "mse")
    assert_error_lines(r, 3)
    assert not out.exists()


class _Hung(BaseException):
    """Raised by SIGALRM: escapes cli.main's handlers, which catch Exception only."""


def test_finetune_on_a_single_sample_is_refused(cli: Any, tmp_path: Path) -> None:
    data = tmp_path / "one.npz"
    with np.load(CALIB) as d:
        np.savez(data, inputs=d["inputs"][:1], targets=d["targets"][:1])
    out = tmp_path / "q.safetensors"

    def hung(*_: object) -> None:
        raise _Hung("prepare --mode finetune did not return within 8 s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(8)
    try:
        r = cli("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", data, "-o", out,
                "--mode", "finetune", "--steps", "3")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert_error_lines(r, 3)
    assert not out.exists()


# ------------------------------------------------------- review findings (contract gaps)


def test_folded_metadata_holds_the_trained_scales_exactly(
    cli: Any, tmp_path: Path, qat_ckpt: Path
) -> None:
    out = tmp_path / "f.safetensors"
    assert cli("fold", qat_ckpt, "-o", out, "--quiet").code == 0
    from safetensors import safe_open

    with safe_open(out, framework="pt") as f:
        meta = json.loads(f.metadata()["qatconv"])
    qat = load_file(qat_ckpt)
    for lin in ("fc1", "fc2"):
        recorded = torch.tensor(meta["qparams"][lin]["scale"], dtype=torch.float32)
        assert torch.equal(recorded, qat[f"{lin}.weight_fake_quant.scale"]), lin
        assert meta["qparams"][lin]["scheme"] == "per_channel_symmetric"


def test_inspect_strict_fails_on_a_recorded_unverified_fold(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "plain.safetensors"
    assert cli("fold", "--model", SPEC, "--weights", WEIGHTS, "-o", out, "--quiet").code == 0
    assert cli("inspect", out, "--quiet").code == 0
    r = cli("inspect", out, "--strict", "--quiet")
    assert_error_lines(r, 4)
    assert "unverified" in r.err


def test_pickled_module_stands_in_for_model_with_check(cli: Any, tmp_path: Path) -> None:
    from sample_models.digits_mlp import DigitsMLP

    model = DigitsMLP()
    model.load_state_dict(load_file(WEIGHTS))
    pickled = tmp_path / "whole.pt"
    torch.save(model, pickled)
    out = tmp_path / "f.safetensors"
    r = cli("fold", "--weights", pickled, "--trust-pickle", "-o", out, "--check",
            SAMPLES / "digits_heldout.npz", "--json")
    assert r.code == 0, r.err
    assert r.json()["check"]["passed"] and r.json()["check"]["reference"] == "float"


def test_check_only_flags_without_check_are_usage_errors(
    cli: Any, tmp_path: Path, qat_ckpt: Path
) -> None:
    out = tmp_path / "f.safetensors"
    assert_error_lines(cli("fold", qat_ckpt, "-o", out, "--atol", "1e-3"), 2)
    assert_error_lines(cli("fold", qat_ckpt, "-o", out, "--check", CALIB, "--atol", "-1"), 2)
    assert not out.exists()


def test_prepare_refuses_a_qat_checkpoint_as_weights(
    cli: Any, tmp_path: Path, qat_ckpt: Path
) -> None:
    r = cli("prepare", "--model", SPEC, "--weights", qat_ckpt, "--data", CALIB,
            "-o", tmp_path / "q2.safetensors")
    assert_error_lines(r, 3)
    assert "already a qat checkpoint" in r.err.lower() and "qatconv fold" in r.err


def test_prepare_warns_without_weights_and_on_a_diverged_finetune(
    cli: Any, tmp_path: Path
) -> None:
    r = cli("prepare", "--model", SPEC, "--data", CALIB, "-o", tmp_path / "a.safetensors",
            "--json")
    assert r.code == 0 and any("no --weights" in w for w in r.json()["warnings"])
    assert "warning: no --weights" in r.err
    r = cli("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB, "-o",
            tmp_path / "b.safetensors", "--mode", "finetune", "--steps", "20", "--lr", "1e6",
            "--json")
    assert r.code == 0 and any("diverged" in w for w in r.json()["warnings"]), r.err


def test_sharded_force_refold_removes_the_old_shards(
    cli: Any, tmp_path: Path, qat_ckpt: Path
) -> None:
    index = tmp_path / "model.safetensors.index.json"
    assert cli("fold", qat_ckpt, "-o", index, "--max-shard-size", "20KB", "--quiet").code == 0
    many = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(many) >= 3
    assert cli("fold", qat_ckpt, "-o", index, "--max-shard-size", "1GB", "--force",
               "--quiet").code == 0
    assert [p.name for p in sorted(tmp_path.glob("model-*.safetensors"))] == [
        "model-00001-of-00001.safetensors"
    ]


CHAIN_MODEL = '''
import torch
from torch import nn


class Chain(nn.Module):
    """BN -> Linear (no bias) -> BN -> ReLU -> Linear: one input-side and one output-side fold."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 5, bias=False)
        self.bn1 = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn1(self.fc(self.bn0(x)))))
'''


def test_fold_bn_before_linear_matches_the_float_model(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "chain.py").write_text(CHAIN_MODEL)
    import importlib.util

    spec = importlib.util.spec_from_file_location("chain_ref", tmp_path / "chain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(3)
    model = mod.Chain().eval()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1):
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.3)
    save_file(model.state_dict(), tmp_path / "chain.safetensors")
    x = torch.randn(32, 6, generator=g)
    np.savez(tmp_path / "x.npz", inputs=x.numpy())
    out = tmp_path / "f.safetensors"
    r = cli("fold", "--model", f"{tmp_path / 'chain.py'}:Chain", "--weights",
            tmp_path / "chain.safetensors", "-o", out, "--fold-bn-before-linear",
            "--check", tmp_path / "x.npz", "--json")
    assert r.code == 0, r.err
    assert [b["bn"] for b in r.json()["pairs"]] == ["bn1"]
    folded = load_file(out)
    assert not any(k.startswith(("bn0.", "bn1.")) for k in folded)
    # Independent reference: the unfused model in float64 vs the folded Linears by hand.
    ref = mod.Chain().double().eval()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x64 = x.double()
    h = torch.relu(x64 @ folded["fc.weight"].double().T + folded["fc.bias"].double())
    got = h @ folded["head.weight"].double().T + folded["head.bias"].double()
    with torch.no_grad():
        want = ref(x64)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_fold_bn_before_linear_is_for_the_plain_fold(
    cli: Any, tmp_path: Path, qat_ckpt: Path
) -> None:
    r = cli("fold", qat_ckpt, "-o", tmp_path / "f.safetensors", "--fold-bn-before-linear")
    assert_error_lines(r, 2)


def test_health_counts_batchnorm1d_and_labels_the_kinds_never_folded(
    tmp_path: Path, cli: Any
) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))
    from structured import ConvThenMLP

    model = ConvThenMLP().eval()
    with torch.no_grad():
        model.bn2d.weight[1] = 0.0  # a dead BatchNorm2d channel: not qatconv's business
        model.bn.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "m.safetensors"
    save_file(model.state_dict(), ckpt)
    spec = f"{Path(__file__).resolve().parent / 'models' / 'structured.py'}:ConvThenMLP"
    data = tmp_path / "x.npz"
    np.savez(data, inputs=np.random.default_rng(0).normal(size=(8, 1, 4, 4)).astype("float32"))
    r = cli("inspect", ckpt, "--model", spec, "--data", data, "--strict", "--json")
    assert r.code == 0, r.err
    kinds = {h["bn"]: (h["kind"], h["zero_gamma"]) for h in r.json()["bn_health"]}
    assert kinds == {"bn2d": ("BatchNorm2d", 1), "bn": ("BatchNorm1d", 0)}
    assert r.json()["problems"] == []
    r = cli("inspect", ckpt, "--model", spec, "--data", data)
    assert "never folded" in r.err and "bn2d" in r.err
    with torch.no_grad():
        model.bn.weight[3] = 0.0  # the same problem in the BatchNorm1d: --strict exits 4
    save_file(model.state_dict(), ckpt)
    r = cli("inspect", ckpt, "--model", spec, "--data", data, "--strict", "--json")
    assert r.code == 4 and r.json()["problems"] == ["bn: 1 channel(s) with gamma == 0"]


def test_help_texts_show_their_bracketed_defaults(cli: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich read `[default: ...]` as markup and dropped it, leaving 'step on .' behind."""
    monkeypatch.setenv("COLUMNS", "300")
    texts = {cmd: cli(cmd, "--help").out for cmd in ("inspect", "prepare", "fold", "demo")}
    for cmd, text in texts.items():
        assert text and not re.search(r" \.[\s│]", text) and "\\[" not in text, cmd
    assert "from this step on [default: steps/2]." in texts["prepare"]
    assert "absolute tolerance [default: by dtype:" in texts["fold"]
    assert "relative tolerance [default: as --atol]." in texts["fold"]


# ------------------------------------------------------------------------ output names


@pytest.mark.parametrize("command", ["prepare", "fold", "plain-fold"])
def test_an_output_name_a_later_step_cannot_read_is_a_usage_error_up_front(
    cli: Any, tmp_path: Path, command: str
) -> None:
    """`fold -o out.s --check DATA` used to fold, stage `out.s`, then fail reading it back
    (naming the internal staging folder); without --check it wrote a file named out.s."""
    out = tmp_path / "out.s"
    if command == "prepare":
        args = ("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB, "-o", out)
    elif command == "fold":
        qat = tmp_path / "q.safetensors"
        r = cli("prepare", "--model", SPEC, "--weights", WEIGHTS, "--data", CALIB, "-o", qat)
        assert r.code == 0, r.err
        args = ("fold", qat, "-o", out, "--check", CALIB)
    else:
        args = ("fold", "--model", SPEC, "--weights", WEIGHTS, "-o", out)
    r = cli(*args, "--json")
    assert r.code == 2, r.err
    assert "must end in .safetensors" in r.json()["error"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == (
        ["q.safetensors"] if command == "fold" else []
    )


def test_export_help_names_the_onnx_extra(cli: Any) -> None:
    r = cli("export", "--help")
    assert r.code == 0, r.err
    assert "qatconv[onnx]" in r.out + r.err  # rich markup used to eat the "[onnx]"
