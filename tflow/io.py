"""Safe file I/O: atomic writes and safetensors-only reads (nothing is ever unpickled)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

from tflow.errors import CheckpointError, OutputError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, then rename it over `path`.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a report or checkpoint is meant to be shared
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def writable_dir(path: str | Path) -> Path:
    """`path` as a folder that exists and takes new files (created if missing).

    Raises:
        OutputError: it cannot be created (a file is in the way) or written.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        why = "it is a file, not a folder" if path.is_file() else err.strerror or err
        raise OutputError(f"cannot write to {path}: {why}; choose a folder you can write to") from None
    return path


@contextmanager
def exclusive(folder: str | Path, what: str) -> Iterator[None]:
    """Hold `folder` for this process during the block: an advisory lock on the folder itself.

    The kernel drops the lock when its process ends, however it ends, so none goes stale, and no
    lock file is left in the folder.

    Raises:
        OutputError: another process holds `folder` (`what` names what it does there).
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{folder} is in use by another {what}; wait for it to finish or choose another "
                              "folder") from None
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def writable_file(path: str | Path) -> Path:
    """`path` as a file that can be written (its folder created if missing), checked before long work.

    Raises:
        OutputError: `path` is a folder, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write to {path}: it is a folder; name a file in it, e.g. {path / 'bench.json'}")
    writable_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: str | Path, device=None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load tensors and metadata from a safetensors file.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted or not safetensors (a pickle
            is rejected by its header and never unpickled).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several unrelated types for a bad file
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
            "tflow loads only safetensors, re-export it or point at the right file"
        ) from None
    return tensors, meta


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
