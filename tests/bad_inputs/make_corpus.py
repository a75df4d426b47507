"""Write the corpus of malformed inputs that qatconv must refuse cleanly.

Every file is generated from the bundled digits sample (its checkpoint, data and a QAT
checkpoint made from them), so nothing binary is committed and the corpus can be rebuilt at
any time:

    python tests/bad_inputs/make_corpus.py OUT_DIR      # writes the files, prints the cases

`CASES` describes each case: the qatconv command line (with ``{corpus}``, ``{samples}``,
``{model}``, ``{out}`` and ``{marker}`` placeholders), the exit code the contract asks for, and a
word the `error:` line must contain. `tests/test_hardening.py` runs them all.

The "malicious" files carry a pickle payload that creates the file ``{marker}`` when unpickled
with code execution allowed, and a QAT checkpoint whose metadata names `subprocess:run` as the
model: a correct qatconv never runs either.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"
MODEL = f"{SAMPLES / 'digits_mlp.py'}:DigitsMLP"
MARKER_NAME = "PAYLOAD_RAN"


@dataclass(frozen=True)
class Case:
    """One bad input and what qatconv must answer.

    Attributes:
        name: unique id (the pytest parameter id).
        argv: the command line after ``qatconv``, with placeholders (see the module docstring).
        exit_code: the documented exit code.
        expect: a lowercase word or phrase the ``error:`` line must contain.
        writes: whether the command would write ``{out}`` if it succeeded (then it must not exist).
    """

    name: str
    argv: tuple[str, ...]
    exit_code: int = 3
    expect: str = ""
    writes: bool = True

    def resolve(self, corpus: Path, out: Path) -> list[str]:
        subst = {
            "corpus": str(corpus),
            "samples": str(SAMPLES),
            "model": MODEL,
            "out": str(out),
            "marker": str(corpus / MARKER_NAME),
        }
        return [a.format(**subst) for a in self.argv]


# ------------------------------------------------------------------------------------- payloads


class CreateFile:
    """Unpickling this calls ``open(path, "w")``: the file appears iff the pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------- safetensors


def _st_bytes(header: dict[str, object] | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _split(path: Path) -> tuple[dict[str, object], bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _tensor_entries(header: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])  # type: ignore[index]


def _safetensors_cases(d: Path) -> None:
    good = d / "good.safetensors"
    header, data = _split(good)
    entries = _tensor_entries(header)
    first, second, last = "fc1.weight", entries[1][0], entries[-1][0]

    def edit(name: str, change: Callable[[dict[str, object]], None], payload: bytes = data) -> None:
        h = json.loads(json.dumps(header))
        change(h)
        (d / f"{name}.safetensors").write_bytes(_st_bytes(h, payload))

    blob = good.read_bytes()
    (d / "st_truncated.safetensors").write_bytes(blob[:-100])
    (d / "st_padded.safetensors").write_bytes(blob + b"\0" * 64)
    (d / "st_empty.safetensors").write_bytes(b"")
    (d / "st_tiny.safetensors").write_bytes(b"\x01\x02\x03")
    (d / "st_header_len_past_eof.safetensors").write_bytes(
        struct.pack("<Q", len(blob) + 1000) + blob[8:]
    )
    (d / "st_header_len_huge.safetensors").write_bytes(struct.pack("<Q", 2**64 - 1) + blob[8:])
    (d / "st_bad_json.safetensors").write_bytes(_st_bytes(b'{"fc1.weight": {"dtype": "F32",', data))
    (d / "st_not_utf8.safetensors").write_bytes(_st_bytes(b"\xff\xfe\xfa" * 8, data))
    (d / "st_json_list.safetensors").write_bytes(_st_bytes(b"[1, 2, 3]", data))
    (d / "st_deep_json.safetensors").write_bytes(_st_bytes(b"[" * 200_000, data))
    (d / "st_huge_int.safetensors").write_bytes(
        _st_bytes(b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
                  b"\0" * 4)
    )
    (d / "st_no_tensors.safetensors").write_bytes(_st_bytes({"__metadata__": {"format": "pt"}}, b""))

    def overlap(h: dict[str, object]) -> None:
        b, e = h[second]["data_offsets"]  # type: ignore[index]
        h[second]["data_offsets"] = [b - 8, e - 8]  # type: ignore[index]

    edit("st_overlap", overlap)

    def out_of_range(h: dict[str, object]) -> None:
        b, e = h[last]["data_offsets"]  # type: ignore[index]
        h[last]["data_offsets"] = [b + 4096, e + 4096]  # type: ignore[index]

    edit("st_offsets_out_of_range", out_of_range)

    def reversed_offsets(h: dict[str, object]) -> None:
        b, e = h[first]["data_offsets"]  # type: ignore[index]
        h[first]["data_offsets"] = [e, b]  # type: ignore[index]

    edit("st_offsets_reversed", reversed_offsets)
    edit("st_unknown_dtype", lambda h: h[first].update(dtype="F128"))  # type: ignore[union-attr]
    edit("st_dtype_not_string", lambda h: h[first].update(dtype=7))  # type: ignore[union-attr]

    def shape_bytes(h: dict[str, object]) -> None:
        shape = h[first]["shape"]  # type: ignore[index]
        h[first]["shape"] = [shape[0] + 1, *shape[1:]]  # type: ignore[index]

    edit("st_shape_size_mismatch", shape_bytes)
    edit("st_negative_dim", lambda h: h[first].update(shape=[-1]))  # type: ignore[union-attr]
    edit("st_float_dim", lambda h: h[first].update(shape=[2.5]))  # type: ignore[union-attr]
    edit("st_entry_not_object", lambda h: h.update({first: "tensor"}))
    edit("st_metadata_not_strings", lambda h: h.update({"__metadata__": {"format": 1}}))
    # A zero-element tensor with an absurd dimension: nothing to read, but no allocation either.
    (d / "st_huge_dim.safetensors").write_bytes(
        _st_bytes({"x": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b"")
    )
    # Sharded checkpoints (Hugging Face index + shards) with a broken index.
    index = "model.safetensors.index.json"
    shard = "model-00001-of-00001.safetensors"
    weight_map = {k: shard for k in header if k != "__metadata__"}
    indexes = {
        "idx_bad_json": "{",
        "idx_deep_json": "[" * 100_000,
        "idx_no_weight_map": json.dumps({"metadata": {}}),
        "idx_traversal": json.dumps({"weight_map": {k: "../good.safetensors" for k in weight_map}}),
        "idx_missing_shard": json.dumps({"weight_map": {k: "gone.safetensors" for k in weight_map}}),
        "idx_wrong_tensor": json.dumps({"weight_map": {**weight_map, "fc9.weight": shard}}),
    }
    for name, text in indexes.items():
        (d / name).mkdir()
        (d / name / index).write_text(text)
        shutil.copy(good, d / name / shard)
    # Two entries with the same name: JSON keeps the last one silently; the file is ambiguous.
    raw = json.dumps(header).encode()
    dup = raw[:-1] + b', "' + first.encode() + b'": ' + json.dumps(header[first]).encode() + b"}"
    (d / "st_duplicate_name.safetensors").write_bytes(_st_bytes(dup, data))


# ------------------------------------------------------------------------------- checkpoints


def _state() -> dict[str, torch.Tensor]:
    return load_file(SAMPLES / "digits_mlp.safetensors")


def _content_cases(d: Path) -> None:
    state = _state()

    def save(name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
        s = {k: v.clone() for k, v in state.items()}
        change(s)
        save_file(s, d / f"{name}.safetensors", metadata={"format": "pt"})

    save("nan_weight", lambda s: s["fc1.weight"][3].__setitem__(5, float("nan")))
    save("inf_bias", lambda s: s["fc2.bias"].__setitem__(0, float("inf")))
    save("nan_bn_weight", lambda s: s["bn1.weight"][:2].fill_(float("nan")))
    save("nan_head", lambda s: s["head.weight"][0].__setitem__(0, float("-inf")))
    save("neg_var", lambda s: s["bn1.running_var"][:3].fill_(-1.0))
    save("zero_var", lambda s: s["bn2.running_var"][:2].fill_(0.0))
    save("missing_key", lambda s: s.pop("bn1.running_mean"))
    save("extra_key", lambda s: s.__setitem__("fc9.weight", torch.zeros(2, 2)))
    save("wrong_shape", lambda s: s.__setitem__("fc2.weight", torch.zeros(64, 100)))
    shutil.copy(SAMPLES / "tabular_resnet.safetensors", d / "other_arch.safetensors")

    # torch pickles
    buf = io.BytesIO()
    torch.save(state, buf)
    good_pt = buf.getvalue()
    (d / "good.pt").write_bytes(good_pt)
    (d / "pt_truncated.pt").write_bytes(good_pt[: len(good_pt) // 2])
    (d / "pt_empty.pt").write_bytes(b"")
    (d / "pt_not_zip.pt").write_bytes(b"this is a text file, not torch.save output\n" * 20)
    (d / "pt_random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save(state["fc1.weight"], d / "pt_tensor.pt")
    torch.save([state["fc1.weight"]], d / "pt_list.pt")
    torch.save({"epoch": 3, "lr": 0.1}, d / "pt_no_tensors.pt")
    marker = d / MARKER_NAME
    torch.save({**state, "payload": CreateFile(marker)}, d / "pt_malicious.pt")
    torch.save({"state_dict": state, "hook": CreateFile(marker)}, d / "pt_malicious_nested.ckpt")
    (d / "pt_malicious_legacy.pth").write_bytes(pickle.dumps(CreateFile(marker), protocol=2))
    (d / "pt_malicious_bin.bin").write_bytes(pickle.dumps({"w": CreateFile(marker)}))
    # The payload pickle renamed to .safetensors: qatconv must never unpickle a .safetensors.
    (d / "st_is_pickle.safetensors").write_bytes(pickle.dumps(CreateFile(marker), protocol=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), d / "pt_torchscript.pt")
    # A zip whose data.pkl is damaged: a byte in the middle of the pickle stream flipped.
    src = zipfile.ZipFile(io.BytesIO(good_pt))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("data.pkl"):
                body = body[: len(body) // 2] + b"\xfe\xfd" + body[len(body) // 2 + 2 :]
            z.writestr(info, body)
    (d / "pt_bad_pickle.pt").write_bytes(out.getvalue())


def _qat_cases(d: Path) -> None:
    from qatconv import api
    from qatconv.config import ModelConfig

    qat = d / "qat.safetensors"
    api.prepare(
        ModelConfig(MODEL, {}, SAMPLES / "digits_mlp.safetensors"),
        SAMPLES / "digits_calib.npz",
        qat,
    )
    header, data = _split(qat)
    meta = json.loads(header["__metadata__"]["qatconv"])  # type: ignore[index]

    def edit_meta(name: str, change: Callable[[dict[str, object]], None]) -> None:
        m = json.loads(json.dumps(meta))
        change(m)
        h = json.loads(json.dumps(header))
        h["__metadata__"]["qatconv"] = json.dumps(m)
        (d / f"{name}.safetensors").write_bytes(_st_bytes(h, data))

    def raw_meta(name: str, value: str) -> None:
        h = json.loads(json.dumps(header))
        h["__metadata__"]["qatconv"] = value
        (d / f"{name}.safetensors").write_bytes(_st_bytes(h, data))

    raw_meta("qat_meta_not_json", "{not json")
    raw_meta("qat_meta_list", "[1, 2]")
    raw_meta("qat_meta_deep", "[" * 100_000)
    edit_meta("qat_meta_no_pairs", lambda m: m.pop("pairs"))
    edit_meta("qat_meta_pairs_int", lambda m: m.update(pairs=5))
    edit_meta("qat_meta_pairs_strings", lambda m: m.update(pairs=["fc1", "fc2"]))
    edit_meta("qat_meta_pair_no_bn", lambda m: m["pairs"][0].pop("bn"))  # type: ignore[index]
    edit_meta("qat_meta_eps_text", lambda m: m["pairs"][0].update(eps="tiny"))  # type: ignore[index]
    edit_meta("qat_meta_eps_negative", lambda m: m["pairs"][0].update(eps=-5.0))  # type: ignore[index]
    edit_meta("qat_meta_unknown_linear", lambda m: m["pairs"][0].update(
        linear="nope", qat="nope"))  # type: ignore[index]
    edit_meta("qat_meta_stage_float", lambda m: m.update(stage="folded"))
    edit_meta("qat_meta_bad_backend", lambda m: m.update(backend="tpu"))
    marker = str(d / MARKER_NAME)
    edit_meta("qat_meta_evil_spec", lambda m: m.update(
        model={"spec": "subprocess:run", "args": {"args": ["touch", marker]}}))
    edit_meta("qat_meta_spec_not_model", lambda m: m.update(
        model={"spec": "pathlib:Path.touch", "args": {"self": marker}}))
    (d / "qat_truncated.safetensors").write_bytes(qat.read_bytes()[:-64])

    tensors = load_file(qat)
    qmeta = header["__metadata__"]  # type: ignore[index]

    def save(name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
        s = {k: v.clone() for k, v in tensors.items()}
        change(s)
        save_file(s, d / f"{name}.safetensors", metadata=qmeta)  # type: ignore[arg-type]

    save("qat_nan_var", lambda s: s["fc1.bn.running_var"][0].fill_(float("nan")))
    save("qat_neg_var", lambda s: s["fc2.bn.running_var"][:4].fill_(-1.0))
    save("qat_zero_var", lambda s: s["fc2.bn.running_var"][:1].fill_(0.0))
    save("qat_nan_weight", lambda s: s["fc1.weight"][0].__setitem__(0, float("nan")))
    save("qat_missing_var", lambda s: s.pop("fc1.bn.running_var"))


# -------------------------------------------------------------------------------------- data


def _data_cases(d: Path) -> None:
    with np.load(SAMPLES / "digits_calib.npz") as z:
        x, y = z["inputs"], z["targets"]
    (d / "data_empty.npz").write_bytes(b"")
    (d / "data_empty.csv").write_bytes(b"")
    (d / "data_random.npz").write_bytes(np.random.default_rng(1).bytes(2048))
    np.savez(d / "data_zero_samples.npz", inputs=x[:0])
    np.savez(d / "data_wrong_features.npz", inputs=x[:, :63])
    np.savez(d / "data_too_many_features.npz", inputs=np.concatenate([x, x[:, :1]], axis=1))
    np.savez(d / "data_flat.npz", inputs=x[:, 0])
    np.savez(d / "data_scalar.npz", inputs=np.float32(1.0))
    bad = x.copy()
    bad[5, 7] = np.nan
    np.savez(d / "data_nan.npz", inputs=bad)
    np.savez(d / "data_no_inputs.npz", features=x)
    np.savez(d / "data_targets_mismatch.npz", inputs=x, targets=y[:-3])
    np.savez(d / "data_text_array.npz", inputs=np.array([["a"] * 64] * 4))
    np.save(d / "data_wrong_features.npy", x[:, :10])
    marker = d / MARKER_NAME
    obj = np.empty(2, dtype=object)
    obj[0] = CreateFile(marker)
    np.save(d / "data_object_pickle.npy", obj, allow_pickle=True)
    np.savez(d / "data_object_pickle.npz", inputs=obj)
    torch.save({"inputs": torch.from_numpy(x), "hook": CreateFile(marker)}, d / "data_malicious.pt")
    torch.save([1, 2, 3], d / "data_list.pt")
    save_file({"inputs": torch.from_numpy(x)}, d / "data_good.safetensors")
    (d / "data_truncated.safetensors").write_bytes((d / "data_good.safetensors").read_bytes()[:-50])
    cols = [f"p{i}" for i in range(64)]
    rows = [",".join(cols)] + [",".join(f"{v:g}" for v in r) for r in x[:8]]
    text = rows.copy()
    text[3] = text[3].replace(text[3].split(",")[10], "seven", 1)
    (d / "data_text.csv").write_text("\n".join(text) + "\n")
    (d / "data_header_only.csv").write_text(rows[0] + "\n")
    ragged = rows.copy()
    ragged[2] = ragged[2] + ",1"
    (d / "data_ragged.csv").write_text("\n".join(ragged) + "\n")
    (d / "data_no_header.csv").write_text("\n".join(rows[1:]) + "\n")
    (d / "data_wrong_features.csv").write_text(
        "\n".join(",".join(r.split(",")[:63]) for r in rows) + "\n"
    )
    (d / "data_not_utf8.csv").write_bytes(b"a,b\n\xff\xfe,\x80\n")
    (d / "data.txt").write_text("1 2 3\n")


# ------------------------------------------------------------------------------------ models


def _model_cases(d: Path) -> None:
    (d / "model_syntax.py").write_text("class Net(:\n    pass\n")
    (d / "model_raises.py").write_text(
        "from torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('cannot build')\n"
    )
    (d / "model_exits.py").write_text("import sys\nsys.exit(0)\n")
    (d / "model_not_module.py").write_text("def Net():\n    return 42\n")
    (d / "model_missing_import.py").write_text("import qatconv_no_such_package\n")


def make_corpus(dest: Path) -> Path:
    """Write every corpus file into ``dest`` (created if needed); return ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLES / "digits_mlp.safetensors", dest / "good.safetensors")
    _safetensors_cases(dest)
    _content_cases(dest)
    _qat_cases(dest)
    _data_cases(dest)
    _model_cases(dest)
    return dest


# ------------------------------------------------------------------------------------- cases


def _prep(weights: str, data: str = "{samples}/digits_calib.npz", *extra: str) -> tuple[str, ...]:
    return ("prepare", "--model", "{model}", "--weights", weights, "--data", data,
            "-o", "{out}", *extra)  # fmt: skip


def _plain_fold(weights: str, *extra: str) -> tuple[str, ...]:
    return ("fold", "--model", "{model}", "--weights", weights, "-o", "{out}", *extra)


_ST_CORRUPT = {
    "st_truncated": "truncated",
    "st_padded": "padded",
    "st_empty": "too short",
    "st_tiny": "too short",
    "st_header_len_past_eof": "header length",
    "st_header_len_huge": "header length",
    "st_bad_json": "json",
    "st_not_utf8": "json",
    "st_json_list": "not a json object",
    "st_deep_json": "json",
    "st_huge_int": "json",
    "st_no_tensors": "no tensors",
    "st_overlap": "overlaps",
    "st_offsets_out_of_range": "offset",
    "st_offsets_reversed": "data_offsets",
    "st_unknown_dtype": "unknown dtype",
    "st_dtype_not_string": "unknown dtype",
    "st_shape_size_mismatch": "bytes",
    "st_negative_dim": "shape",
    "st_float_dim": "shape",
    "st_entry_not_object": "not an object",
    "st_metadata_not_strings": "__metadata__",
    "st_huge_dim": "shape",
    "st_duplicate_name": "twice",
}


def _build_cases() -> list[Case]:
    cases: list[Case] = []
    for name, word in _ST_CORRUPT.items():
        f = f"{{corpus}}/{name}.safetensors"
        empty_ok = name == "st_no_tensors"  # a valid, empty file: inspect describes it
        cases.append(Case(f"prepare-{name}", _prep(f), expect=word))
        cases.append(Case(f"fold-{name}", ("fold", f, "-o", "{out}"),
                          expect="" if empty_ok else word))
        if not empty_ok:
            cases.append(Case(f"inspect-{name}", ("inspect", f), expect=word, writes=False))
    for name, word in {"idx_bad_json": "json", "idx_deep_json": "json",
                       "idx_no_weight_map": "weight_map", "idx_traversal": "not a file name",
                       "idx_missing_shard": "gone.safetensors",
                       "idx_wrong_tensor": "fc9.weight"}.items():
        f = f"{{corpus}}/{name}/model.safetensors.index.json"
        cases.append(Case(f"prepare-{name}", _prep(f), expect=word))
        cases.append(Case(f"prepare-dir-{name}", _prep(f"{{corpus}}/{name}"), expect=word))
        cases.append(Case(f"fold-{name}", ("fold", f, "-o", "{out}"), expect=""))
    content = {
        "nan_weight": "fc1.weight",
        "inf_bias": "fc2.bias",
        "nan_bn_weight": "bn1.weight",
        "nan_head": "head.weight",
        "neg_var": "bn1.running_var",
        "zero_var": "bn2.running_var",
    }
    for name, word in content.items():
        f = f"{{corpus}}/{name}.safetensors"
        cases.append(Case(f"prepare-{name}", _prep(f), expect=word))
        cases.append(Case(f"prepare-finetune-{name}", _prep(f, "{samples}/digits_calib.npz",
                          "--mode", "finetune", "--steps", "2"), expect=word))
        cases.append(Case(f"fold-plain-{name}", _plain_fold(f), expect=word))
    for name, word in {"missing_key": "missing", "extra_key": "unexpected",
                       "wrong_shape": "mis-shaped", "other_arch": "does not fit"}.items():
        f = f"{{corpus}}/{name}.safetensors"
        cases.append(Case(f"prepare-{name}", _prep(f), expect=word))
        cases.append(Case(f"fold-plain-{name}", _plain_fold(f), expect=word))
    pickles = {
        "pt_truncated.pt": "torch checkpoint",
        "pt_empty.pt": "torch checkpoint",
        "pt_not_zip.pt": "torch checkpoint",
        "pt_random.pth": "pickle",
        "pt_bad_pickle.pt": "",
        "pt_tensor.pt": "not a dict of tensors",
        "pt_list.pt": "not a dict of tensors",
        "pt_no_tensors.pt": "no tensors",
        "pt_malicious.pt": "--trust-pickle",
        "pt_malicious_nested.ckpt": "--trust-pickle",
        "pt_malicious_legacy.pth": "--trust-pickle",
        "pt_malicious_bin.bin": "--trust-pickle",
        "pt_torchscript.pt": "torchscript",
        "st_is_pickle.safetensors": "not a valid safetensors file",
    }
    for name, word in pickles.items():
        f = f"{{corpus}}/{name}"
        stem = name.split(".")[0]
        cases.append(Case(f"prepare-{stem}", _prep(f), expect=word))
        cases.append(Case(f"fold-plain-{stem}", _plain_fold(f), expect=word))
        cases.append(Case(f"inspect-{stem}", ("inspect", f), expect=word, writes=False))
        cases.append(Case(f"inspect-model-{stem}", ("inspect", f, "--model", "{model}"),
                          expect=word, writes=False))
    qat = {
        "qat_truncated": "truncated",
        "qat_meta_not_json": "json",
        "qat_meta_list": "json object",
        "qat_meta_deep": "json",
        "qat_meta_no_pairs": "pairs",
        "qat_meta_pairs_int": "pairs",
        "qat_meta_pairs_strings": "pair",
        "qat_meta_pair_no_bn": "bn",
        "qat_meta_eps_text": "eps",
        "qat_meta_eps_negative": "eps",
        "qat_meta_unknown_linear": "nope",
        "qat_meta_stage_float": "not a qat checkpoint",
        "qat_nan_var": "running_var",
        "qat_neg_var": "running_var",
        "qat_zero_var": "running_var",
        "qat_nan_weight": "fc1",
        "qat_missing_var": "running_var",
    }
    for name, word in qat.items():
        f = f"{{corpus}}/{name}.safetensors"
        cases.append(Case(f"fold-{name}", ("fold", f, "-o", "{out}"), expect=word))
    for name in ("qat_meta_evil_spec", "qat_meta_spec_not_model", "qat_meta_bad_backend"):
        f = f"{{corpus}}/{name}.safetensors"
        cases.append(Case(f"fold-check-{name}",
                          ("fold", f, "-o", "{out}", "--check", "{samples}/digits_heldout.npz")))
    data = {
        "data_empty.npz": "empty",
        "data_empty.csv": "empty",
        "data_random.npz": "cannot read",
        "data_zero_samples.npz": "zero samples",
        "data_wrong_features.npz": "does not fit",
        "data_too_many_features.npz": "does not fit",
        "data_flat.npz": "does not fit",
        "data_scalar.npz": "single number",
        "data_nan.npz": "nan",
        "data_no_inputs.npz": "inputs",
        "data_targets_mismatch.npz": "targets",
        "data_text_array.npz": "not numbers",
        "data_wrong_features.npy": "does not fit",
        "data_object_pickle.npy": "",
        "data_object_pickle.npz": "",
        "data_malicious.pt": "code",
        "data_list.pt": "not a dict",
        "data_truncated.safetensors": "truncated",
        "data_text.csv": "'seven' is not a number",
        "data_header_only.csv": "zero samples",
        "data_ragged.csv": "cells",
        "data_no_header.csv": "header",
        "data_wrong_features.csv": "does not fit",
        "data_not_utf8.csv": "cannot read",
        "data.txt": "extension",
    }
    for name, word in data.items():
        f = f"{{corpus}}/{name}"
        stem = name.replace(".", "_")
        cases.append(Case(f"prepare-{stem}", _prep("{samples}/digits_mlp.safetensors", f),
                          expect=word))
        cases.append(Case(f"fold-check-{stem}", ("fold", "{corpus}/qat.safetensors", "-o",
                                                 "{out}", "--check", f), expect=word))
    models = {
        "{corpus}/model_syntax.py:Net": "syntaxerror",
        "{corpus}/model_raises.py:Net": "cannot build",
        "{corpus}/model_exits.py:Net": "systemexit",
        "{corpus}/model_not_module.py:Net": "not an nn.module",
        "{corpus}/model_missing_import.py:Net": "qatconv_no_such_package",
        "{corpus}/no_such_file.py:Net": "does not exist",
        "{samples}/digits_mlp.py:NoSuchName": "no attribute",
        "{samples}/digits_mlp.py": "no ':name' part",
        "qatconv_no_such_package.models:Net": "no module named",
    }
    for i, (spec, word) in enumerate(models.items()):
        cases.append(Case(f"prepare-model-{i}", ("prepare", "--model", spec, "--weights",
                          "{samples}/digits_mlp.safetensors", "--data",
                          "{samples}/digits_calib.npz", "-o", "{out}"), expect=word))
    cases.append(Case("prepare-missing-weights", _prep("{corpus}/nope.safetensors"),
                      expect="does not exist"))
    cases.append(Case("prepare-missing-data", _prep("{samples}/digits_mlp.safetensors",
                                                    "{corpus}/nope.npz"), expect="does not exist"))
    cases.append(Case("prepare-unknown-ext", _prep("{corpus}/data.txt"), expect="extension"))
    cases.append(Case("fold-missing-input", ("fold", "{corpus}/nope.safetensors", "-o", "{out}"),
                      expect="does not exist"))
    cases.append(Case("fold-float-checkpoint", ("fold", "{corpus}/good.safetensors", "-o",
                                                "{out}"), expect="not a qat checkpoint"))
    cases.append(Case("inspect-missing", ("inspect", "{corpus}/nope.safetensors"),
                      expect="does not exist", writes=False))
    # usage errors (exit 2)
    cases.append(Case("usage-no-output", ("prepare", "--model", "{model}", "--data",
                      "{samples}/digits_calib.npz"), exit_code=2, expect="--output"))
    cases.append(Case("usage-bad-mode", _prep("{samples}/digits_mlp.safetensors",
                      "{samples}/digits_calib.npz", "--mode", "nonsense"), exit_code=2,
                      expect="nonsense"))
    cases.append(Case("usage-unknown-flag", ("fold", "--frobnicate"), exit_code=2,
                      expect="frobnicate"))
    cases.append(Case("usage-weight-bits", _prep("{samples}/digits_mlp.safetensors",
                      "{samples}/digits_calib.npz", "--weight-bits", "9"), exit_code=2,
                      expect="weight-bits"))
    cases.append(Case("usage-bad-steps", _prep("{samples}/digits_mlp.safetensors",
                      "{samples}/digits_calib.npz", "--steps", "many"), exit_code=2,
                      expect="steps"))
    cases.append(Case("usage-model-arg", ("prepare", "--model", "{model}", "--model-arg",
                      "oops", "--data", "{samples}/digits_calib.npz", "-o", "{out}"),
                      exit_code=2, expect="key=value"))
    cases.append(Case("usage-no-model", ("prepare", "--weights",
                      "{samples}/digits_mlp.safetensors", "--data",
                      "{samples}/digits_calib.npz", "-o", "{out}"), exit_code=2,
                      expect="--model"))
    cases.append(Case("usage-shard-size", ("fold", "{corpus}/qat.safetensors", "-o", "{out}",
                      "--max-shard-size", "lots"), exit_code=2, expect="size"))
    cases.append(Case("usage-fold-nothing", ("fold", "-o", "{out}"), exit_code=2,
                      expect="fold needs"))
    return cases


CASES: list[Case] = _build_cases()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: python tests/bad_inputs/make_corpus.py OUT_DIR", file=sys.stderr)
        return 2
    dest = make_corpus(Path(argv[0]))
    for case in CASES:
        print(f"{case.name}\texit {case.exit_code}\tqatconv {' '.join(case.argv)}")
    print(f"{len(CASES)} cases; files in {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
