"""Files and folders shared between commands and runs: how a stage's config.yaml records the folders it read
(shards, base models) and finds them again, writes that are whole or absent, and folder locks."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_UMASK = os.umask(0)  # read once, at import: setting it to read it later would race other threads' files
os.umask(_UMASK)

LOCK_NAME = ".lock"
"""The lock file of a folder the project writes (a run, shards, a compare root); left out of folder digests."""
# The project's root: the repository, or where `pip install .` put configs/ beside the packages.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_file(path: str | Path) -> Path:
    """A relative file name that is no file in the working folder, taken from the project's root: the shipped
    recipes and DeepSpeed configs (`configs/...`) work from any folder. Other names are returned as given."""
    candidate = Path(path)
    if candidate.is_absolute() or names_a_file(candidate):
        return candidate
    return PROJECT_ROOT / candidate


def names_a_file(path: Path) -> bool:
    """Whether `path` is a file; False, not an OSError, for a string too long to be a file name."""
    try:
        return path.is_file()
    except OSError:  # a name longer than the file system takes (an inline config): no file
        return False


def stored_path(path: Path, run_dir: Path) -> str:
    """How a stage's config.yaml records an input folder: relative to the run folder when inside it (the tiny
    base models, shards built by the run), so that a moved run keeps its fingerprints and finds its inputs;
    else absolute, so that report, export and eval work from any working folder."""
    path, run = Path(path).resolve(), Path(run_dir).resolve()
    return str(path.relative_to(run)) if path.is_relative_to(run) else str(path)


def input_path(stored: str, run_dir: Path) -> Path:
    """The folder a stage's config.yaml records (see `stored_path`); older runs recorded paths relative to
    the working folder of their training, which is tried when the run-relative one does not exist."""
    path = Path(stored)
    if path.is_absolute():
        return path
    inside = Path(run_dir) / path
    return inside if inside.exists() or not path.exists() else path


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `path` whole or not at all (a temporary file beside it, then renamed over it): the files a rerun
    decides by (config.yaml, metrics.json, done.json) are never left half-written by a kill, nor, with the
    file synced before the rename and the folder after it, empty after a power cut."""
    path = Path(path)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(scratch, 0o666 & ~_UMASK)  # as open() would make it: mkstemp's 0600 hid it from other users
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            durable(out)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    sync_path(path.parent)


def durable(out) -> None:
    """Flushes an open file to the disk (before it is renamed into place: a rename can reach the disk before
    the file's data does, leaving an empty file after a power cut)."""
    out.flush()
    os.fsync(out.fileno())


def sync_tree(folder: Path) -> None:
    """Syncs a file, or every file under a folder and the folders, to the disk: what a marker written after it
    (done.json after the stage's export/, index.json after the shards) vouches for is on the disk first."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):  # files before the folders that hold them
        if not path.is_symlink():
            sync_path(path)
    sync_path(folder)


def sync_path(path: Path) -> None:
    """Syncs a file, or a folder (which makes a rename in it durable), to the disk. A folder this user may not
    open, or a file system that syncs no folder, is left as it is; the disk's own errors (EIO, a full NFS
    quota) are raised."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as error:  # a folder this user may not open: nothing to sync from here
        if error.errno in (errno.EACCES, errno.EPERM):
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as error:  # some file systems (and platforms) sync no folder
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(descriptor)


def follow_umask(folder: Path) -> None:
    """Gives the files under `folder` the permissions open() would have (0666 less the umask): safetensors
    writes its files 0600, so a teammate could read an export's config and tokenizer but not its weights."""
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~_UMASK)


def make_folder(folder: Path, flag: str) -> None:
    """`folder`, made with its parents; a file in its place or on its way there ends the command naming the
    flag (mkdir's "[Errno 17] File exists" named none; a file on the way gave NotADirectoryError's traceback)."""
    for path in (folder, *folder.parents):  # the nearest one that exists decides
        if path.is_symlink() and not path.exists():
            raise FileExistsError(f"{flag}: {path} is a link to {os.readlink(path)}, which does not exist")
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"{flag}: {path} is a file, not a folder")
            break
    folder.mkdir(parents=True, exist_ok=True)


def check_own_folder(folder: Path, flag: str, markers: tuple[str, ...], writes: Iterable[str]) -> None:
    """Refuses a folder that holds none of `markers` (what a build or run of this project writes first) and
    something under a name it `writes`, before anything there is replaced: a data build into a home folder
    deleted its `work/` and `stats/`, and a run there its `data/work/`. Other files are left alone."""
    if not folder.is_dir() or any((folder / name).exists() for name in markers):
        return
    taken = sorted(name for name in set(writes) if (folder / name).exists())
    if taken:
        raise FileExistsError(
            f"{flag} {folder} holds {', '.join(taken)}, which this command writes, and none of "
            f"{', '.join(markers)}, which it writes first: not a folder it made; name a new or empty folder"
        )


class FolderBusy(RuntimeError):
    """Another process writes a folder this one reads or writes, or reads one this one would write."""


@contextmanager
def folder_lock(folder: Path, flag: str, shared: bool = False, purpose: str = "") -> Iterator[None]:
    """Holds `<folder>/.lock` while this process writes the folder (exclusive) or reads it (`shared`): a data
    build into shards that a curriculum was training from gave its later stages another world, silently; two
    builds into one folder deleted each other's files; two runs in one run folder resumed from each other's
    half-written checkpoints. See `file_lock`."""
    with file_lock(Path(folder) / LOCK_NAME, f"{flag} {folder}", shared, purpose):
        yield


_HELD_LOCKS: set[int] = set()
"""The descriptors of the lock files this process holds (`file_lock`)."""


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, a Data-Juicer worker): an flock belongs to the open file, which
    the child's copy of the descriptor shares, so the run's lock stayed held by orphaned workers for seconds
    after the run itself was killed, and a rerun then was refused. The child's copies are pointed at /dev/null
    (not closed: the parent's file objects, copied into the child, may close their descriptor numbers)."""
    if not _HELD_LOCKS:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD_LOCKS:
        os.dup2(null, fd)
    os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextmanager
def file_lock(path: Path, subject: str, shared: bool = False, purpose: str = "") -> Iterator[None]:
    """Holds an flock on `path` (made if missing), refusing with `FolderBusy` what another process holds. An
    exclusive holder writes who it is (pid, host, `purpose`) into the file, for the message that refuses the
    next one; `subject` names what is locked there ("--run_dir runs/tiny"). The operating system drops the lock
    when the process ends, however it ends: a killed process leaves no stale lock. A file this user cannot
    make is not locked (in a folder nobody here can write)."""
    try:
        handle = path.open("a+")
    except OSError:
        try:  # another user's lock file in a folder both write: flock works on a read-only handle too
            handle = path.open("r")
        except OSError:
            yield
            return
    with handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{subject} {_held_by(handle, shared)}; wait for it to end") from None
        except OSError as error:  # a file system without locks (NFS mounted nolock): go on, unguarded
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("%s: this file system takes no locks (%s); not guarded against other processes",
                        subject, error.strerror)  # fmt: skip
            yield
            return
        if not shared and handle.writable():
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}" + (f": {purpose}" if purpose else "") + "\n")
            handle.flush()
        _HELD_LOCKS.add(handle.fileno())
        try:
            yield
        finally:
            _HELD_LOCKS.discard(handle.fileno())
            fcntl.flock(handle, fcntl.LOCK_UN)


def _held_by(handle, shared: bool) -> str:
    """Who holds the lock that refused this process: readers (shared holders write nothing), or the writer
    named in the file."""
    if not shared:
        try:  # a shared lock granted now: only readers hold it
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return "is being read by another process (a run training from it)"
        except BlockingIOError:
            pass
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    return f"is {'being written' if shared else 'in use'} by {holder}"
