"""Writing results safely: whole files or nothing, appended lines or nothing, one writer per folder.

Every OSError on output (disk full, read-only or vanished folder, quota) becomes an `OutputError`
naming the file, which the command line prints as one line with exit status 2.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from swssl.errors import OutputError

LOCK = ".swssl.lock"


def output_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """One line for a failed write: the file and the system's reason (e.g. "No space left on device")."""
    return OutputError(f"{os.fsdecode(path)}: cannot write ({exc.strerror or exc})")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) then rename over `path`, so a crash or a full disk never leaves half a file.

    The file gets the permissions a plain `open` would give (0666 less the umask), so colleagues
    on a shared server can read results; mkstemp alone would make it 0600.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
    except OSError as exc:
        raise output_error(path, exc) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def append(fd: int, data: bytes, path: Path) -> None:
    """Append `data` to the open file and fsync it; on failure cut the file back, so no partial line stays."""
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        raise output_error(path, exc) from None


class FolderLock:
    """An exclusive lock on an output folder (flock on FOLDER/.swssl.lock, holding the writer's PID).

    A second writer is refused at once, naming the folder and the holder; the lock goes with the
    process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, folder: Path, what: str):
        self.path = folder / LOCK
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise output_error(self.path, exc) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise OutputError(f"{folder}: another {what} (PID {holder}) is writing here; "
                                  "wait for it to finish or use another --out") from None
            raise output_error(self.path, exc) from None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(self._fd)
            raise output_error(self.path, exc) from None

    def release(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The file's SHA-256 (hex), read in chunks: artifacts and weights files can be large."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
