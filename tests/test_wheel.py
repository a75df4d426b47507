"""The wheel carries the bundled samples: `pip install` it, then `qatconv demo` (and a model-free
`fold --check` of what the demo wrote) run from a folder outside the clone.

Fast by design (~20 s, most of it the demo): the wheel is built without build isolation and
installed with --no-deps into a target folder, so the current interpreter's torch is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd, env=env,
                          check=False)


def test_installed_wheel_runs_the_demo_from_any_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: building writes build/ and egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("qatconv", "sample_models"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src),
                  "-w", str(tmp_path / "wheel")], tmp_path, env)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("qatconv-*.whl")
    site = tmp_path / "site"
    installed = _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                     tmp_path, env)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert (site / "qatconv" / "_samples" / "digits_mlp.safetensors").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(site)
    where = _run([sys.executable, "-c", "import qatconv; print(qatconv.__file__)"], elsewhere,
                 env)
    assert Path(where.stdout.strip()).is_relative_to(site)  # the wheel, not the clone
    demo = _run([sys.executable, "-m", "qatconv", "demo", "--output-dir", "out", "--json"],
                elsewhere, env)
    assert demo.returncode == 0, demo.stderr[-2000:]
    result = json.loads(demo.stdout)
    assert result["qat_accuracy"]["8"] > 0.9 and result["max_fold_error"] < 1e-3
    qat = next(Path(f) for f in result["files"] if "finetune_w8" in Path(f).name)
    heldout = site / "qatconv" / "_samples" / "digits_heldout.npz"
    fold = _run([sys.executable, "-m", "qatconv", "fold", str(qat), "-o", "f.safetensors",
                 "--check", str(heldout), "--json"], elsewhere, env)
    assert fold.returncode == 0, fold.stderr[-2000:]
    assert json.loads(fold.stdout)["check"]["passed"]
