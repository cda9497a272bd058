"""Safe file I/O: atomic writes, one writer at a time, and confined reads of untrusted bundle files.

- Writes go to a temporary name beside the target and are renamed over it, so a reader sees the old
  file or the new one, never half of either; a directory is swapped whole with one atomic exchange.
- Writers of one bundle serialise on a lock file beside it (``.NAME.lock``), with a timeout and a clear
  error, and clean up what killed writers left behind.
- Reads of names taken from a manifest accept only plain file names inside the bundle, never follow
  symlinks, refuse anything that is not a regular file (FIFOs and devices would hang or never end)
  and check the size before reading a byte.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import BundleError

#: Seconds a writer waits for another writer of the same bundle before giving up.
LOCK_TIMEOUT_S = 60.0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes 0600 files
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------ locking
def lock_path(target: str | os.PathLike) -> Path:
    """The lock file that every writer of ``target`` takes: beside it, so it survives a whole swap."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, timeout: float | None = None):
    """Hold the exclusive writer lock of ``target`` (a bundle directory or file), then tidy up after
    writers that were killed: their temporary files and folders, and an interrupted directory swap."""
    from filelock import FileLock, Timeout

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(target)), timeout=LOCK_TIMEOUT_S if timeout is None else timeout)
    try:
        lock.acquire()
    except Timeout as error:
        raise BundleError(f"{target} is being written by another process (lock {lock_path(target)} held for more "
                          f"than {lock.timeout:g} s); retry when it is done") from error
    try:
        recover_interrupted_writes(target)
        yield
    finally:
        lock.release()


def recover_interrupted_writes(target: Path) -> None:
    """Under the writer lock no other writer runs, so every temporary entry beside or inside ``target``
    belongs to a killed writer: restore a directory a swap left missing, delete the rest."""
    parent = target.parent
    previous = interrupted_swap(target)
    if previous is not None:
        os.replace(previous, target)  # the fallback swap was cut between its two renames
    name = glob.escape(target.name)
    olds = sorted(parent.glob(f".{name}.old-*"))
    for stale in olds + list(parent.glob(f".{name}.*.tmp")):
        _remove(stale)
    if target.is_dir() and not target.is_symlink():
        for stale in target.glob(".*.tmp"):
            _remove(stale)


def interrupted_swap(target: str | os.PathLike) -> Path | None:
    """The previous version of ``target`` that a fallback swap killed between its renames left, or None."""
    target = Path(target)
    olds = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*"))
    return olds[-1] if olds and not target.exists() and not target.is_symlink() else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------- directory swap
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _swap_in(temporary: Path, path: Path) -> None:
    """Put ``temporary`` at ``path``. The target never goes missing: one atomic exchange, or, where the
    system has none, two renames whose gap ``recover_interrupted_writes`` repairs on the next write."""
    if not path.exists():
        os.replace(temporary, path)
        return
    if _exchange(temporary, path):
        shutil.rmtree(temporary, ignore_errors=True)  # now holds the old content
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(temporary, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, timeout: float | None = None):
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    Holds the writer lock of ``path`` throughout, so concurrent writers take turns. A failure or a kill
    at any point leaves the old directory or the new one at ``path``, never a mix and never nothing.
    """
    path = Path(path)
    with writer_lock(path, timeout):
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield temporary
            os.chmod(temporary, 0o755)  # mkdtemp makes 0700 folders
            _swap_in(temporary, path)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise


# ----------------------------------------------------------------------------------- confined reads
def check_plain_name(name, what: str = "file name") -> str:
    """``name`` if it is a plain file name (no folder, no '..', no absolute path, no NUL), else BundleError."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise BundleError(f"{what} must be a non-empty file name of at most 255 characters, got {name!r:.80}")
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise BundleError(f"{what} {name!r:.80} is not a plain file name inside the bundle "
                          "(no folders, '..', absolute or hidden paths)")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BundleError(f"{what} {name!r:.80} is not valid Unicode (a lone surrogate); "
                          "bundle file names are plain UTF-8") from None
    if len(encoded) > 255:
        raise BundleError(f"{what} {name!r:.80} is longer than 255 bytes in UTF-8")
    return name


def _check_entry(path: Path, info: os.stat_result, max_bytes: int, expected_bytes: int | None) -> None:
    """The checks every confined file passes: a regular file (never a link, FIFO, device or folder), of
    at most ``max_bytes`` and of the size the manifest lists."""
    if stat.S_ISLNK(info.st_mode):
        raise BundleError(f"{path} cannot be read: is a symbolic link, which bundles may not hold")
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{path} is not a regular file (a folder, device, FIFO or socket); "
                          "a bundle holds plain files only")
    if info.st_size > max_bytes:
        raise BundleError(f"{path} has {info.st_size} bytes, more than the {max_bytes} allowed")
    if expected_bytes is not None and info.st_size != expected_bytes:
        raise BundleError(f"{path} has {info.st_size} bytes where the manifest lists "
                          f"{expected_bytes}: the file is truncated or was replaced")


def check_confined(directory: str | os.PathLike, name: str, *, max_bytes: int,
                   expected_bytes: int | None = None) -> None:
    """Check ``directory/name`` as ``read_confined`` would, without opening it (one ``lstat``)."""
    path = Path(directory) / check_plain_name(name)
    try:
        info = os.lstat(path)
    except FileNotFoundError as error:
        raise BundleError(f"bundle {directory} is missing {name}") from error
    except OSError as error:
        raise BundleError(f"{path} cannot be read: {error.strerror}") from error
    _check_entry(path, info, max_bytes, expected_bytes)


def read_confined(directory: str | os.PathLike, name: str, *, max_bytes: int,
                  expected_bytes: int | None = None) -> bytes:
    """The bytes of ``directory/name``: a plain name, no symlink, a regular file of the expected size.

    Opened with O_NOFOLLOW (a symlink fails) and O_NONBLOCK (a FIFO cannot block the open), then checked
    on the open descriptor, so what was checked is what is read.
    """
    path = Path(directory) / check_plain_name(name)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as error:
        raise BundleError(f"bundle {directory} is missing {name}") from error
    except OSError as error:
        reason = "is a symbolic link, which bundles may not hold" if error.errno == errno.ELOOP else error.strerror
        raise BundleError(f"{path} cannot be read: {reason}") from error
    try:
        info = os.fstat(fd)
        _check_entry(path, info, max_bytes, expected_bytes)  # before fdopen, which refuses folders its own way
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", closefd=True) as handle:
        data = handle.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise BundleError(f"{path} changed size while being read; retry")
    return data
