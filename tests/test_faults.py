"""Faults around a run: unusable outputs, disk full, signals, inputs changed while being read.

Each case must end with its documented exit code (3 for environment and output problems, 130
for SIGINT/SIGTERM), one `error:` line, and nothing left in the output folder: no output, no
temp file, no staging folder. Most run in-process; disk full (RLIMIT_FSIZE) and the signals use
real subprocesses, started together to share the interpreter start-up time.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from qatconv import api, st_format
from qatconv import checkpoint as ck

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SPEC = f"{SAMPLES / 'digits_mlp.py'}:DigitsMLP"
WEIGHTS = SAMPLES / "digits_mlp.safetensors"
CALIB = SAMPLES / "digits_calib.npz"
TRAIN = SAMPLES / "digits_train.npz"


from conftest import Run


def assert_error(r: Run, code: int, expect: str = "") -> None:
    assert r.code == code, (r.code, r.err[-2000:])
    assert "Traceback" not in r.err, r.err
    errors = [line for line in r.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.err
    assert len([line for line in r.err.splitlines() if line.startswith("hint: ")]) <= 1
    assert expect.lower() in errors[0].lower(), (expect, errors[0])


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_args(out: Path, weights: Path = WEIGHTS, data: Path = CALIB) -> list[object]:
    return ["prepare", "--model", SPEC, "--weights", weights, "--data", data, "-o", out, "--quiet"]


@pytest.fixture(scope="module")
def qat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qat") / "qat.safetensors"
    api.prepare(api.ModelConfig(SPEC, {}, WEIGHTS), CALIB, path)
    return path


# --------------------------------------------------------------------------------- outputs


def test_output_folder_missing(tmp_path: Path, qat_ckpt: Path, cli: Any) -> None:
    out = tmp_path / "nope" / "q.safetensors"
    assert_error(cli(*prepare_args(out)), 3, "does not exist")
    assert_error(cli("fold", qat_ckpt, "-o", out), 3, "does not exist")
    assert not out.parent.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_read_only(tmp_path: Path, qat_ckpt: Path, cli: Any) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_error(cli(*prepare_args(ro / "q.safetensors")), 3, "not writable")
        assert_error(cli("fold", qat_ckpt, "-o", ro / "f.safetensors"), 3, "not writable")
        assert files_in(ro) == []
    finally:
        ro.chmod(0o755)


def test_output_folder_refuses_writes(
    tmp_path: Path, qat_ckpt: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that looks writable but refuses the temp file (read-only mount, ACLs; also
    what root sees on a read-only filesystem): exit 3, nothing left."""
    real_open = os.open

    def no_create(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR) and str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_create)  # mkstemp and StreamWriter both use os.open
    assert_error(cli(*prepare_args(tmp_path / "q.safetensors")), 3, "permission denied")
    assert_error(cli("fold", qat_ckpt, "-o", tmp_path / "f.safetensors"), 3, "permission denied")
    assert_error(cli("fold", "--model", SPEC, "--weights", WEIGHTS, "-o",
                     tmp_path / "g.safetensors"), 3, "permission denied")
    assert files_in(tmp_path) == []


def test_output_is_an_input(tmp_path: Path, qat_ckpt: Path, cli: Any) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(WEIGHTS.read_bytes())
    data = tmp_path / "d.npz"
    data.write_bytes(CALIB.read_bytes())
    qat = tmp_path / "qat.safetensors"
    qat.write_bytes(qat_ckpt.read_bytes())
    (tmp_path / "link.safetensors").symlink_to(qat)
    os.link(qat, tmp_path / "hard.safetensors")
    before = {p: sha(p) for p in (weights, data, qat)}
    cases = [
        prepare_args(weights, weights, data),
        prepare_args(data, weights, data),
        [*prepare_args(tmp_path / "sub" / ".." / "w.safetensors", weights, data), "--force"],
        ["fold", qat, "-o", qat, "--force"],
        ["fold", qat, "-o", tmp_path / "link.safetensors", "--force"],
        ["fold", qat, "-o", tmp_path / "hard.safetensors", "--force"],
        ["fold", qat, "-o", data, "--check", data, "--force"],
        ["fold", "--model", SPEC, "--weights", weights, "-o", weights, "--force"],
    ]
    (tmp_path / "sub").mkdir()
    for args in cases:
        assert_error(cli(*args), 3, "input")
    assert {p: sha(p) for p in before} == before
    assert files_in(tmp_path) == ["d.npz", "hard.safetensors", "link.safetensors",
                                  "qat.safetensors", "sub", "w.safetensors"]


def test_existing_output_needs_force(tmp_path: Path, qat_ckpt: Path, cli: Any) -> None:
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"precious")
    assert_error(cli(*prepare_args(out)), 3, "already exists")
    assert_error(cli("fold", qat_ckpt, "-o", out), 3, "exists")
    assert_error(cli("fold", "--model", SPEC, "--weights", WEIGHTS, "-o", out), 3, "exists")
    assert out.read_bytes() == b"precious"
    assert files_in(tmp_path) == ["q.safetensors"]
    r = cli(*prepare_args(out), "--force")
    assert r.code == 0, r.err
    assert set(load_file(out)) >= {"fc1.weight", "fc1.bn.running_var"}
    assert files_in(tmp_path) == ["q.safetensors"]


def test_output_is_a_folder(tmp_path: Path, qat_ckpt: Path, cli: Any) -> None:
    (tmp_path / "d.safetensors").mkdir()
    assert_error(cli(*prepare_args(tmp_path / "d.safetensors"), "--force"), 3, "folder")
    assert_error(cli("fold", qat_ckpt, "-o", tmp_path / "d.safetensors", "--force"), 3, "folder")
    assert files_in(tmp_path / "d.safetensors") == []


# ------------------------------------------------------------------------------- disk full


def test_disk_full_in_process(
    tmp_path: Path, qat_ckpt: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC half way through the data: exit 3 naming the file, the temp file removed."""
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if tmp_path in target.parents and os.fstat(fd).st_size > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "copy_file_range", _fail_nosys, raising=False)
    monkeypatch.setattr(os, "sendfile", _fail_nosys)
    assert_error(cli("fold", qat_ckpt, "-o", tmp_path / "f.safetensors"), 3, "no space left")
    assert_error(cli("fold", qat_ckpt, "-o", tmp_path / "f.safetensors", "--check", CALIB), 3,
                 "no space left")
    assert files_in(tmp_path) == []


def test_disk_full_when_reserving(
    tmp_path: Path, qat_ckpt: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold reserves each output file whole before writing it: a full disk fails there
    (exit 3, the temp file removed), never as a SIGBUS on a page of the mapped output."""

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert_error(cli("fold", qat_ckpt, "-o", tmp_path / "f.safetensors"), 3, "no space left")
    assert_error(cli("fold", qat_ckpt, "-o", tmp_path / "g.safetensors", "--max-shard-size",
                     "20000"), 3, "no space left")  # fmt: skip
    assert files_in(tmp_path) == []


def _fail_nosys(*a: object, **k: object) -> int:
    raise OSError(errno.ENOSYS, "not here")  # forces StreamWriter's pread + os.write fallback


def test_disk_full_rlimit_fsize(tmp_path: Path, qat_ckpt: Path) -> None:
    """A real EFBIG from the kernel (RLIMIT_FSIZE; SIGXFSZ ignored so write() fails instead of
    killing the process): prepare, plain fold and sharded fold each exit 3, leaving nothing."""
    out = tmp_path / "out"
    out.mkdir()
    runner = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))
        from qatconv.cli import main
        for argv in sys.argv[1:]:
            try:
                main(argv.split("|"))
            except SystemExit as e:
                print(e.code, flush=True)
    """)
    commands = [
        prepare_args(out / "q.safetensors"),
        ["fold", "--model", SPEC, "--weights", WEIGHTS, "-o", out / "f.safetensors", "--quiet"],
        ["fold", qat_ckpt, "-o", out / "g.safetensors", "--max-shard-size", "20000", "--quiet"],
    ]
    p = subprocess.run(
        [sys.executable, "-c", runner, *("|".join(map(str, c)) for c in commands)],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert p.stdout.split() == ["3", "3", "3"], p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and all("File too large" in e for e in errors), p.stderr
    assert files_in(out) == []


# --------------------------------------------------------------------------------- signals


def test_sigint_and_sigterm_during_finetune(tmp_path: Path) -> None:
    """A real signal in the middle of fine-tuning: exit 130, one error line, nothing written."""
    procs = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        out.mkdir()
        cmd = [sys.executable, "-m", "qatconv", "prepare", "--model", SPEC, "--weights",
               str(WEIGHTS), "--data", str(TRAIN), "--mode", "finetune", "--steps", "100000",
               "-o", str(out / "q.safetensors")]  # fmt: skip
        procs.append((sig, out, subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE,
                                                 text=True)))
    try:
        for sig, _, p in procs:
            assert p.stderr is not None
            first = p.stderr.readline()  # the plain progress line of the first step
            assert first.startswith("fine-tune: "), first
            time.sleep(0.5)
            p.send_signal(sig)
        for sig, out, p in procs:
            assert p.stderr is not None
            rest = p.stderr.read()
            assert p.wait(timeout=60) == 130, (sig, rest)
            assert "Traceback" not in rest
            errors = [line for line in rest.splitlines() if line.startswith("error: ")]
            assert errors == ["error: interrupted; no output was written"], rest
            assert files_in(out) == []
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("command", ["prepare", "fold", "fold-check"])
def test_interrupt_while_writing_leaves_nothing(
    command: str, tmp_path: Path, qat_ckpt: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C at the worst moment (the output's fsync, just before the rename): exit 130."""

    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    out = tmp_path / "o.safetensors"
    args = {
        "prepare": prepare_args(out),
        "fold": ["fold", qat_ckpt, "-o", out],
        "fold-check": ["fold", qat_ckpt, "-o", out, "--check", CALIB],
    }[command]
    handler = signal.getsignal(signal.SIGTERM)
    assert_error(cli(*args), 130, "interrupted")
    assert files_in(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is handler  # main restores the SIGTERM handler


def test_interrupt_outside_the_long_commands(
    qat_ckpt: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in `inspect` (typer turns it into a bare Exit(130)): still one error line, 130."""

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "inspect_path", interrupted)
    assert_error(cli("inspect", qat_ckpt), 130, "interrupted")


# -------------------------------------------------------------- inputs changed while read


def _truncate_after_parse(monkeypatch: pytest.MonkeyPatch, target: Path, at_call: int) -> list[int]:
    """Cut ``target`` in half right after its header is parsed for the ``at_call``-th time."""
    real = st_format.parse_header
    calls: list[int] = []

    def parse(path: Path, raw: bytes, file_size: int) -> st_format.Header:
        header = real(path, raw, file_size)
        if Path(path) == target:
            calls.append(1)
            if len(calls) == at_call:
                os.truncate(target, file_size // 2)
        return header

    monkeypatch.setattr(st_format, "parse_header", parse)
    return calls


def test_weights_truncated_while_read(tmp_path: Path, cli: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(WEIGHTS.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    # Parse 1 is prepare's look at the metadata (is this already a QAT file?); 2 is the load.
    _truncate_after_parse(monkeypatch, weights, 2)
    assert_error(cli(*prepare_args(out / "q.safetensors", weights)), 3, "truncated or changed")
    assert files_in(out) == []


@pytest.mark.parametrize("at_call", [1, 2, 3])
def test_qat_checkpoint_truncated_while_folding(
    at_call: int, tmp_path: Path, qat_ckpt: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever read sees the file cut (metadata, validation, the streaming fold): exit 3."""
    qat = tmp_path / "qat.safetensors"
    qat.write_bytes(qat_ckpt.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    calls = _truncate_after_parse(monkeypatch, qat, at_call)
    assert_error(cli("fold", qat, "-o", out / "f.safetensors"), 3)
    assert len(calls) >= at_call
    assert files_in(out) == []


def test_weights_replaced_while_read_are_read_whole(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training job renaming a new checkpoint over the one being read: qatconv reads the old
    file consistently (one descriptor), so the output equals a run on the old file."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(WEIGHTS.read_bytes())
    newer = {k: (v * 2 if v.is_floating_point() else v) for k, v in load_file(WEIGHTS).items()}
    save_file(newer, tmp_path / "newer.safetensors")
    baseline = tmp_path / "baseline.safetensors"
    assert cli(*prepare_args(baseline, weights)).code == 0
    real = st_format.parse_header
    swapped: list[bool] = []
    parses: list[int] = []

    def parse(path: Path, raw: bytes, file_size: int) -> st_format.Header:
        header = real(path, raw, file_size)
        if Path(path) == weights:
            parses.append(1)
        # Parse 1 is prepare's metadata peek; swap while the load (parse 2) reads the file.
        if Path(path) == weights and len(parses) == 2 and not swapped:
            os.replace(tmp_path / "newer.safetensors", weights)
            swapped.append(True)
        return header

    monkeypatch.setattr(st_format, "parse_header", parse)
    out = tmp_path / "q.safetensors"
    r = cli(*prepare_args(out, weights))
    assert r.code == 0, r.err
    assert swapped and out.read_bytes() == baseline.read_bytes()


def test_checkpoint_reader_never_maps_the_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A truncated mmap kills the process with SIGBUS; the reader must use plain reads."""
    import mmap

    def no_mmap(*a: object, **k: object) -> None:
        raise AssertionError("mmap used")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    tensors = ck.load_checkpoint(WEIGHTS).tensors
    reference = load_file(WEIGHTS)
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)
