"""Shared test setup: the repo root on sys.path (for `sample_models`), quiet torch.ao warnings."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", category=DeprecationWarning)

SAMPLES = ROOT / "sample_models"


@pytest.fixture
def samples() -> Path:
    return SAMPLES


class Run:
    """One in-process CLI run: exit code, stdout, stderr."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> dict[str, Any]:
        obj = json.loads(self.out)  # raises on any text around the one object
        assert isinstance(obj, dict)
        return obj


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `qatconv ARGS...` in-process through `qatconv.cli.main`; returns a `Run`."""
    from qatconv.cli import main

    def run(*args: object) -> Run:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        cap = capsys.readouterr()
        return Run(code, cap.out, cap.err)

    return run
