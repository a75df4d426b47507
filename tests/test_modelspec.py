"""Tests for qatconv.modelspec: --model-arg parsing, both spec forms, and every failure."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

from qatconv.errors import ModelSpecError, UsageError
from qatconv.modelspec import build_model, parse_model_args

REPO = Path(__file__).resolve().parents[1]

NET_PY = """
import torch
from torch import nn

WIDTH = 4
not_a_model = 3


class Net(nn.Module):
    def __init__(self, hidden: int = 4, act: str = "relu") -> None:
        super().__init__()
        self.fc = nn.Linear(3, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = act

    def forward(self, x):
        return self.bn(self.fc(x))


def make(hidden: int = 4) -> nn.Module:
    return Net(hidden=hidden)


def make_nothing():
    return {"fc": 1}


def broken(hidden: int = 4):
    raise ValueError("hidden must be even\\nsecond line")


class Zoo:
    @staticmethod
    def small() -> nn.Module:
        return Net(hidden=2)


instance = Net()
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def net_py(tmp_path: Path) -> Path:
    return write(tmp_path, "net.py", NET_PY)


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # build_model puts model folders on sys.path; keep the test process clean.
    monkeypatch.setattr(sys, "path", list(sys.path))


# ------------------------------------------------------------------------------ parse_model_args


def test_parse_model_args_json_and_strings() -> None:
    args = parse_model_args(
        ["hidden=64", "lr=0.5", "bias=true", "dims=[1, 2]", "extra=null", "act=relu",
         "expr=a=b", "empty=", "quoted=\"7\""]
    )  # fmt: skip
    assert args == {"hidden": 64, "lr": 0.5, "bias": True, "dims": [1, 2], "extra": None,
                    "act": "relu", "expr": "a=b", "empty": "", "quoted": "7"}  # fmt: skip
    assert parse_model_args([]) == {}


@pytest.mark.parametrize("item", ["hidden", "=3", "not-ident=1", "2x=1"])
def test_parse_model_args_malformed(item: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_model_args([item])
    assert info.value.exit_code == 2
    assert item in info.value.message


def test_parse_model_args_duplicate() -> None:
    with pytest.raises(UsageError, match="twice"):
        parse_model_args(["a=1", "a=2"])


# --------------------------------------------------------------------------------- build_model


def test_file_spec_class_with_args(net_py: Path) -> None:
    model = build_model(f"{net_py}:Net", {"hidden": 6, "act": "gelu"})
    assert type(model).__name__ == "Net"
    assert model.fc.out_features == 6 and model.act == "gelu"
    assert not model.training and not model.bn.training


def test_file_spec_factory_and_dotted_name(net_py: Path) -> None:
    assert build_model(f"{net_py}:make", {"hidden": 8}).fc.out_features == 8
    assert build_model(f"{net_py}:Zoo.small").fc.out_features == 2


def test_same_file_gives_same_class_new_instances(net_py: Path) -> None:
    a, b = build_model(f"{net_py}:Net"), build_model(f"{net_py}:Net")
    assert type(a) is type(b) and a is not b


def test_same_file_name_in_two_folders(tmp_path: Path) -> None:
    one = write(
        tmp_path / "one", "model.py", "from torch import nn\nNet = lambda: nn.Linear(1, 1)\n"
    )
    two = write(
        tmp_path / "two", "model.py", "from torch import nn\nNet = lambda: nn.Linear(2, 2)\n"
    )
    assert build_model(f"{one}:Net").in_features == 1
    assert build_model(f"{two}:Net").in_features == 2


def test_relative_path_and_sibling_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models"
    write(folder, "helper_abs_q1.py", "WIDTH = 5\n")
    write(folder, "helper_rel_q1.py", "WIDTH = 7\n")
    write(
        folder,
        "mlp.py",
        """
        from torch import nn
        from helper_abs_q1 import WIDTH as A
        from .helper_rel_q1 import WIDTH as B

        def build():
            return nn.Linear(A, B)
        """,
    )
    monkeypatch.chdir(tmp_path)
    model = build_model("models/mlp.py:build")
    assert (model.in_features, model.out_features) == (5, 7)


def test_sample_model_spec() -> None:
    model = build_model(f"{REPO / 'sample_models' / 'digits_mlp.py'}:DigitsMLP", {"hidden1": 16})
    assert model.fc1.out_features == 16
    (x,) = model.example_inputs()
    assert model(x).shape == (8, 10)


def test_module_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "qspec_pkg_a", "__init__.py", "")
    write(tmp_path / "qspec_pkg_a", "net.py", NET_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("qspec_pkg_a.net:Net", {"hidden": 3})
    assert model.fc.out_features == 3 and not model.training
    # the torch package itself works as a spec target
    linear = build_model("torch.nn:Linear", {"in_features": 2, "out_features": 3})
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (3, 2)


def test_module_spec_found_from_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "qspec_pkg_cwd", "__init__.py", "")
    write(tmp_path / "qspec_pkg_cwd", "net.py", NET_PY)
    monkeypatch.chdir(tmp_path)
    for entry in ("", str(tmp_path)):
        while entry in sys.path:
            sys.path.remove(entry)
    assert build_model("qspec_pkg_cwd.net:make").fc.out_features == 4


def test_failed_import_is_retried_after_fix(tmp_path: Path) -> None:
    path = write(tmp_path, "flaky.py", "raise RuntimeError('not yet')\n")
    with pytest.raises(ModelSpecError, match="not yet"):
        build_model(f"{path}:Net")
    path.write_text("from torch import nn\nNet = lambda: nn.Identity()\n")
    assert isinstance(build_model(f"{path}:Net"), nn.Identity)


# ------------------------------------------------------------------------------------ failures


def spec_error(spec: str, args: dict[str, object] | None = None) -> ModelSpecError:
    with pytest.raises(ModelSpecError) as info:
        build_model(spec, args)
    err = info.value
    assert err.exit_code == 3
    assert spec in err.message, err.message
    assert "\n" not in err.message
    assert err.hint
    return err


def test_error_no_name(net_py: Path) -> None:
    assert "':NAME'" in spec_error(str(net_py)).message
    spec_error("qspec.models")
    spec_error(f"{net_py}:")


def test_error_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in spec_error(f"{tmp_path / 'nope.py'}:Net").message


def test_error_import_raises(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.py", "import torch\nraise ValueError('boom at import')\n")
    err = spec_error(f"{bad}:Net")
    assert "ValueError: boom at import" in err.message
    assert isinstance(err.__cause__, ValueError)  # --debug shows the user's traceback


def test_error_syntax_error(tmp_path: Path) -> None:
    bad = write(tmp_path, "syn.py", "def f(:\n")
    assert "SyntaxError" in spec_error(f"{bad}:f").message


def test_error_missing_dependency(tmp_path: Path) -> None:
    bad = write(tmp_path, "dep.py", "import qspec_not_installed_pkg\n")
    err = spec_error(f"{bad}:Net")
    assert "qspec_not_installed_pkg" in err.message
    assert "qspec_not_installed_pkg" in (err.hint or "")


def test_error_sys_exit_at_import(tmp_path: Path) -> None:
    bad = write(tmp_path, "script.py", "import sys\nsys.exit(2)\n")
    assert "SystemExit" in spec_error(f"{bad}:Net").message


def test_error_missing_module() -> None:
    err = spec_error("qspec_no_such_pkg.models:Net")
    assert "no module named 'qspec_no_such_pkg'" in err.message


def test_error_missing_name_lists_classes(net_py: Path) -> None:
    err = spec_error(f"{net_py}:Nett")
    assert "has no attribute 'Nett'" in err.message
    assert "Net" in (err.hint or "")


def test_error_not_callable(net_py: Path) -> None:
    assert "int, not a class or function" in spec_error(f"{net_py}:not_a_model").message


def test_error_module_instance(net_py: Path) -> None:
    err = spec_error(f"{net_py}:instance")
    assert "instance" in err.message and "Net" in (err.hint or "")


def test_error_constructor_raises(net_py: Path) -> None:
    err = spec_error(f"{net_py}:broken")
    assert "ValueError: hidden must be even" in err.message
    assert "second line" not in err.message
    assert isinstance(err.__cause__, ValueError)


def test_error_bad_arguments(net_py: Path) -> None:
    err = spec_error(f"{net_py}:Net", {"hiden": 3})
    assert "hiden" in err.message and "--model-arg" in (err.hint or "")


def test_error_argument_value_breaks_constructor(net_py: Path) -> None:
    err = spec_error(f"{net_py}:Net", {"hidden": "wide"})
    assert "TypeError" in err.message


def test_error_returns_non_module(net_py: Path) -> None:
    assert "returned a dict, not an nn.Module" in spec_error(f"{net_py}:make_nothing").message


def test_error_bad_name_syntax(net_py: Path) -> None:
    spec_error(f"{net_py}:Net()")


def test_error_builtin_callable_returning_tensor() -> None:
    # A C callable without an inspectable signature still gets a clean error.
    assert "returned a Tensor" in spec_error("torch:ones", {"size": [2]}).message
    assert "TypeError" in spec_error("torch:zeros").message


# ------------------------------------------------------------- specs recorded in checkpoints

RECORDED_PY = """
import functools
from pathlib import Path
from subprocess import run

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3, hidden)
        self.bn = nn.BatchNorm1d(hidden)

    def forward(self, x):
        return self.bn(self.fc(x))


def build(hidden: int = 4):
    return Net(hidden)


def where() -> Path:
    return Path(".")


class Config:
    pass


partial_build = functools.partial(build, 5)
"""


def test_recorded_spec_accepts_factories_and_refuses_non_model_code(tmp_path: Path) -> None:
    from qatconv.modelspec import check_recorded_spec

    (tmp_path / "rec.py").write_text(RECORDED_PY)
    f = tmp_path / "rec.py"
    (tmp_path / "annotated_pkg").mkdir()
    (tmp_path / "annotated_pkg" / "__init__.py").write_text(
        "from torch import nn\n\n"
        "def make() -> nn.Linear:\n    return nn.Linear(2, 2)\n\n"
        "def make_bare():\n    return nn.Linear(2, 2)\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        check_recorded_spec("annotated_pkg:make", "ck")
        with pytest.raises(ModelSpecError, match="not annotated to return an nn.Module"):
            check_recorded_spec("annotated_pkg:make_bare", "ck")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("annotated_pkg", None)
    for ok in (f"{f}:Net", f"{f}:build", "torch.nn:Linear"):
        check_recorded_spec(ok, "ck")
    refused = {
        f"{f}:run": "subprocess.run, not a function defined in that file",
        f"{f}:where": "returns Path",
        f"{f}:Config": "not an nn.Module",
        f"{f}:partial_build": "partial, not a class or a function",
        "subprocess:run": "not model code",
        "torch.hub:load": "not a model factory",
        "numpy:load": "not a model factory",
        # Evaluates its argument before any result check could run (an installed torch
        # dependency); unannotated package functions are refused for that reason.
        "sympy:sympify": "not annotated to return an nn.Module",
        f"{Path(__import__('subprocess').__file__)}:run": "not model code",
    }
    for spec, why in refused.items():
        with pytest.raises(ModelSpecError, match="ck") as info:
            check_recorded_spec(spec, "ck")
        assert why in info.value.message, (spec, info.value.message)


def test_recorded_spec_is_relative_with_an_absolute_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qatconv.modelspec import record_spec, spec_from_record

    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "rec.py").write_text(RECORDED_PY)
    monkeypatch.chdir(project)
    rec = record_spec(f"{project / 'models' / 'rec.py'}:build")
    assert rec == {"spec": "models/rec.py:build",
                   "spec_resolved": f"{(project / 'models' / 'rec.py').as_posix()}:build"}
    assert record_spec("torch.nn:Linear") == {"spec": "torch.nn:Linear"}
    spec, how = spec_from_record(rec, "ck")
    assert spec == "models/rec.py:build" and "relative to the working directory" in how
    monkeypatch.chdir(tmp_path)  # another folder: the relative form misses, the absolute finds
    spec, how = spec_from_record(rec, "ck")
    assert spec == rec["spec_resolved"] and "absolute path" in how
    moved = tmp_path / "moved"
    (project).rename(moved)  # the project moved: run from its new root, the relative form wins
    monkeypatch.chdir(moved)
    spec, how = spec_from_record(rec, "ck")
    assert spec == "models/rec.py:build" and isinstance(build_model(spec), nn.Module)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSpecError, match="does not exist here"):
        spec_from_record(rec, "ck")


def test_model_free_check_of_a_factory_built_model(tmp_path: Path, cli: object,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare with a factory, then `fold QAT --check DATA` with no --model, from the project
    folder and from elsewhere; the folded model matches the float model."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from qatconv import api

    project = tmp_path / "project"
    project.mkdir()
    (project / "rec.py").write_text(RECORDED_PY)
    monkeypatch.chdir(project)
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    np.savez(project / "x.npz", inputs=x.numpy())
    model = build_model("rec.py:build")
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    save_file(model.state_dict(), project / "w.safetensors")
    r = cli("prepare", "-m", "rec.py:build", "-w", "w.safetensors", "--data", "x.npz",
            "-o", "q.safetensors", "--quiet")
    assert r.code == 0, r.err
    r = cli("fold", "q.safetensors", "-o", "f.safetensors", "--check", "x.npz", "--json")
    assert r.code == 0, r.err
    assert "rec.py:build from the checkpoint (relative to the working directory)" in r.err
    monkeypatch.chdir(tmp_path)
    r = cli("fold", project / "q.safetensors", "-o", "f2.safetensors", "--check",
            project / "x.npz")
    assert r.code == 0, r.err
    assert "(by its absolute path)" in r.err
    folded = api.load_folded(build_model(f"{project / 'rec.py'}:build"), "f2.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)
