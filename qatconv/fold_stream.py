"""The streaming fold, file to file: plan, then write each shard through a mapping of its output.

`fold_file` never maps or loads the checkpoint: headers are parsed without torch and every
read is a ``pread`` (a checkpoint cut short while it is folded is a `CheckpointError`, not a
SIGBUS). Each output shard is reserved whole (``posix_fallocate``: a full disk fails before any
work) and mapped (`st_format.StreamWriter` with ``map_output``); each folded weight is read a
block of rows at a time straight into the mapped output and scaled there, and tensors that
pass through are copied file to file inside the kernel. Windows of the output already written
are dropped from the mapping as the fold moves on, so memory stays a few tens of MB whatever
the checkpoint's size. Where the output's filesystem cannot reserve space, blocks are read
into two reused buffers and written with ``os.write`` on a background thread instead; both
ways give the same bytes. `fold_plan.fold_state_dict` does the same in memory, and both
produce the same tensors (and, saved with safetensors, the same bytes).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qatconv import st_arrays, st_format
from qatconv.atomic import AtomicFile
from qatconv.dtypes import SIZES
from qatconv.errors import OutputError, UsageError
from qatconv.fold_plan import (
    FoldPair,
    FoldReport,
    OutTensor,
    PairPlan,
    Plan,
    check_folded,
    make_plan,
)
from qatconv.st_checkpoint import INDEX_SUFFIX, OpenCheckpoint, open_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["fold_file"]

# Weights are folded this many elements at a time: 16 MiB of float64 per block.
CHUNK_ELEMENTS = 1 << 21

def _load_small(source: OpenCheckpoint, name: str) -> np.ndarray:
    fd, header = source.locate(name)
    info = header.tensors[name]
    if info.numel == 0:
        return st_arrays.storage(b"", info.dtype).reshape(info.shape)
    data = bytearray(st_format.read_tensor_bytes(fd, header, name))
    return st_arrays.storage(data, info.dtype, info.shape)


def fold_file(
    src: Path,
    out: Path,
    pairs: Sequence[FoldPair],
    *,
    metadata: Mapping[str, str] | Callable[[FoldReport], Mapping[str, str]],
    emit_qparams: bool = False,
    max_shard_size: int | None = None,
    force: bool = False,
    on_pair: Callable[[str], None] | None = None,
    fsync: bool = True,
) -> FoldReport:
    """Fold ``pairs`` from a safetensors checkpoint into a new one, streaming.

    ``src`` is a ``.safetensors`` file, a ``*.safetensors.index.json`` (all its shards are
    read as one checkpoint) or a folder holding exactly one of either. Tensors are written in
    safetensors' canonical order (dtype, then name); pass-through tensors are copied
    bit-identically, each folded weight block by block in float64. ``metadata`` (``format:
    pt`` is added) may be a callable that receives the report before anything is written
    (pairs, removed, qparams, bytes_in known), to record those in the header.

    With ``max_shard_size`` (bytes of tensor data per shard), ``out`` names the index file:
    ``model-0000k-of-0000N.safetensors`` shards and the index are written in its folder; a
    tensor larger than the limit gets a shard of its own. Every file is written to a temp file
    and renamed once all are complete, so a failure leaves no output.

    Args:
        on_pair: called with each Linear path once its folded weight is written.
        fsync: flush each file to disk before the rename (on by default).

    Raises:
        CheckpointError: unreadable source, or a pair's tensor missing / mis-shaped / not
            finite (the message names the pair and the tensor).
        OutputError: ``out`` is an input, exists without ``force``, or cannot be written.
        UsageError: ``emit_qparams`` without fake-quant state; bad ``max_shard_size``.
    """
    out = _output_path(Path(out), max_shard_size)
    with open_checkpoint(src) as source:
        _refuse_input_as_output(source.paths, [out])
        plan = make_plan(source.infos(), lambda name: _load_small(source, name), pairs,
                         emit_qparams, str(src))  # fmt: skip
        report = _report(plan, source)
        meta = dict(metadata(report) if callable(metadata) else metadata)
        ordered = st_format.canonical_order([(o.name, o.dtype, o.shape) for o in plan.outputs])
        shards = _split(ordered, max_shard_size)
        targets = _target_paths(out, len(shards), max_shard_size is not None)
        _check_targets(source, targets, force)
        index = _index_json(shards, targets, meta) if max_shard_size is not None else None
        report.files, report.bytes_out = _write_files(
            source, plan, shards, targets, meta, index, fsync, on_pair
        )
    logger.info(
        "folded %d pairs from %s into %s (%d tensors removed)",
        len(report.pairs), src, out, len(report.removed),
    )  # fmt: skip
    return report


def _output_path(out: Path, max_shard_size: int | None) -> Path:
    """``out`` checked against ``max_shard_size``; with sharding, the index file's path."""
    if max_shard_size is not None and max_shard_size <= 0:
        raise UsageError(f"--max-shard-size must be positive, got {max_shard_size}")
    if max_shard_size is None and out.name.endswith(INDEX_SUFFIX):
        raise UsageError(
            f"{out.name} names a shard index, but no --max-shard-size was given",
            hint="pass --max-shard-size (e.g. 2GB) or an output ending in .safetensors",
        )
    if max_shard_size is not None and (out.is_dir() or not out.name.endswith(".json")):
        out = (out if out.is_dir() else out.parent) / "model.safetensors.index.json"
    return out


def _report(plan: Plan, source: OpenCheckpoint) -> FoldReport:
    return FoldReport(
        pairs=[pp.pair.linear for pp in plan.pairs],
        removed=plan.removed,
        bytes_in=sum(h.file_size for h in source.headers),
        qparams={pp.pair.linear: pp.qparams for pp in plan.pairs if pp.qparams is not None},
    )


def _check_targets(source: OpenCheckpoint, targets: Sequence[Path], force: bool) -> None:
    _refuse_input_as_output(source.paths, targets)
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise OutputError(
            f"{existing[0]} exists",
            hint="pass --force to replace it, or choose another output path",
        )


_Entries = list[tuple[str, str, tuple[int, ...]]]


def _write_files(
    source: OpenCheckpoint,
    plan: Plan,
    shards: list[_Entries],
    targets: list[Path],
    meta: Mapping[str, str],
    index: bytes | None,
    fsync: bool,
    on_pair: Callable[[str], None] | None,
) -> tuple[list[Path], int]:
    """Write every shard (and the index, when given) to temp files; rename all once all are
    complete, or remove all on any failure. Returns the files and the shards' total size."""
    by_name = {o.name: o for o in plan.outputs}
    shard_writers: list[st_format.StreamWriter] = []
    files: list[st_format.StreamWriter | AtomicFile] = []
    queue = _WriteQueue()
    try:
        buffers = _Buffers()
        for entries, target in zip(shards, targets, strict=False):
            writer = st_format.StreamWriter(target, entries, meta, fsync=fsync, commit=False,
                                            map_output=True)
            shard_writers.append(writer)
            files.append(writer)
            with writer:
                _write_shard(queue, writer, [by_name[n] for n, _, _ in entries], source, buffers,
                             on_pair)  # fmt: skip
        if index is not None:
            index_file = AtomicFile(targets[-1], fsync=fsync, commit=False)
            files.append(index_file)
            with index_file:
                index_file.write_all(index)
        for f in files:
            f.commit()
    except BaseException:
        for f in files:
            f.discard()
        raise
    finally:
        queue.abort()
    return [f.final_path for f in files], sum(w.size for w in shard_writers)


def _write_shard(
    queue: _WriteQueue,
    writer: st_format.StreamWriter,
    outputs: Sequence[OutTensor],
    source: OpenCheckpoint,
    buffers: _Buffers,
    on_pair: Callable[[str], None] | None,
) -> None:
    """Write every tensor of one shard (copy, small tensor or folded weight); through the queue
    (and wait for it) unless the output is mapped, where there is no write call to overlap."""
    done = False
    submit = _call_now if writer.mapped else queue.submit
    try:
        for o in outputs:
            if o.source is not None:
                fd, h = source.locate(o.source)
                info = h.tensors[o.source]
                submit(writer.copy_range, fd, h.data_start + info.begin, info.nbytes, o.name)
            elif o.data is not None:
                submit(writer.write, o.name, st_arrays.array_bytes(o.data))
            else:
                assert o.pair is not None
                pp = o.pair
                fd, h = source.locate(pp.pair.weight_key)
                _stream_weight(queue, writer, fd, h, pp, o.name, buffers)
                if on_pair is not None:
                    on_pair(pp.pair.linear)
        queue.drain()
        done = True
    finally:
        if not done:  # stop the writes before the temp file is removed
            queue.abort()


def _call_now(fn: Callable[..., None], *args: Any) -> None:
    fn(*args)


class _WriteQueue:
    """Runs writer calls in order on one background thread.

    Writing into the page cache is the slowest step of a fold; on its own thread it overlaps
    with reading and scaling the next block (os.write, numpy and torch release the GIL).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qatconv-fold-write")
        self._pending: deque[Future[None]] = deque()

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()  # raise a failed write now, not at the end
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def wait(self, future: Future[None]) -> None:
        """Wait until ``future`` ran; raise the first failure among the calls up to it."""
        while self._pending:
            first = self._pending.popleft()
            first.result()
            if first is future:
                return
        future.result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def abort(self) -> None:
        """Cancel the calls not started, wait for the running one."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class _Buffers:
    """Two read/write buffers (one filled while the other is written) and a float32 scratch,
    reused for every block of every folded weight (grown, never shrunk)."""

    def __init__(self) -> None:
        self.raw = [bytearray(), bytearray()]
        self.busy: list[Future[None] | None] = [None, None]  # pending write of each buffer
        self.f32 = np.empty(0, dtype=np.float32)
        self.turn = 0

    def next(self, queue: _WriteQueue, nbytes: int, elements: int) -> tuple[int, bytearray]:
        """The buffer to fill next, once its previous write is done."""
        i = self.turn
        self.turn = 1 - i
        busy = self.busy[i]
        if busy is not None:
            queue.wait(busy)
            self.busy[i] = None
        if len(self.raw[i]) < nbytes:
            self.raw[i] = bytearray(nbytes)
        return i, self.raw[i]

    def scratch(self, elements: int) -> np.ndarray:
        """A float32 scratch array of ``elements`` values (16-bit weights are scaled in it)."""
        if self.f32.size < elements:
            self.f32 = np.empty(elements, dtype=np.float32)
        return self.f32[:elements]


def _stream_weight(
    queue: _WriteQueue,
    writer: st_format.StreamWriter,
    fd: int,
    header: st_format.Header,
    pp: PairPlan,
    name: str,
    buffers: _Buffers,
) -> None:
    """Fold one weight block by block: pread, scale in float64, cast, in place.

    A mapped output is read into and scaled where it lies (`StreamWriter.chunk_view`);
    otherwise each block goes through one of two buffers and its write is queued.
    """
    rows, cols = pp.shape
    if rows * cols == 0:
        if writer.mapped:
            writer.write(name, b"")
        else:
            queue.submit(writer.write, name, b"")
        return
    itemsize = SIZES[pp.weight_dtype]
    block = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        n = (r1 - r0) * cols
        if writer.mapped:
            slot, raw = None, writer.chunk_view(name, n * itemsize)
        else:
            slot, raw = buffers.next(queue, n * itemsize, n)
        view = st_format.read_tensor_bytes(fd, header, pp.pair.weight_key, r0, r1, out=raw)
        _scale_rows(view, pp, r0, r1, buffers)
        if slot is not None:
            buffers.busy[slot] = queue.submit(writer.write_chunk, name, view)


def _scale_rows(raw: memoryview, pp: PairPlan, r0: int, r1: int, buffers: _Buffers) -> None:
    """Scale rows ``[r0, r1)`` of ``pp``'s weight, stored in ``raw``, in place.

    numpy's ufunc computes ``w * s`` in float64 in small internal buffers and casts each
    result straight into the output, so a block costs about one pass over memory instead of
    the four of torch's ``w.double().mul_(s).to(dtype)``; the bits are the same (exact
    up-cast, one IEEE float64 product, round to nearest even). 16-bit weights go through
    float32 because that is how torch casts float64 to float16 / bfloat16 (double rounding),
    and the result must equal torch's (`st_arrays.from_float`).

    Raises:
        CheckpointError: a folded value is NaN or inf (`check_folded` names the pair).
    """
    cols = pp.shape[1]
    n = (r1 - r0) * cols
    s = pp.scale[r0:r1, None]
    with np.errstate(over="ignore", invalid="ignore"):
        if pp.weight_dtype in ("F32", "F64"):
            np_dtype = np.float32 if pp.weight_dtype == "F32" else np.float64
            w = np.frombuffer(raw, dtype=np_dtype, count=n).reshape(r1 - r0, cols)
            np.multiply(w, s, out=w, casting="unsafe")
            total = float(w.sum())
        else:
            w16 = st_arrays.storage(raw, pp.weight_dtype, count=n)
            acc = buffers.scratch(n).reshape(r1 - r0, cols)
            acc[...] = st_arrays.to_float(w16, pp.weight_dtype, np.float32).reshape(acc.shape)
            np.multiply(acc, s, out=acc, casting="unsafe")
            w16[...] = st_arrays.from_float(acc, pp.weight_dtype).reshape(-1)
            # Summed after the cast: a value that overflows the 16-bit type is inf there.
            total = float(st_arrays.to_float(w16, pp.weight_dtype, np.float32).sum())
    # A sum is finite unless some value is NaN/inf (or the sum overflows: then look closer).
    if not math.isfinite(total):
        check_folded(pp.pair, st_arrays.storage(raw, pp.weight_dtype, count=n), pp.weight_dtype)


def _split(
    ordered: list[tuple[str, str, tuple[int, ...]]], max_shard_size: int | None
) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    if max_shard_size is None:
        return [ordered]
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in ordered:
        n = math.prod(entry[2]) * SIZES[entry[1]]
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _target_paths(out: Path, n: int, sharded: bool) -> list[Path]:
    if not sharded:
        return [out]
    names = [out.parent / f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    return names + [out]


def _index_json(
    shards: list[list[tuple[str, str, tuple[int, ...]]]],
    targets: list[Path],
    metadata: Mapping[str, str],
) -> bytes:
    weight_map = {name: t.name for entries, t in zip(shards, targets, strict=False)
                  for name, _, _ in entries}  # fmt: skip
    total = sum(math.prod(s) * SIZES[d] for es in shards for _, d, s in es)
    meta: dict[str, Any] = {k: v for k, v in metadata.items() if k != "format"}
    meta["total_size"] = total
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _refuse_input_as_output(inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    resolved = {Path(p).resolve() for p in inputs}
    for o in outputs:
        same = Path(o).resolve() in resolved or (
            o.exists() and any(i.exists() and os.path.samefile(o, i) for i in inputs)
        )
        if same:
            raise OutputError(
                f"output {o} is one of the inputs",
                hint="write the folded checkpoint to another path",
            )
