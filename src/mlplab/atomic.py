"""Atomic writes in the run folder: checkpoints, metrics.json and history.json.

Each file is written to a temporary file beside its target (same folder, so the same filesystem),
flushed to disk (fsync), then renamed over the target (os.replace, atomic on POSIX). A write that
fails, a full disk above all, leaves the previous file whole and the temporary one removed.

Lightning's own `_atomic_save` writes through an fsspec transaction whose temporary file lives in
the system temp dir; when the run folder is on another filesystem (NFS, Lustre, a tmpfs: the usual
case on clusters) the final move is a copy into the target's name, and a full disk leaves the last
good checkpoint truncated (issue #14).
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class WriteError(RuntimeError):
    """A file of the run folder could not be written; the previous version of it is intact.

    The message is one line: the cause and the file, e.g. "No space left on device while writing
    <path>".

    Args:
        message: that line.
        path: the file that was not written.
        errno: the failed write's error number (errno.ENOSPC for a full disk).
    """

    def __init__(self, message: str, path: Path, errno: int | None) -> None:
        super().__init__(message)
        self.path, self.errno = path, errno

    def __reduce__(self) -> tuple:  # travels from a DDP rank to the parent (pickled) whole
        return type(self), (str(self), self.path, self.errno)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` all at once or not at all: `write(file)` fills a temporary file beside it.

    Args:
        path: the file to (re)place.
        write: writes the whole content into the open binary file it is given.

    Raises:
        WriteError: the write failed (the previous `path`, if any, is left as it was).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden; per process: DDP ranks never share one
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a crash
    except OSError as err:
        tmp.unlink(missing_ok=True)
        cause = err.strerror or os.strerror(err.errno or errno.EIO)
        raise WriteError(f"{cause} while writing {path}", path, err.errno) from err
    except BaseException:  # KeyboardInterrupt mid-write, a pickling error: no stray temporary file either
        tmp.unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform without folder descriptors: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder (EINVAL); the file's own fsync is what matters
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, saving through `write_atomically` into the checkpoint's own folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:  # as TorchCheckpointIO: it has no use for them either
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        # Serialised in memory first, as Lightning does: torch.save straight into a file turns the file's
        # OSError (ENOSPC) into a RuntimeError about zip positions that names neither cause nor file
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(path, lambda f: f.write(buffer.getbuffer()))
