"""Read and write checkpoints: safetensors (single or sharded), torch pickles, containers, prefixes.

Reading never trusts a file: safetensors headers are validated by `qatconv.st_format` before the
safetensors library sees them, pickles go through ``torch.load(weights_only=True)`` unless the
user said ``--trust-pickle``, and every failure becomes a `CheckpointError` (exit 3).

Writing is atomic and deterministic (`write_safetensors`, over `st_format.StreamWriter`): the
header (sorted metadata, tensors ordered by element size then name) is built by qatconv rather
than by the safetensors library, whose metadata order changes from run to run.

torch is imported inside the functions that need it, so `read_metadata` (used by `inspect`)
stays torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qatconv import dtypes, st_format
from qatconv.errors import CheckpointError, OutputError, UsageError, first_line
from qatconv.metadata import METADATA_KEY, parse_metadata
from qatconv.st_checkpoint import (  # noqa: F401 - checkpoint_files is part of this API
    INDEX_SUFFIX,
    OpenCheckpoint,
    checkpoint_files,
    open_checkpoint,
    resolve,
    shard_file,
)

if TYPE_CHECKING:
    import torch

_V = TypeVar("_V")

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training loops and Lightning keep the model's tensors, in priority order.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# DDP, torch.compile, Lightning: stripped only when that makes the keys match the model better.
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
_MAX_STRIPS = 4

_TRUST_HINT = "if you trust this file, rerun with --trust-pickle (unpickling it can run any code)"


@dataclass
class LoadedCheckpoint:
    """The tensors of one checkpoint and what was done to get them.

    Attributes:
        tensors: name -> CPU tensor, after unwrapping containers (prefixes are not stripped
            here; see `align_state_dict`).
        metadata: safetensors ``__metadata__`` (string -> string); {} for torch pickles.
        notes: human sentences saying what was done ("unwrapped container key 'state_dict'").
        module: the pickled whole ``nn.Module`` when the file held one (``--trust-pickle``).
        format: "safetensors", "safetensors-sharded" or "torch".
        files: every file read (index and shards included), for output-clobbering checks.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    module: torch.nn.Module | None = None
    format: str = "safetensors"
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------- reading


def load_checkpoint(path: Path, *, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint file or folder into CPU tensors.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json`` (Hugging Face
            ``weight_map``), a folder holding exactly one such index (or exactly one
            ``.safetensors``), or a ``.pt/.pth/.bin/.ckpt`` torch pickle.
        trust_pickle: allow ``torch.load(weights_only=False)`` for pickles that need code.

    Returns:
        The tensors, metadata, notes on containers unwrapped, and the files read.

    Raises:
        CheckpointError: missing, unreadable, corrupt, empty, or refused (needs
            ``--trust-pickle``).
    """
    path = _checkpoint_file(path)
    name = path.name.lower()
    if name.endswith(INDEX_SUFFIX):
        return _load_sharded(path)
    if name.endswith(".safetensors"):
        return _load_safetensors(path)
    if name.endswith(TORCH_SUFFIXES):
        return _load_torch(path, trust_pickle=trust_pickle)
    raise CheckpointError(
        f"{path}: unknown checkpoint extension {path.suffix or '(none)'!r}",
        hint="use .safetensors, a *.safetensors.index.json, or a torch file (.pt .pth .bin .ckpt)",
    )


def _checkpoint_file(path: Path) -> Path:
    """``path`` resolved to the checkpoint file it stands for (`resolve`), which must exist and
    be a regular file (a FIFO or device would block or never end)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist", hint="check the path (and the current folder)"
        )
    path = resolve(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is not a regular file", hint="pass a checkpoint file, not a device or pipe"
        )
    return path


def _read_st_tensors(ckpt: OpenCheckpoint, names: Iterable[str]) -> dict[str, Any]:
    """Tensors of an opened safetensors checkpoint, read with pread through its descriptors.

    No mmap (a file truncated while mapped would kill the process with SIGBUS) and no second
    open (the header and the bytes come from the same file even if it is replaced meanwhile).
    """
    import torch

    out: dict[str, Any] = {}
    for name in names:
        fd, header = ckpt.locate(name)
        info = header.tensors[name]
        dtype = getattr(torch, dtypes.DTYPES[info.dtype].torch, None)
        if dtype is None:
            raise CheckpointError(
                f"{header.path}: tensor {name!r} has dtype {info.dtype}, which this torch "
                f"{torch.__version__} cannot hold",
                hint="upgrade torch, or re-export the checkpoint in another dtype",
            )
        if info.numel == 0:
            out[name] = torch.empty(info.shape, dtype=dtype)
        else:
            buf = bytearray(info.nbytes)
            st_format.read_tensor_bytes(fd, header, name, out=buf)
            out[name] = torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
    return out


def _load_safetensors(path: Path) -> LoadedCheckpoint:
    with open_checkpoint(path) as ckpt:
        tensors = _read_st_tensors(ckpt, sorted(ckpt.where))
        metadata = dict(ckpt.headers[0].metadata)
    if not tensors:
        raise _empty(path)
    return LoadedCheckpoint(tensors, metadata, [], None, "safetensors", [path])


@dataclass
class LazyCheckpoint:
    """A safetensors checkpoint (file or sharded index) whose tensors are read one at a time.

    Attributes:
        shapes: name -> shape of every tensor, from the validated headers.
        dtypes: name -> safetensors dtype string.
        notes: as `LoadedCheckpoint.notes`.
    """

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    notes: list[str]
    _ckpt: OpenCheckpoint

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read with pread through the descriptor its header came from."""
        return _read_st_tensors(self._ckpt, [name])[name]


def is_safetensors(path: Path) -> bool:
    """Whether `open_lazy` can read ``path`` (a ``.safetensors`` file, an index, or a folder
    holding one): torch pickles are read whole by `load_checkpoint`."""
    try:
        return str(resolve(Path(path))).lower().endswith((".safetensors", INDEX_SUFFIX))
    except CheckpointError:
        return False


@contextmanager
def open_lazy(path: Path) -> Iterator[LazyCheckpoint]:
    """Open a safetensors checkpoint for `LazyCheckpoint.read`; headers are validated here.

    Raises:
        CheckpointError: as `load_checkpoint` for safetensors inputs (same checks, same words).
    """
    with open_checkpoint(_checkpoint_file(path)) as ckpt:
        if not ckpt.where:
            raise _empty(path)
        notes = ([f"read {len(ckpt.headers)} shard(s) listed in {ckpt.path.name}", *ckpt.notes]
                 if ckpt.index is not None else [])  # fmt: skip
        infos = ckpt.infos()
        yield LazyCheckpoint({n: tuple(shape) for n, (_, shape) in infos.items()},
                             {n: dtype for n, (dtype, _) in infos.items()}, notes, ckpt)  # fmt: skip


def _load_sharded(index: Path) -> LoadedCheckpoint:
    with open_checkpoint(index) as ckpt:
        if not ckpt.where:
            raise _empty(index)
        tensors: dict[str, Any] = {}
        for i, header in enumerate(ckpt.headers):  # shard by shard, names sorted in each
            tensors.update(_read_st_tensors(ckpt, sorted(n for n, j in ckpt.where.items()
                                                         if j == i)))  # fmt: skip
        metadata = dict(ckpt.headers[0].metadata)
        for key, value in ckpt.index_metadata.items():
            metadata[str(key)] = (value if isinstance(value, str)
                                  else json.dumps(value, sort_keys=True))  # fmt: skip
        notes = [f"read {len(ckpt.headers)} shard(s) listed in {index.name}", *ckpt.notes]
        files = [index, *(h.path for h in ckpt.headers)]
    return LoadedCheckpoint(tensors, metadata, notes, None, "safetensors-sharded", files)


def _load_torch(path: Path, *, trust_pickle: bool) -> LoadedCheckpoint:
    import pickle

    import torch

    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript dispatch warning; refused below
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not str(e).startswith("Weights only load failed"):
            raise _corrupt(path, e) from e
        if not trust_pickle:
            raise CheckpointError(
                f"{path} needs code to unpickle ({_blocked_global(e)}); refused: only "
                "--trust-pickle lets a pickle run code",
                hint=_TRUST_HINT,
            ) from None
        obj = _load_untrusted(path)
        notes.append("loaded with --trust-pickle (weights_only=False)")
    except RuntimeError as e:
        if "TorchScript" not in str(e):
            raise _corrupt(path, e) from e
        if not trust_pickle:
            raise CheckpointError(
                f"{path} is a TorchScript archive; loading it runs its code", hint=_TRUST_HINT
            ) from None
        obj = _load_untrusted(path)
        notes.append("loaded a TorchScript archive with --trust-pickle")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        raise _corrupt(path, e) from e
    tensors, module = _unwrap(obj, path, notes)
    return LoadedCheckpoint(tensors, {}, notes, module, "torch", [path])


def _load_untrusted(path: Path) -> Any:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript dispatch warning
            return torch.load(path, map_location="cpu", weights_only=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except (AttributeError, ModuleNotFoundError, ImportError) as e:
        raise CheckpointError(
            f"cannot unpickle {path}: {_first_line(e)}",
            hint="the pickle needs the code that saved it importable; or save "
            "model.state_dict() and pass --model instead",
        ) from e
    except Exception as e:
        raise _corrupt(path, e) from e


def _unwrap(obj: Any, path: Path, notes: list[str]) -> tuple[dict[str, Any], Any]:
    import torch
    from torch import nn

    module: nn.Module | None = None
    for _ in range(4):  # nested containers: {"model": {"state_dict": ...}}
        if isinstance(obj, nn.Module):
            module = obj.eval()
            notes.append(
                f"the checkpoint holds a whole {type(obj).__name__} module; using its state_dict"
            )
            obj = dict(obj.state_dict())
            break
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in CONTAINER_KEYS if k in obj and _holds_tensors(obj[k])), None)
        if key is None:
            break
        others = sorted(str(k) for k in obj if k != key)
        note = f"unwrapped container key {key!r}"
        if others:
            note += f" (ignored {len(others)} other entries: {', '.join(others[:5])}"
            note += ", ...)" if len(others) > 5 else ")"
        notes.append(note)
        obj = obj[key]
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors",
            hint="save model.state_dict() (a dict name -> tensor)",
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if dropped:
        more = ", ..." if len(dropped) > 5 else ""
        notes.append(f"dropped {len(dropped)} non-tensor entries: {', '.join(dropped[:5])}{more}")
    if not tensors:
        raise _empty(path)
    return tensors, module


def _holds_tensors(value: object) -> bool:
    import torch
    from torch import nn

    if isinstance(value, nn.Module):
        return True
    if not isinstance(value, Mapping):
        return False
    return any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in value.values())


def _blocked_global(e: Exception) -> str:
    text = str(e)
    m = re.search(r"GLOBAL ([\w.<>]+)", text)
    if m:
        return f"it references {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"it uses pickle opcode {int(m.group(1))} (not a plain tensor pickle, or corrupt)"
    if "reduce for unrecognized function" in text:
        return "it calls a function while loading"
    return "it holds more than tensors"


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path} as a torch checkpoint: {_first_line(e) or type(e).__name__}",
        hint="the file is corrupt, truncated, or not a torch.save file",
    )


def _empty(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} holds no tensors", hint="check that this is the model's checkpoint"
    )


def _first_line(e: BaseException) -> str:
    # A KeyError's message is only the key: say what it is.
    return first_line(f"KeyError {e}" if isinstance(e, KeyError) else e, type(e).__name__)


# ------------------------------------------------------------------------ matching to a model


def align_state_dict(
    tensors: Mapping[str, _V], model_keys: Iterable[str]
) -> tuple[dict[str, _V], list[str]]:
    """Strip ``module.`` / ``_orig_mod.`` / ``model.`` prefixes where that fits the model better.

    Prefixes are stripped (each from the keys that carry it) in whatever sequence, up to
    `_MAX_STRIPS` deep and in any order, makes the most keys match ``model_keys``; ties go to
    fewer strips, so nothing is stripped unless it helps. A strip that would make two keys
    collide is never done.

    Returns:
        The (possibly renamed) tensors and one note per prefix stripped, in order.
    """
    wanted = set(model_keys)
    start = dict(tensors)
    best_score = len(wanted.intersection(start))
    best: tuple[dict[str, Any], list[str]] = (start, [])
    frontier: list[tuple[dict[str, Any], list[str]]] = [(start, [])]
    for _ in range(_MAX_STRIPS):  # breadth first: a shallower sequence wins ties
        deeper: list[tuple[dict[str, Any], list[str]]] = []
        for current, notes in frontier:
            for prefix in STRIP_PREFIXES:
                n_carry = sum(k.startswith(prefix) for k in current)
                if not n_carry:
                    continue
                renamed = {k.removeprefix(prefix): v for k, v in current.items()}
                if len(renamed) != len(current):
                    continue  # collision
                step = [*notes, f"stripped key prefix {prefix!r} from {n_carry} keys"]
                score = len(wanted.intersection(renamed))
                if score > best_score:
                    best_score, best = score, (renamed, step)
                deeper.append((renamed, step))
        frontier = deeper
    return best


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``model`` strictly (names and shapes must match exactly).

    A missing ``num_batches_tracked`` is tolerated, as ``load_state_dict`` itself does for
    BatchNorm state dicts saved without version metadata.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys (the first 5 of each, sorted,
            and their counts), or any other refusal of ``load_state_dict``.
    """
    load_read_into(model, {k: tuple(t.shape) for k, t in tensors.items()}, tensors.__getitem__,
                   source)  # fmt: skip


def load_read_into(
    model: torch.nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    source: str,
) -> None:
    """`load_into` for tensors read one module at a time: ``shapes`` names the checkpoint's
    tensors, ``read(name)`` returns one. Each module's tensors are read, loaded and dropped
    before the next module's, so a checkpoint never sits in memory beside the model.

    Raises:
        CheckpointError: as `load_into`.
    """
    expected = model.state_dict()
    check_keys_fit({k: tuple(t.shape) for k, t in expected.items()}, shapes, source)
    try:
        errors = _load_per_module(model, shapes, read)
    except (RuntimeError, ValueError, TypeError) as e:
        errors = [_first_line(e)]
    if errors:
        raise CheckpointError(
            f"{source} does not fit the model: {_first_line(errors[0])}",
            hint="check --model and --model-arg, or whether this is the right checkpoint",
        )


def check_keys_fit(
    expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """The checkpoint's tensor names and shapes (``got``) against the model's (``expected``).

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys, as `load_into` reports them.
    """
    missing = sorted(
        k for k in expected if k not in got and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(k for k in got if k not in expected)
    misshaped = sorted(
        f"{k} (checkpoint {list(got[k])}, model {list(expected[k])})"
        for k in got
        if k in expected and tuple(got[k]) != tuple(expected[k])
    )
    problems = [
        _listing(what, keys)
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit the model: {'; '.join(problems)}",
            hint="check --model and --model-arg (the model must be the one the checkpoint was "
            "saved from), or whether this is the right checkpoint",
        )


def _load_per_module(
    model: torch.nn.Module, names: Iterable[str], read: Callable[[str], torch.Tensor]
) -> list[str]:
    """`load_state_dict` with each module handed only its own keys, read when it loads.

    torch's `load_state_dict` filters the whole state dict by prefix for every child, which is
    quadratic in the number of children (a flat Sequential of 3,000 layers spent 16 s there).
    Each module's own `_load_from_state_dict` (and so its pre-hooks and version handling) still
    runs, as in torch. Keys were validated by the caller.
    """
    by_module: dict[str, list[str]] = {}
    for key in names:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    errors: list[str] = []
    missing: list[str] = []
    unexpected: list[str] = []
    for path, mod in model.named_modules(remove_duplicate=False):
        local = {key: read(key) for key in by_module.get(path, ())}
        prefix = f"{path}." if path else ""
        mod._load_from_state_dict(local, prefix, {}, True, missing, unexpected, errors)
        del local
    return errors


def _listing(what: str, keys: list[str]) -> str:
    more = ", ..." if len(keys) > 5 else ""
    return f"{len(keys)} {what} key(s): {', '.join(keys[:5])}{more}"


# --------------------------------------------------------------------------------------- writing

def check_output_path(
    path: Path, *, force: bool, inputs: Sequence[Path], suffixes: tuple[str, ...] = ()
) -> None:
    """Refuse an output path before any work is done.

    Raises:
        OutputError: ``path`` is one of ``inputs`` (even with ``force``), exists without
            ``force``, is a folder, or its folder is missing or not writable.
        UsageError: ``suffixes`` is given and the name ends in none of them, so that a name a
            later step (``fold --check``) could not read back fails before any work.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise OutputError(
            f"output folder {folder} does not exist", hint=f"create it first: mkdir -p {folder}"
        )
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            f"output folder {folder} is not writable", hint="choose another -o location"
        )
    if path.exists():
        _refuse_existing_output(path, force=force, inputs=inputs)
    if suffixes and not path.name.endswith(suffixes):
        raise UsageError(
            f"output {path} must end in {' or '.join(suffixes)}",
            hint=f"e.g. -o {path.with_name(path.stem + suffixes[0]).name}",
        )


def _refuse_existing_output(path: Path, *, force: bool, inputs: Sequence[Path]) -> None:
    if path.is_dir():
        raise OutputError(
            f"output {path} is a folder", hint="give a file name, e.g. out.safetensors"
        )
    for inp in inputs:
        try:
            same = os.path.samefile(path, inp)
        except OSError:
            same = False
        if same:
            raise OutputError(
                f"output {path} is the input {inp}; refusing to overwrite it",
                hint="write to another file (-o)",
            )
    if not force:
        raise OutputError(
            f"output {path} already exists", hint="pass --force to replace it, or choose another -o"
        )


def write_safetensors(
    tensors: dict[str, torch.Tensor],
    path: Path,
    metadata: dict[str, str],
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
) -> None:
    """Write ``tensors`` as one safetensors file, atomically and byte-deterministically.

    A thin layer over `st_format.StreamWriter` (the one safetensors writer): the metadata
    always gets ``"format": "pt"``, its keys sorted; tensors are laid out as the safetensors
    library does (descending dtype, then name: each tensor is aligned), the header is the
    library's bytes (`st_format.build_header`). The file is written atomically
    (`atomic.AtomicFile`): on any failure ``path`` is untouched and no temp file is left.

    Raises:
        OutputError: see `check_output_path`; a tensor dtype safetensors cannot hold; a
            metadata value that is not a string; a write error.
    """
    path = Path(path)
    check_output_path(path, force=force, inputs=inputs)
    bad = sorted(str(k) for k, v in metadata.items()
                 if not (isinstance(k, str) and isinstance(v, str)))  # fmt: skip
    if bad:
        raise OutputError(f"metadata entries must be strings: {', '.join(bad[:5])}")
    prepared = {name: _prepare(name, t) for name, t in tensors.items()}
    entries = st_format.canonical_order(
        [(name, dtypes.st_dtype(t.dtype), t.shape) for name, t in prepared.items()]
    )
    try:
        writer = st_format.StreamWriter(path, entries, metadata)
    except ValueError as e:  # a name safetensors reserves
        raise OutputError(f"cannot write {path}: {e}") from None
    with writer:
        for name, _, _ in entries:
            writer.write(name, dtypes.tensor_bytes(prepared[name]))


def _prepare(name: str, t: torch.Tensor) -> torch.Tensor:
    import torch

    if not isinstance(t, torch.Tensor):
        raise OutputError(f"cannot save {name!r}: it is a {type(t).__name__}, not a tensor")
    if not dtypes.has_st_dtype(t.dtype) or t.is_sparse or t.is_quantized:
        raise OutputError(f"cannot save {name!r}: safetensors has no {t.dtype} (or layout) type")
    return t.detach().to("cpu").contiguous()


# -------------------------------------------------------------------------------------- metadata


def read_metadata(path: Path) -> dict[str, Any]:
    """The parsed ``qatconv`` JSON metadata of a safetensors checkpoint, without torch.

    For a sharded checkpoint (index or its folder) the index's ``metadata`` is used when it
    holds a ``qatconv`` entry, else the first shard's header.

    Returns:
        The metadata object; {} when the file has none.

    Raises:
        CheckpointError: unreadable header, or ``qatconv`` metadata that is not a JSON object.
    """
    path = Path(path)
    path = resolve(path)
    raw: object = None
    if path.name.lower().endswith(INDEX_SUFFIX):
        index_metadata, weight_map = st_format.read_index_full(path)
        raw = index_metadata.get(METADATA_KEY)
        if raw is None and weight_map:
            path = shard_file(path, min(set(weight_map.values())))
    if raw is None:
        raw = st_format.read_header(path).metadata.get(METADATA_KEY)
    return parse_metadata(raw, path) or {}
