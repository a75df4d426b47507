"""Atomic output files: every file qatconv writes goes through `AtomicFile`.

The bytes go to ``.<name>.tmp-<pid>`` in the target's folder (so the rename never crosses a
filesystem), are fsynced, and the temporary file is renamed onto the target with ``os.replace``;
the folder is then fsynced so the rename itself is durable. Any exception — including the
``KeyboardInterrupt`` that the CLI raises for SIGINT and SIGTERM — removes the temporary file,
so a failed or interrupted command leaves neither a partial output nor a stray temp file.

A writer that knows the file's size up front may `AtomicFile.map` it: the whole size is reserved
with ``posix_fallocate`` first (a full disk is an `OutputError` there, before any data is
written, instead of a SIGBUS on a page of the mapping later), then the temporary file is mapped
read-write. Where the filesystem cannot reserve space, `map` returns None and the caller writes
with ``os.write`` as before.

Also here: `copy_fd_chunk`, the one file-to-file copy (in the kernel where the platform allows,
else through a buffer). Imports no torch.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path
from types import TracebackType
from typing import final

from qatconv.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = ["AtomicFile", "copy_fd_chunk", "fsync_dir", "write_atomic"]

_HINT = "check that the output folder exists, is writable and has free space"


@final
class AtomicFile:
    """One output file written under a temporary name and renamed into place.

    As a context manager: ``__enter__`` creates the temporary file (`fd` is its descriptor);
    a clean exit fsyncs, closes and (unless ``commit=False``) renames it onto ``final_path``;
    an exception removes it. ``commit=False`` leaves the rename to `commit`, so that several
    files can be published together once all are complete.

    Raises:
        OutputError: the temporary file cannot be created, written, synced or renamed.
    """

    def __init__(self, final_path: Path, *, fsync: bool = True, commit: bool = True) -> None:
        self.final_path = Path(final_path)
        self.temp_path = self.final_path.with_name(f".{self.final_path.name}.tmp-{os.getpid()}")
        self.fsync = fsync
        self._auto_commit = commit
        self.fd: int | None = None
        self.mapping: mmap.mmap | None = None
        self.finished = False

    def __enter__(self) -> AtomicFile:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.finish()
        except BaseException:
            self.discard()
            raise
        if self._auto_commit:
            self.commit()

    def open(self) -> int:
        """Create (or truncate) the temporary file; returns its descriptor."""
        try:
            # Read-write: a shared writable mapping (`map`) needs a descriptor open for reading.
            self.fd = os.open(
                self.temp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666
            )
        except OSError as e:
            raise self.error(e) from None
        return self.fd

    def map(self, size: int) -> mmap.mmap | None:
        """Reserve ``size`` bytes for the open temporary file and map them read-write.

        Returns None (nothing reserved, the file unchanged) where the filesystem or platform
        cannot reserve space or map the file: the caller then writes with `write_all`.

        Raises:
            OutputError: the space cannot be reserved (disk full, file size limit, quota).
        """
        fd = self.require_fd()
        if size <= 0 or not hasattr(os, "posix_fallocate"):
            return None
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in _NO_FALLOCATE:
                raise self.error(e) from None
            logger.debug("posix_fallocate unavailable for %s (%s): plain writes", self.temp_path, e)
            return None
        try:
            self.mapping = mmap.mmap(fd, size)
        except OSError as e:  # a filesystem without shared writable mappings
            logger.debug("cannot map %s (%s): plain writes", self.temp_path, e)
            try:
                os.ftruncate(fd, 0)
            except OSError as e2:
                raise self.error(e2) from None
            return None
        return self.mapping

    def finish(self) -> None:
        """Unmap, fsync (when asked) and close the temporary file."""
        fd = self.require_fd()
        self._unmap()
        try:
            # fsync also writes back the pages dirtied through the mapping (Linux keeps one
            # page cache for both), so no separate msync is needed.
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
        except OSError as e:
            raise self.error(e) from None
        finally:
            self.fd = None
        self.finished = True

    def commit(self) -> None:
        """Rename the finished temporary file onto ``final_path``; fsync the folder."""
        if not self.finished:
            raise ValueError("commit() before the file was finished")
        try:
            os.replace(self.temp_path, self.final_path)
        except OSError as e:
            self.discard()
            raise self.error(e) from None
        if self.fsync:
            fsync_dir(self.final_path.parent)

    def discard(self) -> None:
        """Unmap, close and remove the temporary file; safe to call more than once."""
        self._unmap()
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass

    def _unmap(self) -> None:
        if self.mapping is None:
            return
        try:
            self.mapping.close()
        except BufferError:
            # A view of the mapping is still referenced (say, by a traceback's frame): the
            # mapping goes when that view does; the file's data is in the page cache either way.
            logger.debug("%s: mapping still in use; left to the garbage collector", self.temp_path)
        self.mapping = None

    def require_fd(self) -> int:
        if self.fd is None:
            raise ValueError(f"{self.temp_path} is not open: use the writer as a context manager")
        return self.fd

    def write_all(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data`` at the current position; returns the byte count."""
        fd = self.require_fd()
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            while len(view):
                view = view[os.write(fd, view) :]
        except OSError as e:
            raise self.error(e) from None
        return n

    def error(self, e: OSError) -> OutputError:
        return OutputError(f"cannot write {self.final_path}: {e.strerror or e}", hint=_HINT)


def write_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see `AtomicFile`)."""
    with AtomicFile(path, fsync=fsync) as f:
        f.write_all(data)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not every filesystem lets a folder be fsynced."""
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Errors of posix_fallocate that mean "not supported here" (some network filesystems, special
# files) rather than "no space".
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENODEV}

# Errors after which an in-kernel copy method is unavailable for this pair of files (other
# filesystem, old kernel, special file) and the next method is tried.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM,
                       errno.ETXTBSY, errno.EBADF}  # fmt: skip
_NO_SENDFILE = {errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_PREAD_STEP = 8 << 20  # bytes per pread in the plain fallback
COPY_METHODS = ("copy_file_range", "sendfile", "pread")


def copy_fd_chunk(
    src_fd: int, dst_fd: int, offset: int, nbytes: int, method: str
) -> tuple[int, str]:
    """Copy up to ``nbytes`` from ``src_fd`` at ``offset`` to ``dst_fd``'s current position.

    Tries ``method`` first and falls back along `COPY_METHODS` (copy_file_range, then sendfile,
    both inside the kernel, then pread + write) when the platform or filesystem refuses it.

    Returns:
        The bytes copied (0: the source ended) and the method that worked, to pass next time.

    Raises:
        OSError: a read or write error that no fallback avoids.
    """
    while True:
        if method == "copy_file_range":
            try:
                return os.copy_file_range(src_fd, dst_fd, nbytes, offset), method
            except OSError as e:
                if e.errno not in _NO_COPY_FILE_RANGE:
                    raise
                logger.debug("copy_file_range unavailable (%s); using sendfile", e)
                method = "sendfile"
        elif method == "sendfile":
            try:
                return os.sendfile(dst_fd, src_fd, offset, nbytes), method
            except OSError as e:
                if e.errno not in _NO_SENDFILE:
                    raise
                logger.debug("sendfile unavailable (%s); using pread", e)
                method = "pread"
        else:
            data = os.pread(src_fd, min(nbytes, _PREAD_STEP), offset)
            view = memoryview(data)
            while len(view):
                view = view[os.write(dst_fd, view) :]
            return len(data), method
