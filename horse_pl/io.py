"""Atomic outputs: write into a temporary sibling, then swap it in, so a crash never leaves half an output.

A folder replaced on request (``--overwrite``) is exchanged with the new one in a single ``renameat2``
call where the filesystem offers it (Linux), so at every instant ``target`` holds the old or the new
output, whole. Elsewhere the old folder is moved aside first and deleted only once the new one is in
place; a crash between the two renames leaves it at a hidden sibling, which the next write to the same
target puts back (or removes, once a new output is there). Hidden temporary folders of runs that died
are removed by the next write to the same target, with a note on stderr.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when empty), for one-sentence errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


class OutputError(OSError):
    """An output location that cannot be written (read-only, missing space, a folder where a file goes)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path) -> list[tuple[Path, bool]]:
    """Hidden siblings ``.NAME-[old-]PID-*`` that runs which are no longer alive left behind: (path, is_old)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}-(old-)?(\d+)-")
    found = []
    if target.parent.is_dir():
        for path in target.parent.iterdir():
            match = pattern.match(path.name)
            if match and int(match.group(2)) != os.getpid() and not _pid_alive(int(match.group(2))):
                found.append((path, bool(match.group(1))))
    return found


def recover_leftovers(target: str | Path) -> None:
    """Put back an old output that a crash left aside, and delete dead runs' temporary folders."""
    target = Path(target)
    for path, is_old in _leftovers(target):
        kept = path / target.name
        if is_old and kept.exists() and not target.exists():
            os.replace(kept, target)
            print(f"note: restored '{target}' from '{path}', where an interrupted --overwrite had moved it",
                  file=sys.stderr)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        print(f"note: removed '{path}' ({size / 2**20:.0f} MiB), left behind by an interrupted run", file=sys.stderr)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    return 0o666 & ~_umask()


def _readable(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would (safetensors writes 0600, unreadable for the user's group)."""
    mode = _file_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def check_writable(target: str | Path, needed_bytes: int = 0, what: str = "--out") -> None:
    """Raise :class:`OutputError` now, before any expensive work, when ``target`` cannot be written."""
    target = Path(target)
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} '{target}' cannot be written: '{parent}' is not a folder; choose another {what}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} '{target}' cannot be written: folder '{parent}' is not writable; choose another "
                          f"{what}.")
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes * 1.05:
        raise OutputError(f"{what} '{target}' needs about {needed_bytes / 2**20:.0f} MiB but '{parent}' has "
                          f"{free / 2**20:.0f} MiB free; free some space or choose another {what}.")


def write_atomic_dir(target: str | Path, write: Callable[[Path], None],
                     if_exists: Literal["error", "replace", "keep"] = "error") -> Path:
    """Call ``write(tmp_folder)`` and move the result to ``target``.

    ``if_exists``: ``error`` (never overwrite what a user has), ``replace`` (asked to overwrite) or
    ``keep`` (a cache another process filled first).
    """
    target = Path(target)
    recover_leftovers(target)
    if target.exists() and if_exists == "error":
        raise FileExistsError(f"'{target}' already exists; choose another output path or pass --overwrite.")
    if target.exists() and not target.is_dir():
        raise OutputError(f"'{target}' is a file, and this output is a folder; choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-{os.getpid()}-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: the mode mkdir gives
        _readable(tmp)
        if target.exists():
            if if_exists == "keep":
                shutil.rmtree(tmp)
                return target
            if _exchange(tmp, target):  # tmp now holds the old output
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-{os.getpid()}-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_atomic_file(target: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_file)`` beside ``target`` and rename it over ``target`` (mode 0666 less the umask)."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"'{target}' is a folder, and this output is a file; choose a file path.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"'{target}' already exists; choose another path or pass --overwrite.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}-{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
