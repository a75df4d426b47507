"""A safetensors checkpoint opened once: folder -> index -> shards -> open descriptors.

Every reader of a safetensors checkpoint (loading, validation, inspection, the streaming fold,
the api's scale and tolerance look-ups) goes through `open_checkpoint`, so a folder, an index
and its shards are resolved by one set of rules with one set of messages, and every tensor is
read through the descriptor whose header was validated (a file replaced meanwhile cannot mix
an old header with new bytes). Imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from qatconv import st_format
from qatconv.errors import CheckpointError

__all__ = [
    "INDEX_SUFFIX",
    "OpenCheckpoint",
    "checkpoint_files",
    "is_index",
    "open_checkpoint",
    "resolve",
    "shard_file",
]

INDEX_SUFFIX = ".safetensors.index.json"


def is_index(path: Path) -> bool:
    return path.name.lower().endswith(INDEX_SUFFIX)


def resolve(path: Path) -> Path:
    """A checkpoint path as a file: a folder stands for the one index (or the one
    ``.safetensors`` file) it holds. Suffixes match in any case.

    Raises:
        CheckpointError: a folder with several indexes, with no safetensors file at all, or
            with several ``.safetensors`` files and no index saying how they belong together.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    indexes = sorted(p for p in path.iterdir() if is_index(p))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise CheckpointError(
            f"folder {path} holds {len(indexes)} safetensors indexes "
            f"({', '.join(p.name for p in indexes)})",
            hint="pass the index file you mean instead of the folder",
        )
    files = sorted(p for p in path.iterdir() if p.name.lower().endswith(".safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise CheckpointError(
            f"folder {path} holds no .safetensors file and no *{INDEX_SUFFIX}",
            hint="pass the checkpoint file itself",
        )
    raise CheckpointError(
        f"folder {path} holds {len(files)} .safetensors files and no *{INDEX_SUFFIX} "
        "saying how they belong together",
        hint="pass one file, or add a Hugging Face index (weight_map) for the shards",
    )


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint path stands for (a folder or index expands to its shards).

    Cheap (reads at most the index JSON); use it for output-clobbering checks before loading.

    Raises:
        CheckpointError: as `resolve`; an unreadable index.
    """
    path = resolve(path)
    if is_index(path):
        _, weight_map = st_format.read_index_full(path)
        return [path, *(path.parent / f for f in sorted(set(weight_map.values())))]
    return [path]


@dataclass
class OpenCheckpoint:
    """An opened safetensors checkpoint (one file, or the shards of an index).

    ``headers[i]`` was read through ``fds[i]``; ``where`` maps each tensor of the checkpoint
    to its header, shard by shard (shards sorted by name) and in file order within a shard.
    For a sharded checkpoint the index's ``weight_map`` is the truth: a tensor a shard holds
    but the index does not list is not part of the checkpoint (``notes`` says so).
    Close it (or use it as a context manager) to close the descriptors.
    """

    path: Path  # the file resolved: the .safetensors file or the index
    headers: list[st_format.Header]
    fds: list[int]
    where: dict[str, int]
    index: Path | None = None
    index_metadata: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """Every file read: the shards, then the index."""
        return [h.path for h in self.headers] + ([self.index] if self.index else [])

    def info(self, name: str) -> st_format.TensorInfo:
        return self.headers[self.where[name]].tensors[name]

    def infos(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Tensor name -> (dtype, shape), in checkpoint order."""
        return {n: (self.info(n).dtype, self.info(n).shape) for n in self.where}

    def locate(self, name: str) -> tuple[int, st_format.Header]:
        """The open descriptor and the header of the file holding ``name``."""
        i = self.where[name]
        return self.fds[i], self.headers[i]

    def read(self, name: str, *, out: bytearray | memoryview | None = None) -> bytes | memoryview:
        """The bytes of tensor ``name`` (see `st_format.read_tensor_bytes`)."""
        fd, header = self.locate(name)
        return st_format.read_tensor_bytes(fd, header, name, out=out)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_checkpoint(path: Path) -> OpenCheckpoint:
    """Open a ``.safetensors`` file, a ``*.safetensors.index.json`` or a folder holding one.

    Raises:
        CheckpointError: as `resolve`; a missing, unreadable or malformed file; an index
            naming a shard that does not exist or a tensor its shard does not hold.
    """
    path = resolve(path)
    if not is_index(path):
        fd = st_format.open_file(path)
        try:
            header = st_format.read_header_fd(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return OpenCheckpoint(path, [header], [fd], {n: 0 for n in _file_order(header)})
    ckpt = OpenCheckpoint(path, [], [], {}, index=path)
    try:
        _open_shards(ckpt)
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def _open_shards(ckpt: OpenCheckpoint) -> None:
    index = ckpt.path
    ckpt.index_metadata, weight_map = st_format.read_index_full(index)
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    for shard in sorted(by_shard):
        shard_path = shard_file(index, shard)
        fd = st_format.open_file(shard_path)
        ckpt.fds.append(fd)
        header = st_format.read_header_fd(fd, shard_path)
        ckpt.headers.append(header)
        listed = by_shard[shard]
        missing = sorted(n for n in listed if n not in header.tensors)
        if missing:
            raise CheckpointError(
                f"{index} maps {len(missing)} tensor(s) to {shard} that it does not hold "
                f"(first: {', '.join(missing[:5])})",
                hint="the index and the shards come from different exports",
            )
        extra = sorted(set(header.tensors) - listed)
        if extra:
            ckpt.notes.append(
                f"ignored {len(extra)} tensor(s) in {shard} that the index does not list "
                f"(first: {', '.join(extra[:5])})"
            )
        for name in _file_order(header):
            if name in listed:
                ckpt.where[name] = len(ckpt.headers) - 1


def shard_file(index: Path, shard: str) -> Path:
    """The path of a shard an index names; it must exist."""
    shard_path = index.parent / shard
    if not shard_path.is_file():
        raise CheckpointError(
            f"{index} names shard {shard} but {shard_path} does not exist",
            hint="copy every shard beside the index",
        )
    return shard_path


def _file_order(header: st_format.Header) -> list[str]:
    return sorted(header.tensors, key=lambda n: header.tensors[n].begin)
