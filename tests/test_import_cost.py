"""What `prepare` (calibrate and fine-tune) and a plain `fold --model --weights` leave unimported:
torch._dynamo (torch.optim's optimizers import it, 1.5-2.6 s; see qatconv/optim.py), sympy and
torch.fx.experimental.symbolic_shapes (ShapeProp imports them, 0.65-1.0 s; see
`_ShapeRecorder` in qatconv/pairs.py).

One fresh interpreter (this one may have imported them already) runs the commands in-process
through `qatconv.cli.main` and reports the exit codes and which of the modules it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
WATCHED = ("torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes")

SCRIPT = r"""
import contextlib, io, json, sys
from qatconv.cli import main

codes = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main(argv)
            codes.append([0, ""])
        except SystemExit as e:
            codes.append([e.code if isinstance(e.code, int) else 1, err.getvalue()])
print(json.dumps({"codes": codes, "imported": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def test_prepare_and_plain_fold_import_neither_dynamo_nor_sympy(tmp_path: Path) -> None:
    model = ["--model", str(SAMPLES / "digits_mlp.py:DigitsMLP"),
             "--weights", str(SAMPLES / "digits_mlp.safetensors")]
    prepare = ["prepare", *model, "--data", str(SAMPLES / "digits_calib.npz"), "--threads", "1",
               "--no-sensitivity", "--quiet", "--force"]
    finetune = [*prepare, "--mode", "finetune", "--steps", "3", "--batch-size", "16"]
    argvs = [
        [*prepare, "-o", str(tmp_path / "calibrated.safetensors")],  # pairs found on the data
        [*finetune, "-o", str(tmp_path / "adam.safetensors")],
        [*finetune, "--optimizer", "sgd", "-o", str(tmp_path / "sgd.safetensors")],
        ["fold", *model, "--quiet", "-o", str(tmp_path / "folded.safetensors")],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("QATCONV_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(argvs), json.dumps(WATCHED)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["codes"] == [[0, ""]] * len(argvs)
    assert report["imported"] == []
