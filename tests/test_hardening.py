"""Bad inputs never get the better of qatconv: the corpus in tests/bad_inputs, run through the CLI.

Every case must end with its documented exit code, exactly one `error:` line (and at most one
`hint:` line right after it), no traceback, no output or temp file, and no side effect of a
pickle payload. The corpus is generated into a temp folder by `tests/bad_inputs/make_corpus.py`.
Runs in-process through `qatconv.cli.main`; two subprocess runs check the real interpreter's
`--debug` behaviour.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from qatconv import api, validate
from qatconv.errors import CheckpointError, ModelSpecError
from qatconv.pair_record import PairRecord

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SPEC = f"{SAMPLES / 'digits_mlp.py'}:DigitsMLP"
CALIB = SAMPLES / "digits_calib.npz"


def _load_corpus_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "qatconv_bad_inputs", ROOT / "tests" / "bad_inputs" / "make_corpus.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mc = _load_corpus_module()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mc.make_corpus(tmp_path_factory.mktemp("bad_inputs"))


from conftest import Run


def assert_clean_error(r: Run, code: int, expect: str = "") -> str:
    """Exit ``code``, one `error:` line (+ at most one `hint:` right after), no traceback."""
    assert r.code == code, (r.code, r.err[-2000:])
    assert "Traceback" not in r.err, r.err
    lines = r.err.rstrip("\n").splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    hints = [i for i, line in enumerate(lines) if line.startswith("hint: ")]
    assert len(errors) == 1, r.err
    assert len(hints) <= 1, r.err
    i = errors[0]
    assert lines[i:] in ([lines[i]], [lines[i], lines[-1]]) and (not hints or hints[0] == i + 1)
    assert len(lines[i]) > len("error: ") + 10, r.err
    assert expect.lower() in lines[i].lower(), (expect, lines[i])
    assert r.out == "", r.out  # nothing on stdout when a command fails
    return lines[i]


@pytest.mark.parametrize("case", mc.CASES, ids=[c.name for c in mc.CASES])
def test_corpus_case(case: Any, corpus: Path, tmp_path: Path, cli: Any) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = corpus / mc.MARKER_NAME
    try:
        r = cli(*case.resolve(corpus, out_dir / "o.safetensors"))
        assert not marker.exists(), "a pickle payload or recorded model code ran"
        assert_clean_error(r, case.exit_code, case.expect)
        assert sorted(p.name for p in out_dir.iterdir()) == []  # no output, no temp file
    finally:
        marker.unlink(missing_ok=True)


def test_corpus_is_regenerated_identically(corpus: Path, tmp_path: Path) -> None:
    """The script is the source of truth: a second run gives the same files."""
    again = mc.make_corpus(tmp_path / "again")
    names = sorted(p.name for p in corpus.iterdir() if p.is_file() and p.name != mc.MARKER_NAME)
    assert names == sorted(p.name for p in again.iterdir() if p.is_file())
    for name in names:
        a, b = (corpus / name).read_bytes(), (again / name).read_bytes()
        if name.endswith((".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz")) or any(
            w in name for w in ("evil", "not_model", "is_pickle")
        ):
            continue  # these embed the corpus folder (payload marker path)
        if a != b and name.endswith(".safetensors"):
            # the safetensors library orders metadata keys differently from run to run
            assert _parsed(a) == _parsed(b), name
        else:
            assert a == b, name


def _parsed(blob: bytes) -> tuple[object, bytes]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return header, blob[8 + n :]


# ------------------------------------------------------------------------------- pickles


def test_trust_pickle_runs_the_payload_as_documented(corpus: Path, tmp_path: Path,
                                                     cli: Any) -> None:
    """--trust-pickle means "run this pickle's code": the payload does run (that is the point of
    refusing it without the flag); the tensors beside it still load."""
    marker = corpus / mc.MARKER_NAME
    try:
        r = cli("inspect", corpus / "pt_malicious.pt", "--trust-pickle", "--model", SPEC,
                "--quiet")
        assert r.code == 0, r.err
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_refusal_says_trust_pickle_is_the_only_way(corpus: Path, cli: Any) -> None:
    r = cli("inspect", corpus / "pt_malicious.pt")
    line = assert_clean_error(r, 3)
    assert "needs code to unpickle" in line and "io.open" in line and "--trust-pickle" in line
    assert "hint: if you trust this file, rerun with --trust-pickle" in r.err


def test_recorded_spec_must_be_a_module_class() -> None:
    from qatconv.modelspec import check_recorded_spec

    check_recorded_spec(SPEC, "x.safetensors")  # the normal case passes
    for spec in ("subprocess:run", "os:system", "builtins:exec", "antigravity:X",
                 f"{SAMPLES / 'digits_mlp.py'}:split_path", "pathlib:Path.touch"):
        with pytest.raises(ModelSpecError, match="x.safetensors"):
            check_recorded_spec(spec, "x.safetensors")
    assert "antigravity" not in sys.modules  # refused before importing


# ---------------------------------------------------------------------- numbers and BN stats


def _state() -> dict[str, torch.Tensor]:
    return load_file(SAMPLES / "digits_mlp.safetensors")


def test_nan_message_counts_channels(corpus: Path, tmp_path: Path, cli: Any) -> None:
    s = _state()
    s["fc1.weight"][[3, 7, 9], 0] = float("nan")
    s["fc1.weight"][7, 5] = float("inf")
    save_file(s, tmp_path / "w.safetensors")
    r = cli("prepare", "--model", SPEC, "--weights", tmp_path / "w.safetensors", "--data", CALIB,
            "-o", tmp_path / "o.safetensors")
    line = assert_clean_error(r, 3)
    assert "fc1.weight has NaN/inf values in 3 of 128 output channels" in line


def test_var_message_counts_channels(tmp_path: Path, cli: Any) -> None:
    s = _state()
    s["bn2.running_var"][[0, 5, 6]] = torch.tensor([-1e-7, 0.0, 0.0])
    save_file(s, tmp_path / "w.safetensors")
    r = cli("fold", "--model", SPEC, "--weights", tmp_path / "w.safetensors",
            "-o", tmp_path / "o.safetensors")
    line = assert_clean_error(r, 3)
    assert "bn2.running_var is <= 0 in 3 of 64 channels" in line
    assert "--recalibrate-bn" in r.err  # these are repairable: var + eps > 0
    s["bn2.running_var"][9] = -1.0  # sqrt(var + eps) is NaN: nothing can use these stats
    save_file(s, tmp_path / "w.safetensors")
    r = cli("fold", "--model", SPEC, "--weights", tmp_path / "w.safetensors",
            "-o", tmp_path / "o.safetensors")
    line = assert_clean_error(r, 3)
    assert "bn2.running_var is <= 0 in 4 of 64 channels" in line
    assert "--recalibrate-bn" not in r.err


@pytest.mark.parametrize("name, channels, column", [
    ("neg_var", 3, "tiny_var"), ("zero_var", 2, "tiny_var"), ("nan_bn_weight", 2, "nonfinite"),
])
def test_inspect_reports_bad_bn_and_strict_exits_4(
    name: str, channels: int, column: str, corpus: Path, cli: Any
) -> None:
    path = corpus / f"{name}.safetensors"
    r = cli("inspect", path, "--json")
    assert r.code == 0, r.err
    health = {h["bn"]: h for h in json.loads(r.out)["bn_health"]}
    bn = "bn2" if name == "zero_var" else "bn1"
    assert health[bn][column] == channels
    r = cli("inspect", path, "--strict", "--quiet")
    assert_clean_error(r, 4, bn)


def test_recalibrate_bn_repairs_bad_statistics(tmp_path: Path, cli: Any) -> None:
    """running_var in (-eps, 0] is what --recalibrate-bn replaces, so it is not refused then;
    running_var + eps <= 0 is refused even then (the QAT forward divides by its sqrt)."""
    s = _state()
    s["bn1.running_var"][:4] = torch.tensor([0.0, 0.0, -1e-7, 0.0])
    save_file(s, tmp_path / "w.safetensors")
    out = tmp_path / "q.safetensors"
    args = ("prepare", "--model", SPEC, "--weights", tmp_path / "w.safetensors", "--data", CALIB,
            "-o", out, "--recalibrate-bn", "--quiet")
    r = cli(*args)
    assert r.code == 0, r.err
    var = load_file(out)["fc1.bn.running_var"]
    assert bool((var[:4] > 0).all())
    out.unlink()
    s["bn1.running_var"][7] = -1.0
    save_file(s, tmp_path / "w.safetensors")
    assert_clean_error(cli(*args), 3, "bn1.running_var is + eps <= 0 in 1 of 128 channels")
    assert not out.exists()


def test_zero_gamma_is_not_refused(tmp_path: Path, cli: Any) -> None:
    """gamma == 0 channels are supported by contract (their output is beta): no false alarm."""
    s = _state()
    s["bn1.weight"][:5] = 0.0
    save_file(s, tmp_path / "w.safetensors")
    r = cli("prepare", "--model", SPEC, "--weights", tmp_path / "w.safetensors", "--data", CALIB,
            "-o", tmp_path / "q.safetensors", "--quiet")
    assert r.code == 0, r.err
    r = cli("fold", tmp_path / "q.safetensors", "-o", tmp_path / "f.safetensors", "--quiet")
    assert r.code == 0, r.err
    folded = load_file(tmp_path / "f.safetensors")
    assert bool(torch.isfinite(folded["fc1.weight"]).all())
    assert bool((folded["fc1.weight"][:5] == 0).all())


def test_qat_records_validation() -> None:
    good = {"linear": "fc1", "bn": "bn1", "qat": "fc1", "eps": 1e-5, "momentum": None,
            "in_features": 4, "out_features": 3, "bias": True, "affine": False}
    assert [r.to_json() for r in validate.qat_records({"pairs": [good]}, "f")] == [good]
    assert validate.qat_records({"pairs": [{**good, "eps": 0}]}, "f")  # eps = 0 is a valid BN
    bad_values: list[tuple[str, object]] = [
        ("eps", -1.0), ("eps", float("nan")), ("eps", "1e-5"), ("eps", True), ("linear", 3),
        ("bn", ""), ("in_features", 0), ("out_features", 2.0), ("bias", "yes"),
        ("affine", 1), ("momentum", "fast"),
    ]
    for key, value in bad_values:
        with pytest.raises(CheckpointError, match=key):
            validate.qat_records({"pairs": [{**good, key: value}]}, "f")
    for meta in ({}, {"pairs": None}, {"pairs": {"fc1": good}}, {"pairs": [good, good]},
                 {"pairs": [good], "backend": "tpu"}, {"pairs": [good], "weight_bits": 16}):
        with pytest.raises(CheckpointError):
            validate.qat_records(meta, "f")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_qat_tensor_scan_counts_rows(dtype: torch.dtype, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch-free block scan agrees with torch.isfinite row by row, across block edges."""
    monkeypatch.setattr(validate, "_BLOCK_BYTES", 64)  # many blocks, rows split over them
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(37, 5, generator=gen).to(dtype)
    w[[2, 3, 30], [0, 4, 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")],
                                            dtype=dtype)
    ok = torch.ones(9, dtype=dtype)
    qparams = torch.full((4,), float("inf"))  # fake-quant state is not scanned
    save_file({"w": w, "ok": ok, "x.weight_fake_quant.activation_post_process.max_val": qparams},
              tmp_path / "q.safetensors")
    expected = int((~torch.isfinite(w)).any(dim=1).sum())
    with pytest.raises(CheckpointError, match=f"w has NaN/inf values in {expected} of 37 output"):
        validate.check_qat_tensors(tmp_path / "q.safetensors", [])
    save_file({"w": w.nan_to_num(), "ok": ok}, tmp_path / "q.safetensors")
    validate.check_qat_tensors(tmp_path / "q.safetensors", [])


def test_pairs_must_fit_the_model() -> None:
    from sample_models.digits_mlp import DigitsMLP

    rec = {"linear": "fc1", "bn": "bn1", "qat": "fc1", "eps": 1e-5, "momentum": 0.1,
           "in_features": 64, "out_features": 128, "bias": True}
    validate.check_pairs_fit_model(DigitsMLP(), [PairRecord.from_json(rec, "f")], "f")
    for change, word in (({"linear": "fc9"}, "no module 'fc9'"), ({"bn": "fc2"}, "Linear"),
                         ({"out_features": 7}, "sizes")):
        with pytest.raises(CheckpointError, match=word):
            validate.check_pairs_fit_model(
                DigitsMLP(), [PairRecord.from_json({**rec, **change}, "f")], "f"
            )


def test_load_folded_refuses_records_for_another_model(tmp_path: Path) -> None:
    from sample_models.digits_mlp import DigitsMLP

    out = tmp_path / "f.safetensors"
    api.fold(out, model_cfg=api.ModelConfig(SPEC, {}, SAMPLES / "digits_mlp.safetensors"))
    with pytest.raises(CheckpointError, match="sizes"):
        api.load_folded(DigitsMLP(hidden1=32), out)


# ------------------------------------------------------------------- --debug and bugs


def test_debug_shows_traceback_and_keeps_exit_code(corpus: Path, cli: Any) -> None:
    r = cli("inspect", corpus / "st_bad_json.safetensors", "--debug")
    assert r.code == 3
    assert "Traceback" in r.err and "CheckpointError" in r.err
    assert r.err.rstrip().splitlines()[-2].startswith("error: ")


def test_internal_error_is_one_line_without_debug(
    monkeypatch: pytest.MonkeyPatch, corpus: Path, cli: Any
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(api, "inspect_path", boom)
    r = cli("inspect", corpus / "good.safetensors")
    line = assert_clean_error(r, 1, "internal error: ZeroDivisionError: a bug")
    assert line and "--debug" in r.err
    r = cli("inspect", corpus / "good.safetensors", "--debug")
    assert r.code == 1 and "Traceback" in r.err and "ZeroDivisionError" in r.err


def test_usage_errors_name_the_command_help(cli: Any) -> None:
    r = cli("prepare", "--data", CALIB)
    assert_clean_error(r, 2, "missing option '--output'")
    assert r.err.rstrip().splitlines()[-1] == "hint: run 'qatconv prepare --help' for the options"
    r = cli()  # bare `qatconv`: the help, exit 2, no error line
    assert r.code == 2 and "Usage" in r.out + r.err and "error:" not in r.err


def test_escaped_oserror_is_bad_input(monkeypatch: pytest.MonkeyPatch, corpus: Path,
                                      cli: Any) -> None:
    def denied(*a: object, **k: object) -> None:
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(api, "inspect_path", denied)
    assert_clean_error(cli("inspect", corpus / "good.safetensors"), 3, "/some/file")


def test_real_interpreter_debug_and_plain(corpus: Path) -> None:
    """The real entry point (`python -m qatconv`): traceback only with --debug, same exit code.

    (inspect of a .safetensors file imports no torch, so these two runs are quick.)
    """
    bad = str(corpus / "st_bad_json.safetensors")
    env = {**os.environ, "QATCONV_DEBUG": ""}
    runs = [
        subprocess.run([sys.executable, "-m", "qatconv", "inspect", bad, *extra], check=False,
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        for extra in ([], ["--debug"])
    ]
    plain, debug = runs
    assert (plain.returncode, debug.returncode) == (3, 3), (plain.stderr, debug.stderr)
    assert "Traceback" not in plain.stderr and plain.stderr.startswith("error: ")
    assert len(plain.stderr.splitlines()) == 2 and "hint: " in plain.stderr
    assert "Traceback" in debug.stderr and "error: " in debug.stderr
